"""Compare this project's contrastive losses with lightly's on the same inputs.

Pairs compared (lightly 1.5.21 or newer):

* ``training.losses.InfoNCELoss`` and ``lightly.loss.NTXentLoss`` (no memory bank),
* ``training.losses.DCLLoss`` and ``lightly.loss.DCLLoss``,
* ``training.losses.DCLWLoss`` and ``lightly.loss.DCLWLoss``.

Both sides get the same random projections, not normalised, for several batch
sizes N, projection sizes D, temperatures τ and seeds. The script reports the
maximum absolute difference of the loss values and of their gradients with
respect to both views, in float64 and float32, as a Markdown table.

Conventions, as read in lightly 1.6.0's ``loss/dcl_loss.py`` and
``loss/ntx_ent_loss.py``: lightly's DCL computes the loss with view 0 as anchors
and with view 1 as anchors, each a mean over N, and returns half their sum. This
project takes the mean over all 2N anchors at once, which is the same number.
lightly's DCLW weight is ``2 - N * softmax(z0·z1 / σ)`` on normalised, detached
projections, the same formula as ``training.losses.dclw_weights``. NTXentLoss
takes a cross entropy over the 2N anchors with the 2N - 1 other rows as
candidates, which is InfoNCE with the mean over 2N anchors.

Example::

    python benchmarks/peer_losses.py --out /tmp/peer-losses.md
"""

from __future__ import annotations

import argparse
import itertools
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightly
import lightly.loss
import torch
from packaging.version import Version
from torch import Tensor, nn

from training.losses import DCLLoss, DCLWLoss, InfoNCELoss

logger = logging.getLogger(__name__)

MIN_LIGHTLY = Version("1.5.21")
BATCH_SIZES = (2, 8, 64, 256)
DIMS = (16, 128)
TEMPERATURES = (0.05, 0.1, 0.5)
SEEDS = (0, 1, 2)
SIGMA = 0.5

LossFactory = Callable[[float], nn.Module]
PAIRS: dict[str, tuple[LossFactory, LossFactory]] = {
    "InfoNCE vs NTXentLoss": (
        lambda t: InfoNCELoss(temperature=t),
        lambda t: lightly.loss.NTXentLoss(temperature=t, memory_bank_size=0),
    ),
    "DCL vs DCLLoss": (
        lambda t: DCLLoss(temperature=t),
        lambda t: lightly.loss.DCLLoss(temperature=t),
    ),
    "DCLW vs DCLWLoss": (
        lambda t: DCLWLoss(temperature=t, sigma=SIGMA),
        lambda t: lightly.loss.DCLWLoss(temperature=t, sigma=SIGMA),
    ),
}


@dataclass
class PairResult:
    """Largest differences of one loss pair over all inputs of one dtype."""

    pair: str
    dtype: str
    cases: int
    max_loss_diff: float
    max_grad_diff: float
    max_abs_loss: float


def value_and_grads(loss_fn: nn.Module, z1: Tensor, z2: Tensor) -> tuple[Tensor, ...]:
    """Return the loss and its gradients with respect to both views."""
    a = z1.clone().requires_grad_(True)
    b = z2.clone().requires_grad_(True)
    with warnings.catch_warnings():
        # lightly's DCLW weighting wraps a tensor in torch.tensor(), which warns.
        warnings.filterwarnings(
            "ignore", message="To copy construct from a tensor", category=UserWarning
        )
        loss = loss_fn(a, b)
    grad_a, grad_b = torch.autograd.grad(loss, (a, b))
    return loss.detach(), grad_a, grad_b


def compare_pair(
    pair: str,
    dtype: torch.dtype,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    dims: Sequence[int] = DIMS,
    temperatures: Sequence[float] = TEMPERATURES,
    seeds: Sequence[int] = SEEDS,
) -> PairResult:
    """Run one loss pair over every combination of inputs and keep the maxima."""
    ours, theirs = PAIRS[pair]
    max_loss_diff = max_grad_diff = max_abs_loss = 0.0
    cases = 0
    for n, d, t, seed in itertools.product(batch_sizes, dims, temperatures, seeds):
        generator = torch.Generator().manual_seed(seed)
        z1 = torch.randn(n, d, generator=generator, dtype=dtype)
        z2 = z1 + 0.5 * torch.randn(n, d, generator=generator, dtype=dtype)
        loss_a, *grads_a = value_and_grads(ours(t), z1, z2)
        loss_b, *grads_b = value_and_grads(theirs(t), z1, z2)
        max_loss_diff = max(max_loss_diff, float((loss_a - loss_b).abs()))
        for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
            max_grad_diff = max(max_grad_diff, float((grad_a - grad_b).abs().max()))
        max_abs_loss = max(max_abs_loss, float(loss_a.abs()))
        cases += 1
    return PairResult(
        pair,
        str(dtype).removeprefix("torch."),
        cases,
        max_loss_diff,
        max_grad_diff,
        max_abs_loss,
    )


def compare_all() -> list[PairResult]:
    """Compare every pair in float64 and float32.

    Raises:
        ValueError: the installed lightly is older than 1.5.21.
    """
    if Version(lightly.__version__) < MIN_LIGHTLY:
        raise ValueError(
            f"lightly {lightly.__version__} is installed; install "
            f"lightly>={MIN_LIGHTLY}"
        )
    return [
        compare_pair(pair, dtype)
        for pair in PAIRS
        for dtype in (torch.float64, torch.float32)
    ]


def markdown(results: Sequence[PairResult]) -> str:
    """Render the results as a Markdown table, with the inputs they cover."""
    lines = [
        f"lightly {lightly.__version__}, torch {torch.__version__}; N in "
        f"{list(BATCH_SIZES)}, D in {list(DIMS)}, τ in {list(TEMPERATURES)}, "
        f"seeds {list(SEEDS)}, σ = {SIGMA} for DCLW; z2 = z1 + 0.5 · noise.",
        "",
        "| pair | dtype | cases | max abs loss diff | max abs grad diff "
        "| max abs loss |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.pair} | {r.dtype} | {r.cases} | {r.max_loss_diff:.2e} | "
            f"{r.max_grad_diff:.2e} | {r.max_abs_loss:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="Also write the table to this file."
    )
    args = parser.parse_args(argv)
    text = markdown(compare_all())
    if args.out is not None:
        args.out.write_text(text)
    logger.info("peer check:\n%s", text)


if __name__ == "__main__":
    main()
