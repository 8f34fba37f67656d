"""Contrastive losses: InfoNCE (NT-Xent), DCL and DCLW.

Notation, for two augmented views of the same N images: ``z1`` and ``z2`` are the
projections, each row L2-normalised, and ``s(a, b) = a·b / τ``. For the anchor
``z1_i`` the positive is ``z2_i``, and the negatives are the 2N − 2 other rows of
``z1`` and ``z2`` (the anchor and its positive are excluded). The rows of ``z2`` are
anchors too, with the roles of the views swapped, so every loss is the mean over all
2N anchors and is symmetric in ``(z1, z2)``.

References:
    Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020 (NT-Xent, arXiv 2002.05709).
    Yeh et al., "Decoupled Contrastive Learning", ECCV 2022 (DCL and DCLW,
    arXiv 2110.06848).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}; pass e.g. {name}=0.1")


def _check_views(z1: Tensor, z2: Tensor) -> None:
    if z1.dim() != 2 or z2.dim() != 2:
        raise ValueError(
            f"z1 and z2 must be 2-D [N, D] batches of projections, got shapes "
            f"{tuple(z1.shape)} and {tuple(z2.shape)}; flatten the features first"
        )
    if z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}; pass the two views of the same batch"
        )
    if z1.shape[0] < 2:
        raise ValueError(
            f"a contrastive loss needs at least 2 images per batch to have "
            f"negatives, got N={z1.shape[0]}; use a batch size of 2 or more"
        )


def contrastive_logits(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    extra_negatives: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Compute the positive and the negative logits for all 2N anchors.

    The anchors are the rows of ``cat(z1, z2)``, and the candidates are the same
    rows followed by ``extra_negatives``. In the candidate matrix, the anchor itself
    and its positive are set to ``-inf``, so that a ``logsumexp`` over a row sums
    over the negatives only.

    Args:
        z1: Projections of the first view, not yet normalised.
        z2: Projections of the second view, not yet normalised.
        temperature: τ, which divides the cosine similarities.
        extra_negatives: More negatives for every anchor, not yet normalised, for
            example the rows of ``z1`` and ``z2`` that other processes computed
            under data-parallel training. Their gradient flows only if the caller
            gathered them with a gather that passes gradients back.

    Returns:
        ``positive``: s(anchor, positive) per anchor, and ``negatives``: s(anchor,
        candidate) per anchor and candidate, with ``-inf`` at excluded entries.

    Shape:
        - z1, z2: [N, D]
        - extra_negatives: [M, D]
        - positive: [2N]
        - negatives: [2N, 2N + M]
    """
    _check_views(z1, z2)
    _check_positive("temperature", temperature)
    n = z1.shape[0]

    anchors = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    candidates = anchors
    if extra_negatives is not None:
        if extra_negatives.dim() != 2 or extra_negatives.shape[1] != z1.shape[1]:
            raise ValueError(
                f"extra_negatives must have shape [M, {z1.shape[1]}], got "
                f"{tuple(extra_negatives.shape)}; pass rows of the same projection"
            )
        candidates = torch.cat([anchors, F.normalize(extra_negatives, dim=1)], dim=0)

    # Row i of `anchors` has its positive at row (i + N) mod 2N.
    logits = anchors @ candidates.T / temperature
    rows = torch.arange(2 * n, device=z1.device)
    positive_cols = (rows + n) % (2 * n)
    positive = logits[rows, positive_cols]

    excluded = torch.zeros_like(logits, dtype=torch.bool)
    excluded[rows, rows] = True
    excluded[rows, positive_cols] = True
    negatives = logits.masked_fill(excluded, float("-inf"))
    return positive, negatives


def dclw_weights(z1: Tensor, z2: Tensor, sigma: float) -> Tensor:
    """Compute the DCLW weight of each positive pair, without gradient.

    ``w_i = 2 − N · softmax_i(z1_i·z2_i / σ)`` on normalised rows. The weights have
    mean 1, and pairs that are already similar get a smaller weight.

    Shape:
        - z1, z2: [N, D]
        - output: [N]
    """
    _check_views(z1, z2)
    _check_positive("sigma", sigma)
    with torch.no_grad():
        cosine = (F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(dim=1)
        return 2.0 - z1.shape[0] * torch.softmax(cosine / sigma, dim=0)


class InfoNCELoss(nn.Module):
    """InfoNCE (NT-Xent), the SimCLR loss.

    Per anchor:
    ``ℓ_i = −s(z1_i, z2_i) + log( exp(s(z1_i, z2_i)) + Σ_neg exp(s(z1_i, n)) )``,
    and the loss is the mean of ℓ over all 2N anchors.

    Args:
        temperature: τ, which divides the cosine similarities; must be > 0.

    Shape:
        - z1, z2: [N, D] projections, not yet normalised; N >= 2.
        - output: scalar.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        self.temperature = temperature

    def forward(
        self, z1: Tensor, z2: Tensor, extra_negatives: Tensor | None = None
    ) -> Tensor:
        positive, negatives = contrastive_logits(
            z1, z2, self.temperature, extra_negatives
        )
        # The positive goes back into the denominator.
        denominator = torch.cat([positive[:, None], negatives], dim=1)
        return (torch.logsumexp(denominator, dim=1) - positive).mean()


class DCLLoss(nn.Module):
    """Decoupled contrastive loss: InfoNCE without the positive in the denominator.

    Per anchor: ``ℓ_i = −s(z1_i, z2_i) + log Σ_neg exp(s(z1_i, n))``, and the loss
    is the mean of ℓ over all 2N anchors. Its value can be negative.

    Args:
        temperature: τ, which divides the cosine similarities; must be > 0.

    Shape:
        - z1, z2: [N, D] projections, not yet normalised; N >= 2.
        - output: scalar.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        self.temperature = temperature

    def forward(
        self, z1: Tensor, z2: Tensor, extra_negatives: Tensor | None = None
    ) -> Tensor:
        positive, negatives = contrastive_logits(
            z1, z2, self.temperature, extra_negatives
        )
        return (torch.logsumexp(negatives, dim=1) - positive).mean()


class DCLWLoss(nn.Module):
    """Weighted decoupled contrastive loss (DCLW).

    Per anchor: ``ℓ_i = −w_i · s(z1_i, z2_i) + log Σ_neg exp(s(z1_i, n))`` with
    ``w_i = 2 − N · softmax_i(z1_i·z2_i / σ)`` computed without gradient; the
    anchors ``z1_i`` and ``z2_i`` share the weight ``w_i``. The loss is the mean of
    ℓ over all 2N anchors.

    Args:
        temperature: τ, which divides the cosine similarities; must be > 0.
        sigma: σ, the temperature of the weighting softmax; must be > 0.

    Shape:
        - z1, z2: [N, D] projections, not yet normalised; N >= 2.
        - output: scalar.
    """

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        _check_positive("sigma", sigma)
        self.temperature = temperature
        self.sigma = sigma

    def forward(
        self, z1: Tensor, z2: Tensor, extra_negatives: Tensor | None = None
    ) -> Tensor:
        positive, negatives = contrastive_logits(
            z1, z2, self.temperature, extra_negatives
        )
        weights = dclw_weights(z1, z2, self.sigma).repeat(2)
        return (torch.logsumexp(negatives, dim=1) - weights * positive).mean()


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "infonce": InfoNCELoss,
    "dcl": DCLLoss,
    "dclw": DCLWLoss,
}


def build_loss(name: str, temperature: float = 0.1, sigma: float = 0.5) -> nn.Module:
    """Build a loss from its name in :data:`LOSSES`; ``sigma`` is used by DCLW only."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; pass one of {sorted(LOSSES)}")
    if name == "dclw":
        return DCLWLoss(temperature=temperature, sigma=sigma)
    return LOSSES[name](temperature=temperature)
