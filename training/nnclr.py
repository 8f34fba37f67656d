"""Nearest-neighbour positives (NNCLR) on top of the DCL-family losses.

Source: Dwibedi et al., "With a Little Help from My Friends: Nearest-Neighbor
Contrastive Learning of Visual Representations", ICCV 2021 (arXiv 2104.14548).

Formulation used here, for two views with projections ``z1`` and ``z2`` (rows
L2-normalised), ``s(a, b) = a·b / τ`` and a support set Q of past projections:

    NN(z) = argmax_{q ∈ Q} z·q                       (no gradient)
    ℓ_i = −s(z1_i, NN(z2_i)) + log Σ_neg exp(s(z1_i, n))

with the anchors ``z2_i`` and ``NN(z1_i)`` built the same way, and the loss the
mean of ℓ over all 2N anchors. The negatives are DCL's: the 2N − 2 other rows of
the batch (of all ranks under data-parallel training), so the positive stays out
of the denominator. With ``loss=infonce`` the positive joins the denominator, and
with ``loss=dclw`` the weights come from the cosine between each anchor and its
neighbour.

How this differs from the paper: NNCLR uses the InfoNCE denominator over the other
view's rows, and it adds a prediction MLP after the projection head. This module
uses neither. The support set is a FIFO queue of first-view projections from past
steps. It is updated after the loss is computed, so the current batch never serves
as its own neighbour.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.distributed import gather_without_gradient
from training.losses import ContrastiveLoss

logger = logging.getLogger(__name__)


class SupportSet(nn.Module):
    """A FIFO queue of L2-normalised projections, kept in buffers.

    The buffers travel with ``state_dict``, so a resumed run gets the queue back.
    Under data-parallel training, :meth:`enqueue` adds the rows of all ranks, so
    every rank has the same queue.

    Args:
        size: Capacity, in rows; the oldest rows are replaced first once it is full.
        dim: Size of each projection.

    Shape:
        - rows: [size, dim]; only the first ``len(self)`` rows are filled.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(
                f"the support set needs size >= 1 and dim >= 1, got size={size} "
                f"and dim={dim}; pass e.g. support_size=16384"
            )
        self.size = size
        self.register_buffer("rows", torch.zeros(size, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def enqueue(self, projections: Tensor) -> None:
        """Append the rows of all ranks, replacing the oldest once full.

        Shape:
            - projections: [B, dim], not yet normalised.
        """
        rows = F.normalize(gather_without_gradient(projections).float(), dim=1)
        if not torch.isfinite(rows).all():
            # A float16 step that overflowed; the gradient scaler skips it too.
            logger.warning("skipped non-finite projections for the support set")
            return
        if rows.shape[0] > self.size:
            rows = rows[-self.size :]
        count = rows.shape[0]
        slots = (self.position + torch.arange(count, device=rows.device)) % self.size
        self.rows[slots] = rows.to(self.rows.device)
        self.position.copy_((self.position + count) % self.size)
        self.filled.copy_(torch.clamp(self.filled + count, max=self.size))

    @torch.no_grad()
    def nearest(self, queries: Tensor) -> Tensor:
        """Return, for each query, the filled row with the largest cosine similarity.

        Raises:
            ValueError: the support set is still empty.

        Shape:
            - queries: [B, dim], not yet normalised.
            - output: [B, dim], unit rows, without gradient.
        """
        if len(self) == 0:
            raise ValueError("the support set is empty; enqueue projections first")
        filled = self.rows[: len(self)]
        similarity = F.normalize(queries.float(), dim=1) @ filled.T
        return filled[similarity.argmax(dim=1)]


class NearestNeighbourLoss(nn.Module):
    """A contrastive loss whose positives are nearest neighbours from a support set.

    See the module docstring for the formulation. Until the support set contains its
    first rows (the first step of a run), the positive is the other view itself,
    as in the wrapped loss.

    Args:
        loss: The DCL, DCLW or InfoNCE loss that scores anchors against positives.
        support_size: Capacity of the support set, in rows.
        dim: Size of the projections.

    Shape:
        - z1, z2: [N, D] projections, not yet normalised.
        - output: scalar.
    """

    def __init__(self, loss: ContrastiveLoss, support_size: int, dim: int) -> None:
        super().__init__()
        self.loss = loss
        self.support = SupportSet(support_size, dim)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        targets = None
        if len(self.support) > 0:
            # z1_i's positive is the neighbour of z2_i, and z2_i's that of z1_i.
            targets = torch.cat(
                [self.support.nearest(z2), self.support.nearest(z1)]
            ).to(z1.dtype)
        value = self.loss(z1, z2, positive_targets=targets)
        self.support.enqueue(z1.detach())
        return value
