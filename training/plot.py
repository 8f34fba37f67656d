"""Loss and kNN-accuracy curves of one or several runs, drawn into a PNG.

Reads each run folder's ``metrics.jsonl`` (one record per epoch) and, where
present, ``steps.jsonl`` (one record every few steps, for a finer loss curve).
Uses matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from training.runlog import METRICS_NAME, STEPS_NAME  # noqa: E402

logger = logging.getLogger(__name__)

# Fields that every plotted record needs; ``knn_top1`` is optional.
REQUIRED_FIELDS = frozenset({"step", "loss"})


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file, skipping blank lines.

    Raises:
        ValueError: a line is not valid JSON.
    """
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}, line {number}, is not valid JSON: {exc}"
            ) from exc
    return records


def load_run(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """Return the epoch records and the step records of a run folder.

    Raises:
        ValueError: the folder has no ``metrics.jsonl``, it has no records, or
            none of the records of a file has ``step`` and ``loss``.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_NAME
    if not metrics_path.is_file():
        raise ValueError(
            f"{metrics_path} not found; pass a run folder written by `dcl train`"
        )
    epochs = _complete_records(metrics_path, read_jsonl(metrics_path))
    steps_path = run_dir / STEPS_NAME
    steps = []
    if steps_path.is_file():
        steps = _complete_records(steps_path, read_jsonl(steps_path))
    if not epochs and not steps:
        raise ValueError(f"{run_dir} has no metrics yet; wait for its first epoch")
    return epochs, steps


def _complete_records(path: Path, records: list[Any]) -> list[dict[str, Any]]:
    """Keep the records that have every field of :data:`REQUIRED_FIELDS`.

    Logs a warning with the count of dropped records, and raises ValueError if
    records exist but none is complete, since the file is then not a run log.
    """
    complete = [
        r for r in records if isinstance(r, dict) and REQUIRED_FIELDS <= r.keys()
    ]
    dropped = len(records) - len(complete)
    if dropped and not complete:
        raise ValueError(
            f"no record in {path} has the fields {sorted(REQUIRED_FIELDS)}; pass a "
            "run folder written by `dcl train`"
        )
    if dropped:
        logger.warning(
            "skipping %d of %d records in %s that lack a field of %s",
            dropped,
            len(records),
            path,
            sorted(REQUIRED_FIELDS),
        )
    return complete


def plot_runs(
    run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None
) -> Path:
    """Draw the loss (left) and kNN top-1 (right) of runs against the step.

    Args:
        run_dirs: Run folders, each with ``metrics.jsonl``.
        out: The PNG to write.
        labels: A legend entry per run; defaults to the folder names.

    Returns:
        The path of the PNG.

    Raises:
        ValueError: no run folders, a folder without metrics, a metrics file
            without a record that has ``step`` and ``loss``, or a label count
            that differs from the run count.
    """
    if not run_dirs:
        raise ValueError("pass at least one run folder")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(
            f"got {len(labels)} labels for {len(run_dirs)} runs; pass one per run"
        )
    names = labels or [Path(d).resolve().name for d in run_dirs]

    figure, (loss_axes, knn_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run_dir, name in zip(run_dirs, names, strict=True):
        epochs, steps = load_run(run_dir)
        (line,) = loss_axes.plot(
            [r["step"] for r in steps] or [r["step"] for r in epochs],
            [r["loss"] for r in steps] or [r["loss"] for r in epochs],
            label=name,
            linewidth=1.2,
            marker="" if steps else "o",
        )
        knn = [
            (r["step"], r["knn_top1"]) for r in epochs if r.get("knn_top1") is not None
        ]
        if knn:
            knn_axes.plot(
                [s for s, _ in knn],
                [100 * a for _, a in knn],
                label=name,
                color=line.get_color(),
                marker="o",
                markersize=3,
            )
        else:
            logger.info("%s has no kNN accuracy (unlabelled data)", run_dir)

    loss_axes.set(title="Training loss", xlabel="step", ylabel="loss")
    knn_axes.set(title="kNN top-1 (test split)", xlabel="step", ylabel="top-1 (%)")
    for axes in (loss_axes, knn_axes):
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
    figure.tight_layout()

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    logger.info("wrote %s (%d runs)", out, len(run_dirs))
    return out
