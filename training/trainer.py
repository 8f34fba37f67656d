"""The pretraining loop: SGD with momentum, a cosine LR schedule, a kNN monitor.

One process on one device (CPU or CUDA), in float32. Each epoch ends with the kNN
monitor, a line in ``metrics.jsonl`` and ``checkpoint.pt`` in the run folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.config import TrainConfig
from training.data import DataSplits, build_datasets
from training.evaluate import knn_monitor
from training.losses import build_loss
from training.models import ContrastiveModel, build_model

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        checkpoint: Path of ``checkpoint.pt``.
        knn_top1: Weighted kNN top-1 accuracy after the last epoch, in [0, 1].
        epochs: Epochs run; the last one may have stopped early.
        steps: Optimizer steps run.
        wall_seconds: Wall-clock time of the run, including evaluation.
        history: One dict per epoch, as written to ``metrics.jsonl``.
    """

    checkpoint: Path
    knn_top1: float
    epochs: int
    steps: int
    wall_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """Map ``"auto"``, ``"cpu"`` or ``"cuda"`` to a device, checking CUDA exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            'device "cuda" was requested but CUDA is not available; pass '
            '--device cpu or "auto"'
        )
    if name not in ("cpu", "cuda"):
        raise ValueError(f'unknown device {name!r}; pass "auto", "cpu" or "cuda"')
    return torch.device(name)


def learning_rate_at(progress: float, base_lr: float, warmup_fraction: float) -> float:
    """Return the LR at a point of the schedule: linear warm-up, then cosine to 0.

    Args:
        progress: Fraction of the schedule done, in [0, 1]; values outside are
            clamped.
        base_lr: Peak learning rate, reached at the end of the warm-up.
        warmup_fraction: Fraction of the schedule spent warming up, in [0, 1).
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_fraction:
        return base_lr * progress / warmup_fraction
    decay = (progress - warmup_fraction) / (1.0 - warmup_fraction)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * decay))


def schedule_progress(
    step: int, total_steps: int, elapsed_seconds: float, max_seconds: float | None
) -> float:
    """Return how far the run is through its schedule, by steps or by time.

    The step is measured at its midpoint, so neither the first nor the last step
    gets a learning rate of exactly zero. With a time limit, the larger of the two
    fractions wins, so a run stopped by time still ends its cosine decay.

    NOTE: with a time limit, the LR of each step depends on the machine's speed, so
    such runs are not reproducible step for step.
    """
    progress = (step + 0.5) / total_steps
    if max_seconds is not None:
        progress = max(progress, elapsed_seconds / max_seconds)
    return min(progress, 1.0)


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    view1: Tensor,
    view2: Tensor,
) -> Tensor:
    """Run one optimizer step on a batch of two views and return the detached loss.

    Both views go through the model in one forward pass, so batch normalisation
    computes its statistics over all 2N images.

    Raises:
        FloatingPointError: the loss is NaN or infinite (the step is not applied).
    """
    n = view1.shape[0]
    projections = model(torch.cat([view1, view2], dim=0))
    loss = loss_fn(projections[:n], projections[n:])
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"the training loss is {loss.item()}; lower the learning rate or raise "
            "the temperature"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a generator for data loaders."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint through a temporary file, so a crash never truncates it."""
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`train` onto the CPU.

    Raises:
        ValueError: the file is missing or is not such a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"checkpoint {path} not found; pass the checkpoint.pt of a run"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"model", "config", "arch", "preprocessing"} - set(checkpoint)
    if missing:
        raise ValueError(
            f"{path} is not a dcl-embed checkpoint: it lacks {sorted(missing)}; pass "
            "the checkpoint.pt that `dcl train` wrote"
        )
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> ContrastiveModel:
    """Rebuild the model of a checkpoint and load its weights."""
    arch = checkpoint["arch"]
    model = build_model(
        arch["arch"],
        cifar_stem=arch["cifar_stem"],
        proj_hidden_dim=arch["proj_hidden_dim"],
        proj_dim=arch["proj_dim"],
    )
    model.load_state_dict(checkpoint["model"])
    return model


def _loaders(
    config: TrainConfig, device: torch.device, generator: torch.Generator
) -> tuple[DataLoader, DataLoader, DataLoader, DataSplits]:
    splits = build_datasets(config.data, config.image_size, config.seed)
    if len(splits.train) < config.batch_size:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the "
            f"{len(splits.train)} training images of {config.data!r}; pass a "
            f"batch_size of at most {len(splits.train)}"
        )
    common: dict[str, Any] = {
        "batch_size": config.batch_size,
        "num_workers": config.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": config.num_workers > 0,
    }
    train_loader = DataLoader(
        splits.train, shuffle=True, drop_last=True, generator=generator, **common
    )
    memory_loader = DataLoader(splits.memory, shuffle=False, **common)
    test_loader = DataLoader(splits.test, shuffle=False, **common)
    return train_loader, memory_loader, test_loader, splits


@dataclass
class StepSchedule:
    """The step counter, the LR schedule and the stopping bounds of a run.

    Attributes:
        total_steps: Steps planned by the epoch and step bounds.
        base_lr: Peak learning rate.
        warmup_fraction: Fraction of the schedule spent warming up.
        max_seconds: Time limit of the training loop, or ``None``.
        started: ``time.monotonic()`` when the time limit starts counting.
        step: Optimizer steps done.
    """

    total_steps: int
    base_lr: float
    warmup_fraction: float
    max_seconds: float | None = None
    started: float = field(default_factory=time.monotonic)
    step: int = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def current_lr(self) -> float:
        """Return the learning rate for the next step."""
        progress = schedule_progress(
            self.step, self.total_steps, self.elapsed(), self.max_seconds
        )
        return learning_rate_at(progress, self.base_lr, self.warmup_fraction)

    def finished(self) -> bool:
        """Return True once the step bound or the time limit is reached."""
        out_of_time = (
            self.max_seconds is not None and self.elapsed() >= self.max_seconds
        )
        return self.step >= self.total_steps or out_of_time


def train_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    schedule: StepSchedule,
    description: str = "train",
) -> tuple[float, float]:
    """Train over one pass of ``loader``, stopping early when the schedule is done.

    Returns:
        The mean loss of the steps run and the last learning rate.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    steps = 0
    lr = schedule.current_lr()
    with tqdm(loader, desc=description, leave=False) as bar:
        for (view1, view2), _ in bar:
            lr = schedule.current_lr()
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss = train_step(
                model,
                loss_fn,
                optimizer,
                view1.to(device, non_blocking=True),
                view2.to(device, non_blocking=True),
            )
            loss_sum += loss
            steps += 1
            schedule.step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.4g}")

            if schedule.finished():
                break
    return float(loss_sum) / max(steps, 1), lr


def train(config: TrainConfig) -> TrainResult:
    """Pretrain an encoder with a contrastive loss and save it in ``config.out_dir``.

    The run stops after ``config.epochs`` epochs, after ``config.max_steps`` steps,
    or after the first step that ends past ``config.max_minutes`` of training,
    whichever comes first. It then still runs the kNN monitor and writes the
    checkpoint. The time limit excludes loading the data and building the model.
    """
    # TODO: DDP under torchrun. The losses already accept `extra_negatives`, for
    # rows gathered from other ranks with a gather that passes gradients back.
    run_started = time.monotonic()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save(out_dir / CONFIG_NAME)
    metrics_path = out_dir / METRICS_NAME
    metrics_path.write_text("")

    device = resolve_device(config.device)
    generator = seed_everything(config.seed)
    train_loader, memory_loader, test_loader, splits = _loaders(
        config, device, generator
    )

    model = build_model(
        config.arch,
        cifar_stem=config.use_cifar_stem,
        proj_hidden_dim=config.proj_hidden_dim,
        proj_dim=config.proj_dim,
    ).to(device)
    loss_fn = build_loss(config.loss, config.temperature, config.sigma)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.scaled_lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )

    steps_per_epoch = len(train_loader)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    logger.info(
        "training %s (cifar_stem=%s) with %s on %s: %d steps of %d images per "
        "epoch, at most %d steps, LR %.4g (= %.4g * %d / 256), run folder %s",
        config.arch,
        config.use_cifar_stem,
        config.loss,
        device,
        steps_per_epoch,
        config.batch_size,
        total_steps,
        config.scaled_lr,
        config.lr,
        config.batch_size,
        out_dir,
    )

    history: list[dict[str, Any]] = []
    epoch = 0
    knn_top1 = 0.0
    checkpoint_path = out_dir / CHECKPOINT_NAME
    schedule = StepSchedule(
        total_steps=total_steps,
        base_lr=config.scaled_lr,
        warmup_fraction=config.warmup_epochs / config.epochs,
        max_seconds=config.max_minutes * 60 if config.max_minutes else None,
    )
    while epoch < config.epochs and not schedule.finished():
        epoch += 1
        epoch_started = time.monotonic()
        mean_loss, lr = train_epoch(
            model,
            loss_fn,
            optimizer,
            train_loader,
            device,
            schedule,
            description=f"epoch {epoch}/{config.epochs}",
        )
        train_seconds = time.monotonic() - epoch_started

        knn_top1 = knn_monitor(
            model, memory_loader, test_loader, device, config.knn_k, config.knn_t
        )
        record = {
            "epoch": epoch,
            "step": schedule.step,
            "loss": mean_loss,
            "lr": lr,
            "knn_top1": knn_top1,
            "train_seconds": round(train_seconds, 3),
            "elapsed_seconds": round(schedule.elapsed(), 3),
        }
        history.append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info(
            "epoch %d: loss %.4f, kNN top-1 %.4f, %.1f s training",
            epoch,
            mean_loss,
            knn_top1,
            train_seconds,
        )
        save_checkpoint(
            checkpoint_path, _checkpoint_payload(model, config, splits, record)
        )

    wall_seconds = time.monotonic() - run_started
    logger.info(
        "finished after %d epochs (%d steps) in %.1f s: kNN top-1 %.4f, checkpoint %s",
        epoch,
        schedule.step,
        wall_seconds,
        knn_top1,
        checkpoint_path,
    )
    return TrainResult(
        checkpoint=checkpoint_path,
        knn_top1=knn_top1,
        epochs=epoch,
        steps=schedule.step,
        wall_seconds=wall_seconds,
        history=history,
    )


def _checkpoint_payload(
    model: ContrastiveModel,
    config: TrainConfig,
    splits: DataSplits,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Collect what a checkpoint stores: weights, full config, model arguments."""
    return {
        "model": model.state_dict(),
        "config": config.model_dump(mode="json"),
        "arch": {
            "arch": config.arch,
            "cifar_stem": config.use_cifar_stem,
            "feature_dim": model.encoder.feature_dim,
            "proj_hidden_dim": model.head.layers[0].out_features,
            "proj_dim": config.proj_dim,
            "image_size": config.image_size,
        },
        "preprocessing": splits.preprocessing.model_dump(mode="json"),
        "dataset": splits.name,
        "classes": list(splits.classes),
        "epoch": record["epoch"],
        "step": record["step"],
        "knn_top1": record["knn_top1"],
        "versions": {
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
        },
    }
