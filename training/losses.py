"""Contrastive losses: InfoNCE (NT-Xent), DCL and DCLW.

Notation, for two augmented views of the same N images: ``z1`` and ``z2`` are the
projections, each row L2-normalised, and ``s(a, b) = a·b / τ``. For the anchor
``z1_i`` the positive is ``z2_i``, and the negatives are the 2N − 2 other rows of
``z1`` and ``z2`` (the anchor and its positive are excluded). The rows of ``z2`` are
anchors too, with the roles of the views swapped, so every loss is the mean over all
2N anchors and is symmetric in ``(z1, z2)``.

Under data-parallel training (``torch.distributed`` initialised with W processes,
each holding N images), every loss gathers the rows of all ranks with a gather that
passes gradients back to their owners. Each rank averages ℓ over its own 2N anchors,
with the 2WN − 2 rows of all ranks (less the anchor and its positive) as negatives.
The global loss, the mean of ℓ over all 2WN anchors, is the mean of the ranks'
losses. Its gradient for a rank's rows is the sum over ranks of each rank's
gradient for them, divided by W, which is what the gather's backward (the sum) and
DistributedDataParallel's averaging compute together. So W ranks of N images give
the same gradients as one process with WN images.

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

from training.distributed import (
    gather_with_gradient,
    gather_without_gradient,
    world_info,
)

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
    positive_targets: Tensor | None = None,
    gather_distributed: bool = False,
) -> tuple[Tensor, Tensor]:
    """Compute the positive and the negative logits for all 2N local anchors.

    The anchors are the rows of ``cat(z1, z2)``, and the candidates are the rows
    of ``cat(z1, z2)`` of every rank (only this process's when not distributed),
    followed by ``extra_negatives``. In the candidate matrix, the anchor itself and
    its positive are set to ``-inf``, so that a ``logsumexp`` over a row sums over
    the negatives only.

    Args:
        z1: Projections of the first view, not yet normalised.
        z2: Projections of the second view, not yet normalised.
        temperature: τ, which divides the cosine similarities.
        extra_negatives: More negatives for every anchor, not yet normalised. Their
            gradient flows only if the caller's tensor carries one.
        positive_targets: Replacements for the positives, one row per anchor of
            ``cat(z1, z2)``, not yet normalised (NNCLR passes nearest neighbours
            here). The anchor's own other view stays out of its negatives.
        gather_distributed: Gather the candidates from all ranks when
            ``torch.distributed`` is initialised with more than one process.

    Returns:
        ``positive``: s(anchor, positive) per anchor, and ``negatives``: s(anchor,
        candidate) per anchor and candidate, with ``-inf`` at excluded entries.

    Shape:
        - z1, z2: [N, D]
        - extra_negatives: [M, D]
        - positive_targets: [2N, D]
        - positive: [2N]
        - negatives: [2N, 2WN + M], W being the number of ranks gathered (1 when
          not distributed).
    """
    _check_views(z1, z2)
    _check_positive("temperature", temperature)
    n = z1.shape[0]

    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    anchors = torch.cat([z1, z2], dim=0)
    rank, world_size = world_info() if gather_distributed else (0, 1)
    if world_size > 1:
        candidates = torch.cat([gather_with_gradient(z1), gather_with_gradient(z2)])
    else:
        candidates = anchors
    total = world_size * n
    offset = rank * n
    if extra_negatives is not None:
        if extra_negatives.dim() != 2 or extra_negatives.shape[1] != z1.shape[1]:
            raise ValueError(
                f"extra_negatives must have shape [M, {z1.shape[1]}], got "
                f"{tuple(extra_negatives.shape)}; pass rows of the same projection"
            )
        candidates = torch.cat([candidates, F.normalize(extra_negatives, dim=1)])

    # Candidates are [z1 of all ranks, z2 of all ranks]; this rank's z1_i sits at
    # column offset + i and its z2_i at column total + offset + i.
    logits = anchors @ candidates.T / temperature
    rows = torch.arange(2 * n, device=z1.device)
    local = torch.arange(n, device=z1.device) + offset
    self_cols = torch.cat([local, local + total])
    positive_cols = torch.cat([local + total, local])
    if positive_targets is None:
        positive = logits[rows, positive_cols]
    else:
        if positive_targets.shape != anchors.shape:
            raise ValueError(
                f"positive_targets must have shape {tuple(anchors.shape)}, one row "
                f"per anchor, got {tuple(positive_targets.shape)}"
            )
        targets = F.normalize(positive_targets, dim=1)
        positive = (anchors * targets).sum(dim=1) / temperature

    excluded = torch.zeros_like(logits, dtype=torch.bool)
    excluded[rows, self_cols] = True
    excluded[rows, positive_cols] = True
    negatives = logits.masked_fill(excluded, float("-inf"))
    return positive, negatives


def decoupling_weights(
    cosine: Tensor, sigma: float, gather_distributed: bool = False
) -> Tensor:
    """Compute DCLW weights ``2 − N · softmax(cosine / σ)`` of N positive pairs.

    Under data-parallel training with ``gather_distributed``, the softmax runs over
    the pairs of all ranks (N = the global batch) and this rank's slice is returned.

    Shape:
        - cosine: [N], the cosine similarity of each positive pair.
        - output: [N], without gradient.
    """
    with torch.no_grad():
        rank, world_size = world_info() if gather_distributed else (0, 1)
        everyone = gather_without_gradient(cosine) if world_size > 1 else cosine
        weights = 2.0 - everyone.shape[0] * torch.softmax(everyone / sigma, dim=0)
        n = cosine.shape[0]
        return weights[rank * n : (rank + 1) * n]


def dclw_weights(
    z1: Tensor, z2: Tensor, sigma: float, gather_distributed: bool = False
) -> Tensor:
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
    return decoupling_weights(cosine, sigma, gather_distributed)


class ContrastiveLoss(nn.Module):
    """Common arguments and inputs of the losses in this module.

    Args:
        temperature: τ, which divides the cosine similarities; must be > 0.
        gather_distributed: Take the negatives from all ranks when
            ``torch.distributed`` is initialised with more than one process; no
            effect in one process.

    Shape:
        - z1, z2: [N, D] projections, not yet normalised; N >= 2.
        - extra_negatives: [M, D], optional negatives for every anchor.
        - positive_targets: [2N, D], optional replacements for the positives of
          the anchors ``cat(z1, z2)``; see :func:`contrastive_logits`.
        - output: scalar.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True):
        super().__init__()
        _check_positive("temperature", temperature)
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def logits(
        self,
        z1: Tensor,
        z2: Tensor,
        extra_negatives: Tensor | None,
        positive_targets: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        return contrastive_logits(
            z1,
            z2,
            self.temperature,
            extra_negatives,
            positive_targets,
            self.gather_distributed,
        )


class InfoNCELoss(ContrastiveLoss):
    """InfoNCE (NT-Xent), the SimCLR loss.

    Per anchor:
    ``ℓ_i = −s(z1_i, z2_i) + log( exp(s(z1_i, z2_i)) + Σ_neg exp(s(z1_i, n)) )``,
    and the loss is the mean of ℓ over all 2N anchors. Arguments and shapes are
    those of :class:`ContrastiveLoss`.
    """

    def forward(
        self,
        z1: Tensor,
        z2: Tensor,
        extra_negatives: Tensor | None = None,
        positive_targets: Tensor | None = None,
    ) -> Tensor:
        positive, negatives = self.logits(z1, z2, extra_negatives, positive_targets)
        # The positive goes back into the denominator.
        denominator = torch.cat([positive[:, None], negatives], dim=1)
        return (torch.logsumexp(denominator, dim=1) - positive).mean()


class DCLLoss(ContrastiveLoss):
    """Decoupled contrastive loss: InfoNCE without the positive in the denominator.

    Per anchor: ``ℓ_i = −s(z1_i, z2_i) + log Σ_neg exp(s(z1_i, n))``, and the loss
    is the mean of ℓ over all 2N anchors. Its value can be negative. Arguments and
    shapes are those of :class:`ContrastiveLoss`.
    """

    def forward(
        self,
        z1: Tensor,
        z2: Tensor,
        extra_negatives: Tensor | None = None,
        positive_targets: Tensor | None = None,
    ) -> Tensor:
        positive, negatives = self.logits(z1, z2, extra_negatives, positive_targets)
        return (torch.logsumexp(negatives, dim=1) - positive).mean()


class DCLWLoss(ContrastiveLoss):
    """Weighted decoupled contrastive loss (DCLW).

    Per anchor: ``ℓ_i = −w_i · s(z1_i, z2_i) + log Σ_neg exp(s(z1_i, n))`` with
    ``w_i = 2 − N · softmax_i(z1_i·z2_i / σ)`` computed without gradient; the
    anchors ``z1_i`` and ``z2_i`` share the weight ``w_i``. The loss is the mean of
    ℓ over all 2N anchors. Under data-parallel training N is the global batch.

    With ``positive_targets``, each half of the anchors (the ``z1`` rows and the
    ``z2`` rows) gets its own weights, from the cosine between each anchor and its
    target.

    Args:
        temperature: τ, which divides the cosine similarities; must be > 0.
        sigma: σ, the temperature of the weighting softmax; must be > 0.
        gather_distributed: As in :class:`ContrastiveLoss`.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sigma: float = 0.5,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__(temperature, gather_distributed)
        _check_positive("sigma", sigma)
        self.sigma = sigma

    def forward(
        self,
        z1: Tensor,
        z2: Tensor,
        extra_negatives: Tensor | None = None,
        positive_targets: Tensor | None = None,
    ) -> Tensor:
        positive, negatives = self.logits(z1, z2, extra_negatives, positive_targets)
        if positive_targets is None:
            weights = dclw_weights(z1, z2, self.sigma, self.gather_distributed)
            weights = weights.repeat(2)
        else:
            n = z1.shape[0]
            cosine = positive.detach() * self.temperature
            weights = torch.cat(
                [
                    decoupling_weights(cosine[:n], self.sigma, self.gather_distributed),
                    decoupling_weights(cosine[n:], self.sigma, self.gather_distributed),
                ]
            )
        return (torch.logsumexp(negatives, dim=1) - weights * positive).mean()


LOSSES: dict[str, Callable[..., ContrastiveLoss]] = {
    "infonce": InfoNCELoss,
    "dcl": DCLLoss,
    "dclw": DCLWLoss,
}


def build_loss(
    name: str,
    temperature: float = 0.1,
    sigma: float = 0.5,
    gather_distributed: bool = True,
) -> ContrastiveLoss:
    """Build a loss from its name in :data:`LOSSES`; ``sigma`` is used by DCLW only."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; pass one of {sorted(LOSSES)}")
    if name == "dclw":
        return DCLWLoss(temperature, sigma, gather_distributed)
    return LOSSES[name](temperature, gather_distributed)
