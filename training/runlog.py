"""The metrics of a training run: ``metrics.jsonl``, ``steps.jsonl``, TensorBoard.

A :class:`RunLog` writes one JSON line per epoch to ``metrics.jsonl``, one per
``log_every_steps`` steps to ``steps.jsonl``, and both as scalars to TensorBoard
event files in the run folder (``tensorboard --logdir RUN_DIR``). TensorBoard is
optional: without the ``tensorboard`` package only the JSON lines are written.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import Tensor

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
STEPS_NAME = "steps.jsonl"
# Weight of the newest step in the smoothed throughput shown on the progress bar.
THROUGHPUT_SMOOTHING = 0.1


def _scalar(value: Any) -> float | None:
    """Return a finite float for TensorBoard, or None for non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class RunLog:
    """Writer of the per-epoch and per-step metrics of one run.

    Args:
        out_dir: The run folder; created if missing.
        log_every_steps: Write a step record every this many steps.
        tensorboard: Also write TensorBoard event files (needs ``tensorboard``).
        append: Keep existing ``metrics.jsonl`` and ``steps.jsonl`` lines (for a
            resumed run) instead of starting them empty.
    """

    def __init__(
        self,
        out_dir: str | Path,
        log_every_steps: int = 50,
        tensorboard: bool = True,
        append: bool = False,
    ) -> None:
        if log_every_steps < 1:
            raise ValueError(f"log_every_steps must be >= 1, got {log_every_steps}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / METRICS_NAME
        self.steps_path = self.out_dir / STEPS_NAME
        if not append:
            self.metrics_path.write_text("")
            self.steps_path.write_text("")
        self.log_every_steps = log_every_steps
        self.images_per_second: float | None = None
        self._last_step_time: float | None = None
        self._writer = self._open_writer() if tensorboard else None

    def _open_writer(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning(
                "tensorboard is not installed, so %s gets no TensorBoard events; "
                "install it with `pip install tensorboard`",
                self.out_dir,
            )
            return None
        return SummaryWriter(log_dir=str(self.out_dir))

    def log_step(
        self, step: int, loss: Tensor | float, lr: float, batch_images: int
    ) -> dict[str, str]:
        """Record one optimizer step and return the progress-bar fields.

        Throughput is measured between consecutive calls, so it includes data
        loading, and is smoothed exponentially. Every ``log_every_steps`` steps
        the step, loss, learning rate and throughput are written.

        Args:
            step: Optimizer steps done, counting this one.
            loss: The step's loss (a tensor is read with ``.item()``).
            lr: The step's learning rate.
            batch_images: Images in the step's batch (each gives two views).

        Returns:
            ``loss``, ``lr`` and ``img/s`` formatted for ``tqdm.set_postfix``.
        """
        now = time.monotonic()
        if self._last_step_time is not None and now > self._last_step_time:
            rate = batch_images / (now - self._last_step_time)
            if self.images_per_second is None:
                self.images_per_second = rate
            else:
                self.images_per_second += THROUGHPUT_SMOOTHING * (
                    rate - self.images_per_second
                )
        self._last_step_time = now

        loss_value = float(loss.item() if isinstance(loss, Tensor) else loss)
        if step % self.log_every_steps == 0:
            record = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "images_per_second": self.images_per_second,
            }
            with self.steps_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self._add_scalars("step", record, step)

        throughput = self.images_per_second
        return {
            "loss": f"{loss_value:.4f}",
            "lr": f"{lr:.4g}",
            "img/s": f"{throughput:.0f}" if throughput is not None else "-",
        }

    def start_epoch(self) -> None:
        """Restart the throughput clock, so the pause for evaluation is not counted."""
        self._last_step_time = None

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Write an epoch record to ``metrics.jsonl`` and TensorBoard, and log it.

        ``record`` needs ``epoch`` and ``step``; ``knn_top1`` may be ``None`` when
        the kNN monitor was skipped.
        """
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._add_scalars("epoch", record, int(record["step"]))
        knn = record.get("knn_top1")
        logger.info(
            "epoch %d: loss %.4f, kNN top-1 %s, %.1f s training",
            record["epoch"],
            record.get("loss", float("nan")),
            f"{knn:.4f}" if knn is not None else "skipped (no labels)",
            record.get("train_seconds", float("nan")),
        )
        skipped = record.get("skipped_images")
        if skipped:
            logger.warning("%d unreadable images skipped so far", skipped)

    def _add_scalars(self, prefix: str, record: dict[str, Any], step: int) -> None:
        if self._writer is None:
            return
        for key, value in record.items():
            scalar = _scalar(value)
            if scalar is not None and key != "step":
                self._writer.add_scalar(f"{prefix}/{key}", scalar, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
