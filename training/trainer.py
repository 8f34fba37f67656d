"""The pretraining loop: one process or data-parallel, resumable, mixed precision.

``train`` runs in one process, or as one rank of a ``torchrun`` launch (NCCL on
CUDA, gloo on the CPU) through the same code. Each epoch ends with the kNN monitor
on rank 0, a line in ``metrics.jsonl`` and ``checkpoint.pt`` in the run folder.
The checkpoint contains everything a resumed run needs: weights, optimizer, gradient
scaler, loss state (the NNCLR support set), step and epoch counters, random number
generator states and the full configuration.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import torch
import torch.distributed as dist
import torchvision
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    load_checkpoint,
    model_from_checkpoint,
    restore_rng_state,
    resume_config,
    rng_state,
    save_checkpoint,
    seed_everything,
)
from training.config import TrainConfig
from training.data import build_datasets
from training.distributed import (
    DistributedContext,
    ResumableSampler,
    cleanup_distributed,
    mean_over_ranks,
    setup_distributed,
)
from training.evaluate import knn_monitor
from training.losses import build_loss
from training.models import build_model
from training.nnclr import NearestNeighbourLoss
from training.optim import (
    StepSchedule,
    build_optimizer,
    learning_rate_at,
    schedule_progress,
)
from training.runlog import RunLog

logger = logging.getLogger(__name__)

__all__ = [
    "StepSchedule",
    "TrainResult",
    "learning_rate_at",
    "load_checkpoint",
    "model_from_checkpoint",
    "resolve_device",
    "resolve_precision",
    "schedule_progress",
    "train",
    "train_step",
]


StopReason = Literal["epoch_end", "finished", "stop_at_step", "interrupted"]


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        checkpoint: Path of ``checkpoint.pt``.
        knn_top1: Weighted kNN top-1 accuracy after the last epoch, in [0, 1];
            NaN when no epoch ended, and on ranks other than 0.
        epochs: Epochs run; the last one may have stopped early.
        steps: Optimizer steps run, including those before a resume.
        wall_seconds: Wall-clock time of this call, including evaluation.
        history: One dict per epoch, as written to ``metrics.jsonl``.
        completed: False when ``stop_at_step`` ended the run before its schedule.
    """

    checkpoint: Path
    knn_top1: float | None
    epochs: int
    steps: int
    wall_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    completed: bool = True


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


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for a precision setting, or ``None`` for float32.

    ``"auto"`` picks bfloat16 on CUDA devices that support it, float16 on other
    CUDA devices, and float32 on the CPU, where autocast is usually slower.

    Raises:
        ValueError: the name is unknown, or bf16 is requested on a CUDA device
            without bfloat16 support.
    """
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp32":
        return None
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                "precision bf16 was requested but this GPU does not support "
                "bfloat16; pass --precision fp16 or fp32"
            )
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    raise ValueError(f"unknown precision {name!r}; pass one of auto, fp32, bf16, fp16")


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    view1: Tensor,
    view2: Tensor,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
) -> Tensor:
    """Run one optimizer step on a batch of two views and return the detached loss.

    The forward pass runs under autocast when ``autocast_dtype`` is set, and the
    loss in float32 outside it. With an enabled ``scaler`` (float16), the backward
    pass is scaled, the gradients are unscaled before clipping, and the scaler
    skips steps whose gradients are not finite. Both views go through the model in
    one forward pass, so batch normalisation computes its statistics over all 2N
    images.

    Raises:
        FloatingPointError: the loss is NaN or infinite without an enabled scaler
            (the step is not applied).
    """
    n = view1.shape[0]
    if scaler is not None and not scaler.is_enabled():
        scaler = None
    with torch.autocast(
        device_type=view1.device.type,
        dtype=autocast_dtype or torch.float32,
        enabled=autocast_dtype is not None,
    ):
        projections = model(torch.cat([view1, view2], dim=0))
    projections = projections.float()
    loss = loss_fn(projections[:n], projections[n:])
    if scaler is None and not torch.isfinite(loss):
        raise FloatingPointError(
            f"the training loss is {loss.item()}; lower the learning rate or raise "
            "the temperature"
        )

    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return loss.detach()


class StopRequest:
    """Turn the first SIGINT (Ctrl-C) or SIGTERM into a request to stop cleanly.

    The training loop checks :attr:`requested` after each step, saves a checkpoint
    and stops. A second SIGINT raises ``KeyboardInterrupt`` at once. Handlers are
    installed only in the main thread, and the previous ones come back on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "%s received: stopping after this step and saving a checkpoint; "
            "press Ctrl-C again to stop at once without saving",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _ignore_interrupts(worker_id: int) -> None:
    """Let data-loading workers ignore Ctrl-C, so the main process can finish."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class RunState:
    """Counters that a checkpoint saves and a resumed run restores.

    Attributes:
        epoch: Number of the current or last epoch, from 1; 0 before the first.
        epoch_step: Steps done in that epoch.
        epoch_finished: Whether that epoch's record and checkpoint are written.
        epoch_loss_sum: Sum of this rank's step losses in the epoch.
        epoch_train_seconds: Training time of the epoch, without evaluation.
        knn_top1: The last kNN top-1 accuracy, NaN before the first.
        completed: Whether the schedule has ended.
        history: One record per finished epoch.
    """

    epoch: int = 0
    epoch_step: int = 0
    epoch_finished: bool = True
    epoch_loss_sum: float = 0.0
    epoch_train_seconds: float = 0.0
    knn_top1: float | None = math.nan
    completed: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class _Run:
    """The objects of one training run and the steps of its loop."""

    def __init__(
        self,
        config: TrainConfig,
        context: DistributedContext,
        checkpoint: dict[str, Any] | None,
    ) -> None:
        self.config = config
        self.context = context
        device = context.device
        self.out_dir = Path(config.out_dir)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        self.metrics_path = self.out_dir / METRICS_NAME
        if context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.out_dir / CONFIG_NAME)

        self.generator = seed_everything(config.seed + context.rank)
        self.splits = build_datasets(
            config.data,
            config.image_size,
            config.seed,
            eval_source=config.eval_data,
            crop_min_scale=config.crop_min_scale,
            horizontal_flip=config.horizontal_flip,
        )
        self.run_log = (
            RunLog(
                self.out_dir,
                config.log_every_steps,
                config.tensorboard,
                append=config.resume is not None,
            )
            if context.is_main
            else None
        )
        self._build_loaders()

        self.autocast_dtype = resolve_precision(config.precision, device)
        self.channels_last = (
            config.channels_last
            if config.channels_last is not None
            else device.type == "cuda"
        )
        self.model = build_model(
            config.arch,
            cifar_stem=config.use_cifar_stem,
            proj_hidden_dim=config.proj_hidden_dim,
            proj_dim=config.proj_dim,
        ).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._convert_sync_batchnorm()

        loss = build_loss(config.loss, config.temperature, config.sigma)
        self.loss_fn: nn.Module = loss
        if config.method == "nnclr":
            self.loss_fn = NearestNeighbourLoss(
                loss, config.support_size, config.proj_dim
            )
        self.loss_fn.to(device)
        self.base_lr = config.lr_for_world(context.world_size)
        self.optimizer = build_optimizer(
            config.optimizer,
            self.model,
            lr=self.base_lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            lars_eta=config.lars_eta,
        )
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=self.autocast_dtype == torch.float16
        )

        self.steps_per_epoch = self.sampler.num_samples // config.batch_size
        total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        self.schedule = StepSchedule(
            total_steps=total_steps,
            base_lr=self.base_lr,
            warmup_fraction=config.warmup_epochs / config.epochs,
            max_seconds=config.max_minutes * 60 if config.max_minutes else None,
        )
        self.state = RunState()
        if checkpoint is not None:
            self._restore(checkpoint)

        self.step_model: nn.Module = self.model
        if context.is_distributed:
            self.step_model = DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None
            )
        if config.compile:
            self.step_model = torch.compile(self.step_model)  # type: ignore[assignment]
        self._log_settings()

    def _build_loaders(self) -> None:
        config, context = self.config, self.context
        per_rank = len(self.splits.train) // context.world_size
        if per_rank < config.batch_size:
            raise ValueError(
                f"batch_size {config.batch_size} is larger than the {per_rank} "
                f"training images per process of {config.data!r} "
                f"({len(self.splits.train)} images, {context.world_size} "
                f"processes); pass a batch_size of at most {per_rank}"
            )
        common: dict[str, Any] = {
            "batch_size": config.batch_size,
            "num_workers": config.num_workers,
            "pin_memory": context.device.type == "cuda",
            "persistent_workers": config.num_workers > 0,
            "worker_init_fn": _ignore_interrupts if config.num_workers > 0 else None,
        }
        self.sampler = ResumableSampler(
            self.splits.train, context.rank, context.world_size, config.seed
        )
        self.train_loader = DataLoader(
            self.splits.train,
            sampler=self.sampler,
            drop_last=True,
            generator=self.generator,
            **common,
        )
        self.memory_loader = DataLoader(self.splits.memory, shuffle=False, **common)
        self.test_loader = DataLoader(self.splits.test, shuffle=False, **common)

    def _convert_sync_batchnorm(self) -> None:
        if not self.config.sync_bn:
            return
        if not self.context.is_distributed:
            logger.info("sync_bn has no effect in a one-process run")
            return
        if self.context.device.type != "cuda":
            raise ValueError(
                "sync_bn needs CUDA, because torch's SyncBatchNorm does not run on "
                "the CPU; drop --sync-bn or train on GPUs"
            )
        self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

    def _log_settings(self) -> None:
        config, context = self.config, self.context
        logger.info(
            "training %s (cifar_stem=%s) with %s/%s on %s x %d: %d steps of %d "
            "images per process per epoch, at most %d steps, %s, precision %s, "
            "channels_last=%s, compile=%s, run folder %s",
            config.arch,
            config.use_cifar_stem,
            config.method,
            config.loss,
            context.device,
            context.world_size,
            self.steps_per_epoch,
            config.batch_size,
            self.schedule.total_steps,
            config.optimizer,
            self.autocast_dtype or torch.float32,
            self.channels_last,
            config.compile,
            self.out_dir,
        )
        logger.info(
            "peak LR %.4g: base %.4g, %s scaling for a global batch of %d (%d x %d "
            "processes) against 256",
            self.base_lr,
            config.lr,
            config.lr_scaling,
            config.batch_size * context.world_size,
            config.batch_size,
            context.world_size,
        )

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        """Load the state of a checkpoint; random number generators come last."""
        saved = checkpoint["config"]
        self.model.load_state_dict(checkpoint["model"])
        if saved.get("optimizer", "sgd") == self.config.optimizer:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        else:
            logger.warning("the optimizer changed, so its state starts afresh")
        self.scaler.load_state_dict(checkpoint["scaler"])
        same_loss = (
            saved.get("method") == self.config.method
            and saved.get("support_size") == self.config.support_size
        )
        if same_loss:
            self.loss_fn.load_state_dict(checkpoint["loss"])
        else:
            logger.warning("the method or support set changed; its state starts afresh")

        schedule = checkpoint["schedule"]
        self.schedule.step = schedule["step"]
        self.schedule.started = time.monotonic() - schedule["elapsed_seconds"]
        self.state = RunState(**checkpoint["state"])
        if self.config.stop_at_step is not None:
            if self.config.stop_at_step <= self.schedule.step:
                raise ValueError(
                    f"stop_at_step {self.config.stop_at_step} is not after the "
                    f"checkpoint's step {self.schedule.step}; pass a later step"
                )
        if self.state.completed and not self.schedule.finished():
            self.state.completed = False

        ranks = checkpoint["rng"]
        if len(ranks) == self.context.world_size:
            restore_rng_state(ranks[self.context.rank], self.generator)
        else:
            logger.warning(
                "the checkpoint was written by %d processes and this run has %d, so "
                "the random number generators start afresh and the data order "
                "changes",
                len(ranks),
                self.context.world_size,
            )
        logger.info(
            "resumed from %s at step %d (epoch %d, %d steps into it)",
            self.config.resume,
            self.schedule.step,
            self.state.epoch,
            self.state.epoch_step,
        )

    def fit(self, started: float) -> TrainResult:
        """Train until the schedule ends, ``stop_at_step``, or a stop signal."""
        state, schedule, config = self.state, self.schedule, self.config
        with StopRequest() as stop:
            while True:
                if state.epoch_finished:
                    if state.epoch >= config.epochs or schedule.finished():
                        break
                    state.epoch += 1
                    state.epoch_step = 0
                    state.epoch_loss_sum = 0.0
                    state.epoch_train_seconds = 0.0
                    state.epoch_finished = False
                self.sampler.set_epoch(state.epoch)
                self.sampler.skip(state.epoch_step * config.batch_size)

                reason = self.train_epoch(stop)
                if reason in ("epoch_end", "finished"):
                    self.end_epoch()
                    continue
                self.save()
                if reason == "interrupted":
                    logger.warning(
                        "stopped at step %d; checkpoint %s; continue with "
                        "`dcl train --resume %s`",
                        schedule.step,
                        self.checkpoint_path,
                        self.out_dir,
                    )
                    raise KeyboardInterrupt
                logger.info(
                    "stopped at step %d as stop_at_step asks; checkpoint %s; "
                    "continue with `dcl train --resume %s`",
                    schedule.step,
                    self.checkpoint_path,
                    self.out_dir,
                )
                return self.result(started)
        state.completed = True
        result = self.result(started)
        if self.run_log is not None:
            self.run_log.close()
        logger.info(
            "finished after %d epochs (%d steps) in %.1f s: kNN top-1 %s, "
            "checkpoint %s",
            result.epochs,
            result.steps,
            result.wall_seconds,
            result.knn_top1,
            self.checkpoint_path,
        )
        return result

    def result(self, started: float) -> TrainResult:
        return TrainResult(
            checkpoint=self.checkpoint_path,
            knn_top1=self.state.knn_top1,
            epochs=self.state.epoch,
            steps=self.schedule.step,
            wall_seconds=time.monotonic() - started,
            history=list(self.state.history),
            completed=self.state.completed,
        )

    def _agree_to_stop(self, stop: StopRequest) -> bool:
        """Return whether any rank was asked to stop; align the ranks' clocks.

        Under data-parallel training with a time limit, all ranks take the largest
        elapsed time, so that they compute the same LR and stop at the same step.
        """
        if not self.context.is_distributed:
            return stop.requested
        clock = time.monotonic() - self.schedule.started
        values = torch.tensor(
            [float(stop.requested), clock],
            dtype=torch.float64,
            device=self.context.device,
        )
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        if self.schedule.max_seconds is not None:
            self.schedule.agreed_elapsed = float(values[1])
        return bool(values[0] > 0)

    def train_epoch(self, stop: StopRequest) -> StopReason:
        """Train over the rest of the current epoch, or until a stop condition."""
        config, state, schedule = self.config, self.state, self.schedule
        device = self.context.device
        memory_format = (
            torch.channels_last if self.channels_last else torch.contiguous_format
        )
        self.model.train()
        epoch_started = time.monotonic()
        reason: StopReason = "epoch_end"
        if self.run_log is not None:
            self.run_log.start_epoch()
        with tqdm(
            self.train_loader,
            desc=f"epoch {state.epoch}/{config.epochs}",
            total=self.steps_per_epoch,
            initial=state.epoch_step,
            leave=False,
            disable=not self.context.is_main,
        ) as bar:
            for (view1, view2), _ in bar:
                lr = schedule.current_lr()
                for group in self.optimizer.param_groups:
                    group["lr"] = lr

                try:
                    loss = train_step(
                        self.step_model,
                        self.loss_fn,
                        self.optimizer,
                        view1.to(
                            device, non_blocking=True, memory_format=memory_format
                        ),
                        view2.to(
                            device, non_blocking=True, memory_format=memory_format
                        ),
                        scaler=self.scaler,
                        autocast_dtype=self.autocast_dtype,
                        grad_clip=config.grad_clip,
                    )
                except FloatingPointError as exc:
                    raise FloatingPointError(
                        f"at step {schedule.step + 1} (lr {lr:g}, temperature "
                        f"{config.temperature:g}), {exc} with --lr and "
                        "--temperature"
                    ) from exc
                loss_value = loss.item()
                state.epoch_loss_sum += loss_value
                state.epoch_step += 1
                schedule.step += 1
                if self.run_log is not None:
                    bar.set_postfix(
                        self.run_log.log_step(
                            schedule.step, loss_value, lr, view1.shape[0]
                        )
                    )

                if self._agree_to_stop(stop):
                    reason = "interrupted"
                elif schedule.finished():
                    reason = "finished"
                elif schedule.step == config.stop_at_step:
                    reason = "stop_at_step"
                elif (
                    config.checkpoint_every is not None
                    and schedule.step % config.checkpoint_every == 0
                ):
                    self.save()
                if reason != "epoch_end":
                    break
        state.epoch_train_seconds += time.monotonic() - epoch_started
        return reason

    def epoch_record(self, mean_loss: float) -> dict[str, Any]:
        """Build the metrics of the epoch that just ended, one line of metrics.jsonl."""
        state = self.state
        return {
            "epoch": state.epoch,
            "step": self.schedule.step,
            "loss": mean_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "knn_top1": state.knn_top1,
            "train_seconds": round(state.epoch_train_seconds, 3),
            "elapsed_seconds": round(self.schedule.elapsed(), 3),
            "skipped_images": self.splits.skipped_images(),
        }

    def end_epoch(self) -> None:
        """Evaluate on rank 0, record the epoch's metrics and save a checkpoint."""
        state, config = self.state, self.config
        mean_loss = mean_over_ranks(
            state.epoch_loss_sum / max(state.epoch_step, 1), self.context.device
        )
        if self.context.is_main:
            state.knn_top1 = knn_monitor(
                self.model,
                self.memory_loader,
                self.test_loader,
                self.context.device,
                config.knn_k,
                config.knn_t,
            )
        record = self.epoch_record(mean_loss)
        state.history.append(record)
        state.epoch_finished = True
        state.completed = state.epoch >= config.epochs or self.schedule.finished()
        if self.context.is_main:
            self.write_metrics(record)
        self.save()

    def write_metrics(self, record: dict[str, Any]) -> None:
        """Append an epoch's record to ``metrics.jsonl`` and log it (rank 0 only)."""
        if self.run_log is not None:
            self.run_log.log_epoch(record)

    def save(self) -> None:
        """Write ``checkpoint.pt`` on rank 0, with every rank's generator states.

        Every rank must call this at the same step, because it gathers the states.
        """
        states = [rng_state(self.generator)]
        if self.context.is_distributed:
            states = [None] * self.context.world_size
            dist.all_gather_object(states, rng_state(self.generator))
        if not self.context.is_main:
            return
        save_checkpoint(self.checkpoint_path, self.checkpoint_payload(states))

    def checkpoint_payload(self, rng_states: list[Any]) -> dict[str, Any]:
        """Collect what a checkpoint stores; see the module docstring."""
        config, model, state = self.config, self.model, self.state
        last = state.history[-1] if state.history else {}
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
            "preprocessing": self.splits.preprocessing.model_dump(mode="json"),
            "dataset": self.splits.name,
            "classes": list(self.splits.classes),
            "epoch": state.epoch,
            "step": self.schedule.step,
            "knn_top1": last.get("knn_top1", math.nan),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "schedule": {
                "step": self.schedule.step,
                "total_steps": self.schedule.total_steps,
                "elapsed_seconds": self.schedule.elapsed(),
            },
            "state": {
                "epoch": state.epoch,
                "epoch_step": state.epoch_step,
                "epoch_finished": state.epoch_finished,
                "epoch_loss_sum": state.epoch_loss_sum,
                "epoch_train_seconds": state.epoch_train_seconds,
                "knn_top1": state.knn_top1,
                "completed": state.completed,
                "history": state.history,
            },
            "rng": rng_states,
            "world_size": self.context.world_size,
            "versions": {
                "torch": str(torch.__version__),
                "torchvision": str(torchvision.__version__),
            },
        }


def train(config: TrainConfig) -> TrainResult:
    """Pretrain an encoder with a contrastive loss and save it in ``config.out_dir``.

    The run stops after ``config.epochs`` epochs, after ``config.max_steps`` steps,
    or after the first step that ends past ``config.max_minutes`` of training,
    whichever comes first. It then still runs the kNN monitor and writes the
    checkpoint. The time limit excludes loading the data and building the model.

    Under ``torchrun`` (``WORLD_SIZE`` and ``RANK`` set) each process calls this
    function; ``batch_size`` is per process. With ``config.resume`` set, the run
    continues from a checkpoint; see :func:`resume_config`. On SIGINT or SIGTERM
    it saves a checkpoint after the current step and raises ``KeyboardInterrupt``.
    """
    started = time.monotonic()
    checkpoint = None
    notes: list[str] = []
    if config.resume is not None:
        config, checkpoint, notes = resume_config(config)

    context = setup_distributed(resolve_device(config.device))
    try:
        if context.is_main:
            for note in notes:
                logger.warning("%s", note)
        run = _Run(config, context, checkpoint)
        if context.is_main:
            history = run.state.history
            run.metrics_path.write_text(
                "".join(json.dumps(record) + "\n" for record in history)
            )
        return run.fit(started)
    finally:
        cleanup_distributed(context)
