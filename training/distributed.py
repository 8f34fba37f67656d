"""Data-parallel training under ``torchrun``: process groups, gathers, samplers.

One code path serves one process and many: :func:`setup_distributed` reads the
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` variables that ``torchrun`` sets and
returns a one-process context when they are absent. NCCL is used on CUDA and gloo
on the CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

logger = logging.getLogger(__name__)

# Rank 0 evaluates the kNN monitor and writes checkpoints while the other ranks
# wait in their next collective, so the timeout must cover a whole evaluation.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistributedContext:
    """Position of this process in a data-parallel run.

    Attributes:
        rank: Global rank, 0 for one process.
        local_rank: Rank on this machine; selects the CUDA device.
        world_size: Number of processes, 1 for one process.
        device: The device of this process.
        owns_process_group: Whether :func:`setup_distributed` created the process
            group, and so :func:`cleanup_distributed` destroys it.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_process_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs, evaluates and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(
            f"environment variable {name}={value!r} is not an integer; launch with "
            "torchrun, which sets it"
        ) from exc


def setup_distributed(device: torch.device) -> DistributedContext:
    """Join the process group that ``torchrun`` describes, or run as one process.

    Args:
        device: The device type to train on. Under ``torchrun`` on CUDA, each
            process takes the GPU of its ``LOCAL_RANK``.

    Raises:
        ValueError: only part of the ``torchrun`` variables are set, or CUDA has
            fewer GPUs than the processes on this machine.
    """
    world_size = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK")
    if world_size is None and rank is None:
        return DistributedContext(device=device)
    if world_size is None or rank is None:
        raise ValueError(
            "WORLD_SIZE and RANK must be set together; launch with torchrun, or "
            "unset both to train in one process"
        )
    if local_rank is None:
        local_rank = rank
    if world_size == 1:
        return DistributedContext(device=device)

    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} has no GPU: this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes "
                "per machine (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"

    owns_process_group = not dist.is_initialized()
    if owns_process_group:
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
    if rank != 0:
        # Only rank 0 reports progress; the others still report problems.
        logging.getLogger("training").setLevel(logging.WARNING)
    logger.info(
        "data-parallel run: %d processes, backend %s, rank 0 on %s",
        world_size,
        backend,
        device,
    )
    return DistributedContext(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        device=device,
        owns_process_group=owns_process_group,
    )


def cleanup_distributed(context: DistributedContext) -> None:
    """Leave the process group that :func:`setup_distributed` joined, if any."""
    if context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def world_info() -> tuple[int, int]:
    """Return ``(rank, world_size)`` of the current process group, or ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGradient(torch.autograd.Function):
    """All-gather whose backward sends each rank the gradient of its own rows.

    Every rank computes a loss from the gathered rows, so the gradient of a row
    is the sum of the gradients that all ranks computed for it. The backward pass
    therefore sums the incoming gradients over ranks and keeps this rank's slice.
    """

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:  # type: ignore[override]
        rows = rows.contiguous()
        world_size = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.count = rows.shape[0]
        gathered = rows.new_empty((world_size * rows.shape[0], *rows.shape[1:]))
        dist.all_gather_single(gathered, rows)
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((ctx.count, *grad.shape[1:]))
            dist.reduce_scatter_single(out, grad)
            return out
        # gloo has no reduce-scatter, so sum everything and keep this rank's slice.
        summed = grad.clone()
        dist.all_reduce(summed)
        start = ctx.rank * ctx.count
        return summed[start : start + ctx.count]


def gather_with_gradient(rows: Tensor) -> Tensor:
    """Concatenate every rank's ``rows`` in rank order, passing gradients back.

    In one process this returns ``rows`` unchanged. All ranks must pass the same
    shape.

    Shape:
        - rows: [B, ...]
        - output: [world_size * B, ...]
    """
    _, world_size = world_info()
    if world_size == 1:
        return rows
    return _GatherWithGradient.apply(rows)


@torch.no_grad()
def gather_without_gradient(rows: Tensor) -> Tensor:
    """Concatenate every rank's ``rows`` in rank order, detached from the graph."""
    _, world_size = world_info()
    if world_size == 1:
        return rows.detach()
    gathered = rows.new_empty((world_size * rows.shape[0], *rows.shape[1:]))
    dist.all_gather_single(gathered, rows.detach().contiguous())
    return gathered


def any_rank(flag: bool, device: torch.device) -> bool:
    """Return True on every rank when ``flag`` is True on at least one rank."""
    _, world_size = world_info()
    if world_size == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(value: float, device: torch.device) -> float:
    """Return the mean of a number over all ranks (the value itself in one process)."""
    _, world_size = world_info()
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size


def barrier() -> None:
    """Wait for all ranks; does nothing in one process."""
    if world_info()[1] > 1:
        dist.barrier()


class ResumableSampler(DistributedSampler):
    """A shuffling ``DistributedSampler`` that can start part-way through an epoch.

    The order of an epoch depends only on ``seed`` and the epoch (set with
    ``set_epoch``), so a resumed run gets the same images in the same order. With
    one process it is a plain random permutation of the data set.

    Args:
        dataset: The training set.
        rank: Global rank of this process.
        world_size: Number of processes.
        seed: Seed of the permutations, the same on every rank.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int) -> None:
        super().__init__(
            dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.start_index = 0

    def skip(self, count: int) -> None:
        """Skip the first ``count`` indices of this rank in the current epoch only."""
        if not 0 <= count <= self.num_samples:
            raise ValueError(
                f"cannot skip {count} of {self.num_samples} indices; pass a count "
                "within the epoch"
            )
        self.start_index = count

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index
