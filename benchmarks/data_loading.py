"""Measure the data loader's images/s with the SimCLR transform against the step time.

Builds the training set of ``--data`` as ``dcl train`` does, with two SimCLR
views per image. Iterates a ``DataLoader`` over it for ``--batches`` batches at
each ``--workers`` setting. Then times the training step of ResNet-18 (CIFAR
stem) with the DCL loss on a batch of the same size. Loading keeps up with
training when its images/s exceed the step's. Prints a Markdown table.

Example (2 CPU cores)::

    python benchmarks/data_loading.py --data ../shared/data/cifar10 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch.utils.data import DataLoader

from training.data import build_datasets
from training.losses import build_loss
from training.models import build_model
from training.trainer import train_step

logger = logging.getLogger(__name__)


def loader_rate(dataset, batch_size: int, workers: int, batches: int) -> float:
    """Return images/s of ``batches`` batches after a first, untimed batch."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers
    )
    iterator = iter(loader)
    next(iterator)  # starts the workers and fills their prefetch queues
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - started)


def step_rate(image_size: int, batch_size: int, steps: int) -> float:
    """Return images/s of the training step (two views per image), median of steps."""
    model = build_model("resnet18", cifar_stem=image_size <= 64)
    loss_fn = build_loss("dcl", 0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    views = torch.randn(2, batch_size, 3, image_size, image_size)
    train_step(model, loss_fn, optimizer, views[0], views[1])  # warm-up
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        train_step(model, loss_fn, optimizer, views[0], views[1])
        times.append(time.perf_counter() - started)
    return batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="Training data source.")
    parser.add_argument("--image-size", type=int, default=32, help="Crop side, px.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="Timed batches.")
    parser.add_argument("--steps", type=int, default=5, help="Timed model steps.")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads; 0: default."
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    splits = build_datasets(args.data, args.image_size)
    rows = []
    for workers in args.workers:
        rate = loader_rate(splits.train, args.batch_size, workers, args.batches)
        rows.append((f"loader, num_workers={workers}", rate))
    rows.append(
        (
            f"training step (ResNet-18, DCL, batch {args.batch_size})",
            step_rate(args.image_size, args.batch_size, args.steps),
        )
    )

    print(
        f"data: {splits.name}, {args.image_size} px, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print("| stage | images/s |")
    print("|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
