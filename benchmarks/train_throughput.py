"""Compare training throughput (views/s) of this project's step with lightly's.

Both sides train the same torchvision ResNet-18 backbone (CIFAR stem: 3x3
stride-1 conv1, no max-pool), a two-layer projection head (512 -> 512 -> 128 with
batch norm), the DCL loss at temperature 0.1 and SGD (lr 0.06, momentum 0.9,
weight decay 5e-4), on the same random batch:

- dcl-embed: ``training.trainer.train_step`` with ``build_model`` and
  ``build_loss("dcl")``; both views go through the model in one forward pass.
- lightly: ``lightly.loss.DCLLoss`` and ``lightly.models.modules.
  SimCLRProjectionHead``, one forward pass per view as in lightly's SimCLR
  example, then ``zero_grad``, ``backward`` and ``step``.

After ``--warmup`` steps of each, ``--rounds`` rounds alternate between the two
sides, ``--steps`` timed steps per side per round, so that drifts in machine load
hit both alike. Reports the median views/s over rounds and the ratio. Prints a
Markdown table.

Example (2 CPU cores, about two minutes)::

    python benchmarks/train_throughput.py --batch-size 64 --image-size 32
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import logging
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet18

from training.losses import build_loss
from training.models import build_model
from training.trainer import train_step

logger = logging.getLogger(__name__)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)


def project_step(batch: torch.Tensor) -> Callable[[], None]:
    model = build_model("resnet18", cifar_stem=True, proj_hidden_dim=512, proj_dim=128)
    model.train()
    loss_fn = build_loss("dcl", 0.1)
    optimizer = sgd(model)

    def step() -> None:
        train_step(model, loss_fn, optimizer, batch[0], batch[1])

    return step


def lightly_step(batch: torch.Tensor) -> Callable[[], None]:
    from lightly.loss import DCLLoss as LightlyDCLLoss
    from lightly.models.modules import SimCLRProjectionHead

    backbone = resnet18(weights=None)
    backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()
    backbone.fc = nn.Identity()
    model = nn.Sequential(backbone, SimCLRProjectionHead(512, 512, 128))
    model.train()
    loss_fn = LightlyDCLLoss(temperature=0.1)
    optimizer = sgd(model)

    def step() -> None:
        z0 = model(batch[0])
        z1 = model(batch[1])
        loss = loss_fn(z0, z1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def timed(step: Callable[[], None], steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps each.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per round.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    size = args.image_size
    batch = torch.randn(2, args.batch_size, 3, size, size)
    sides = {"dcl-embed": project_step(batch), "lightly": lightly_step(batch)}
    for step in sides.values():
        timed(step, args.warmup)

    rates: dict[str, list[float]] = {name: [] for name in sides}
    views = 2 * args.batch_size * args.steps
    for round_index in range(args.rounds):
        for name, step in sides.items():
            rates[name].append(views / timed(step, args.steps))
        logger.info(
            "round %d: %s",
            round_index + 1,
            ", ".join(f"{n} {r[-1]:.1f} views/s" for n, r in rates.items()),
        )

    medians = {name: statistics.median(r) for name, r in rates.items()}
    lightly_version = importlib.metadata.version("lightly")
    print(
        f"date: {datetime.date.today()}, torch {torch.__version__}, lightly "
        f"{lightly_version}, {platform.processor() or platform.machine()}, "
        f"{args.threads} torch threads"
    )
    print(
        f"ResNet-18 (CIFAR stem), {size} px, batch {args.batch_size} (x2 views), "
        f"{args.rounds} rounds of {args.steps} steps\n"
    )
    print("| step | median views/s | min | max |")
    print("|---|---:|---:|---:|")
    for name, values in rates.items():
        print(
            f"| {name} | {medians[name]:.1f} | {min(values):.1f} | {max(values):.1f} |"
        )
    print(
        f"\nratio dcl-embed / lightly: {medians['dcl-embed'] / medians['lightly']:.3f}"
    )


if __name__ == "__main__":
    main()
