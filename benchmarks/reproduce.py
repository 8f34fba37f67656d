"""Compare InfoNCE, DCL and DCLW across batch sizes on CIFAR-10.

Decoupled Contrastive Learning (Yeh et al., ECCV 2022, arXiv 2110.06848) reports
that removing the positive pair from the InfoNCE denominator helps most at small
batch sizes. This script pretrains one encoder per cell of the grid
loss x batch size x seed and evaluates each with the weighted kNN monitor
(k=200, t=0.1) and the linear probe of ``training.probe`` (logistic regression
on frozen, standardised encoder features, L2 penalty chosen on a 10 % validation
part of the training images), both on the test images.

Every cell uses the same model, augmentations, optimiser, seed list and number of
images seen: the epochs are fixed, so a smaller batch takes more steps. The
optimiser is SGD with momentum 0.9 and weight decay on every parameter, with a
linear warm-up and a cosine decay per step. The learning rate follows the
trainer's linear scaling, ``lr * batch_size / 256``.

Each finished cell is written to ``<out>/<loss>-b<batch>-s<seed>.json`` with its
configuration, metrics, wall time and hardware, and a rerun skips the cells that
are already there, so an interrupted grid continues where it stopped.

Budgets (see :data:`BUDGETS`):

* ``cpu``: ResNet-18 with the CIFAR stem at 8 px input, a fixed class-balanced
  subset of 512 training images (also the kNN memory and the probe's training
  set), 2 epochs (1,024 images seen per cell), 1,000 test images. Measured on
  2 CPU cores: 5 s to 3.8 minutes per cell (mean 59 s), 24 minutes for the 24
  cells, with other jobs sharing the cores for most of the run.
* ``cpu16``: the same model at 16 px, 2,048 training images, 4 epochs (8,192
  images seen per cell), 1,000 test images. It trains past an untrained encoder
  (kNN 30-35 % against 23.5 %); measured on 2 CPU cores: 1.6 to 10.7 minutes per
  cell, depending on the batch size and the load from other jobs.
* ``gpu``: ResNet-18 with the CIFAR stem at 32 px, all 50,000 training images,
  200 epochs, all 10,000 test images.

Examples::

    python benchmarks/reproduce.py --budget cpu --data PATH/TO/cifar10 \\
        --out runs/reproduce-cpu --threads 2
    python benchmarks/reproduce.py --budget gpu --data PATH/TO/cifar10 \\
        --out runs/reproduce-gpu
    python benchmarks/reproduce.py --report --out runs/reproduce-cpu \\
        --table docs/table.md --plot docs/reproduce-batch-size.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset

from training.config import TrainConfig
from training.data import DataSplits, build_datasets
from training.evaluate import extract_features, knn_accuracy
from training.losses import build_loss
from training.models import build_model
from training.optim import learning_rate_at
from training.probe import LinearProbeResult, linear_probe
from training.trainer import resolve_device, seed_everything, train_step

logger = logging.getLogger(__name__)

LOSS_NAMES = ("infonce", "dcl", "dclw")
DEFAULT_BATCH_SIZES = (32, 64, 128, 256)
DEFAULT_SEEDS = (0, 1, 2)
# Batch sizes that run every seed by default; the others run the first seed only.
DEFAULT_SEEDED_BATCH_SIZES = (32, 256)
UNTRAINED_NAME = "untrained.json"


@dataclass(frozen=True)
class Budget:
    """Everything that a cell shares with the other cells of its grid.

    Attributes:
        name: Budget name, stored with every cell.
        arch: torchvision ResNet name.
        cifar_stem: Use the 3x3 stride-1 stem without max-pool.
        image_size: Side of the crops, in pixels.
        train_images: Size of the fixed class-balanced training subset, or
            ``None`` for all training images. The subset is also the kNN memory
            bank and the linear probe's training set.
        test_images: Size of the fixed class-balanced test subset, or ``None``.
        epochs: Passes over the training subset; the same for every batch size.
        warmup_epochs: Linear LR warm-up, in epochs.
        lr: Base learning rate for a batch of 256 (SGD, momentum 0.9).
        weight_decay: SGD weight decay.
        temperature: τ of every loss.
        sigma: σ of the DCLW weighting.
        proj_dim: Size of the projections.
        knn_k: Neighbours of the kNN monitor.
        knn_t: Temperature of the kNN monitor's weights.
        probe_max_iter: L-BFGS iterations per fit of the linear probe
            (``training.probe.linear_probe``).
        num_workers: Data-loading worker processes.
        subset_seed: Seed that picks the subsets; fixed across cells.
        max_steps: Stop each cell after this many steps (smoke tests only; it
            breaks the equal number of images seen).
    """

    name: str
    arch: str = "resnet18"
    cifar_stem: bool = True
    image_size: int = 32
    train_images: int | None = None
    test_images: int | None = None
    epochs: int = 200
    warmup_epochs: float = 10
    lr: float = 0.3
    weight_decay: float = 5e-4
    temperature: float = 0.1
    sigma: float = 0.5
    proj_dim: int = 128
    knn_k: int = 200
    knn_t: float = 0.1
    probe_max_iter: int = 100
    num_workers: int = 4
    subset_seed: int = 0
    max_steps: int | None = None


BUDGETS: dict[str, Budget] = {
    # Sized by measurement on 2 CPU cores that other training runs shared (load
    # average 3 to 8). There, ResNet-18 with the CIFAR stem trained on 3 to 30
    # images per second at 16 px, too slow for 24 cells in 40 minutes. The CPU
    # budget therefore uses 8 px crops, which cost about a quarter per image.
    # NOTE: at this size no cell beat an untrained encoder (see --untrained), so
    # the cpu grid checks the runner, not the paper's claim.
    "cpu": Budget(
        name="cpu",
        image_size=8,
        train_images=512,
        test_images=1000,
        epochs=2,
        warmup_epochs=0.2,
        num_workers=0,
    ),
    # Four times the pixels and eight times the images seen of `cpu`: enough to
    # move the encoder past its random initialisation. Estimated from the cells
    # run so far, the 24 cells take about two hours on 2 idle CPU cores.
    "cpu16": Budget(
        name="cpu16",
        image_size=16,
        train_images=2048,
        test_images=1000,
        epochs=4,
        warmup_epochs=0.4,
        num_workers=0,
    ),
    "gpu": Budget(name="gpu"),
}


@dataclass(frozen=True)
class Cell:
    """One pretraining run of the grid."""

    loss: str
    batch_size: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.loss}-b{self.batch_size}-s{self.seed}"


def plan_cells(
    losses: Sequence[str],
    batch_sizes: Sequence[int],
    seeds: Sequence[int],
    seeded_batch_sizes: Sequence[int] | None = None,
) -> list[Cell]:
    """List the cells of a grid, all first-seed cells before the extra seeds.

    Args:
        losses: Names from :data:`LOSS_NAMES`.
        batch_sizes: Images per step.
        seeds: Seeds; the first one runs at every batch size.
        seeded_batch_sizes: Batch sizes that also run the other seeds; ``None``
            runs every seed at every batch size.

    Raises:
        ValueError: a loss is unknown, or a list is empty.
    """
    unknown = sorted(set(losses) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(f"unknown losses {unknown}; pass some of {list(LOSS_NAMES)}")
    if not losses or not batch_sizes or not seeds:
        raise ValueError("pass at least one loss, one batch size and one seed")

    cells = [Cell(loss, b, seeds[0]) for b in batch_sizes for loss in losses]
    for seed in seeds[1:]:
        for batch_size in batch_sizes:
            if seeded_batch_sizes is not None and batch_size not in seeded_batch_sizes:
                continue
            cells.extend(Cell(loss, batch_size, seed) for loss in losses)
    return cells


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Return the label of every item of a data set without decoding images.

    Reads ``labels`` (array data sets, tar shards) or ``targets`` (ImageFolder),
    follows the indices of a ``Subset`` and looks through wrappers that keep the
    wrapped data set in ``dataset``.
    """
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    for name in ("labels", "targets"):
        labels = getattr(dataset, name, None)
        if labels is not None:
            return np.asarray(labels)
    inner = getattr(dataset, "dataset", None)
    if isinstance(inner, Dataset):
        return dataset_labels(inner)
    raise ValueError(
        f"cannot read labels from a {type(dataset).__name__}; pass a data set with "
        "labels or targets, or a Subset or wrapper of one"
    )


def balanced_indices(labels: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """Pick ``count`` indices with as equal a share per class as the data allows.

    Returns all indices, sorted, when ``count`` is ``None`` or not smaller than
    the number of labels. The pick depends only on ``labels``, ``count`` and
    ``seed``.
    """
    if count is None or count >= len(labels):
        return np.arange(len(labels))
    if count < 1:
        raise ValueError(f"a subset needs at least 1 image, got count={count}")

    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    # Take one image per class in turn, so classes stay balanced until the
    # smaller ones run out.
    depth = 0
    while len(picked) < count:
        for members in by_class:
            if depth < len(members) and len(picked) < count:
                picked.append(int(members[depth]))
        depth += 1
    return np.sort(np.asarray(picked))


def load_splits(source: str | Path, budget: Budget) -> DataSplits:
    """Build the data sets of a budget: the fixed train and test subsets."""
    splits = build_datasets(source, budget.image_size, seed=budget.subset_seed)
    train_idx = balanced_indices(
        dataset_labels(splits.memory), budget.train_images, budget.subset_seed
    )
    test_idx = balanced_indices(
        dataset_labels(splits.test), budget.test_images, budget.subset_seed
    )
    splits.train = Subset(splits.train, train_idx.tolist())
    splits.memory = Subset(splits.memory, train_idx.tolist())
    splits.test = Subset(splits.test, test_idx.tolist())
    logger.info(
        "budget %s: %d training images (memory bank), %d test images, %d px",
        budget.name,
        len(splits.train),
        len(splits.test),
        budget.image_size,
    )
    return splits


def cell_config(cell: Cell, budget: Budget, source: str, out_dir: Path) -> TrainConfig:
    """Return the trainer configuration of a cell, validated by ``TrainConfig``."""
    return TrainConfig(
        data=str(source),
        arch=budget.arch,
        cifar_stem=budget.cifar_stem,
        image_size=budget.image_size,
        loss=cell.loss,
        temperature=budget.temperature,
        sigma=budget.sigma,
        batch_size=cell.batch_size,
        epochs=budget.epochs,
        max_steps=budget.max_steps,
        lr=budget.lr,
        weight_decay=budget.weight_decay,
        warmup_epochs=budget.warmup_epochs,
        num_workers=budget.num_workers,
        seed=cell.seed,
        knn_k=budget.knn_k,
        knn_t=budget.knn_t,
        out_dir=out_dir,
        device="auto",
        proj_dim=budget.proj_dim,
    )


def hardware_info(device: torch.device) -> dict[str, Any]:
    """Describe the machine a cell ran on."""
    info: dict[str, Any] = {
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def evaluate_encoder(
    model: torch.nn.Module,
    splits: DataSplits,
    budget: Budget,
    device: torch.device,
    batch_size: int = 256,
) -> tuple[float, LinearProbeResult]:
    """Return the kNN top-1 and the linear probe result of a model's encoder.

    The memory bank and the probe's training set are the budget's training
    subset, seen through the evaluation transform.
    """
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": budget.num_workers,
        "pin_memory": device.type == "cuda",
    }
    memory_loader = DataLoader(splits.memory, **common)
    test_loader = DataLoader(splits.test, **common)
    memory_features, memory_labels = extract_features(model, memory_loader, device)
    test_features, test_labels = extract_features(model, test_loader, device)
    knn_top1 = knn_accuracy(
        memory_features,
        memory_labels,
        test_features,
        test_labels,
        budget.knn_k,
        budget.knn_t,
    )
    probe = linear_probe(
        memory_features,
        memory_labels,
        test_features,
        test_labels,
        max_iter=budget.probe_max_iter,
    )
    return knn_top1, probe


def run_cell(
    cell: Cell, budget: Budget, splits: DataSplits, source: str, out: Path
) -> dict[str, Any]:
    """Pretrain and evaluate one cell and return its record (not yet saved)."""
    started = time.monotonic()
    config = cell_config(cell, budget, source, out / cell.key)
    device = resolve_device(config.device)
    generator = seed_everything(cell.seed)

    model = build_model(
        config.arch, cifar_stem=config.use_cifar_stem, proj_dim=config.proj_dim
    ).to(device)
    loss_fn = build_loss(config.loss, config.temperature, config.sigma)
    # NOTE: weight decay applies to every parameter here, while `dcl train` now
    # exempts normalisation and bias parameters (training.optim.parameter_groups).
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.scaled_lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    if len(splits.train) < cell.batch_size:
        raise ValueError(
            f"batch size {cell.batch_size} is larger than the {len(splits.train)} "
            "training images of the budget; pass smaller --batch-sizes"
        )
    common: dict[str, Any] = {
        "num_workers": config.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": config.num_workers > 0,
    }
    train_loader = DataLoader(
        splits.train,
        batch_size=cell.batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        **common,
    )
    total_steps = config.epochs * len(train_loader)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup_fraction = config.warmup_epochs / config.epochs

    model.train()
    step = 0
    losses: list[float] = []
    while step < total_steps:
        epoch_losses = []
        for (view1, view2), _ in train_loader:
            # The LR of a step is read at the step's midpoint, as the trainer does.
            lr = learning_rate_at(
                (step + 0.5) / total_steps, config.scaled_lr, warmup_fraction
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(
                model, loss_fn, optimizer, view1.to(device), view2.to(device)
            )
            epoch_losses.append(float(loss))
            step += 1
            if step >= total_steps:
                break
        losses.append(statistics.fmean(epoch_losses))
        logger.info(
            "%s epoch %d: loss %.4f, %d/%d steps",
            cell.key,
            len(losses),
            losses[-1],
            step,
            total_steps,
        )
    train_seconds = time.monotonic() - started

    eval_started = time.monotonic()
    knn_top1, probe = evaluate_encoder(
        model, splits, budget, device, max(cell.batch_size, 256)
    )
    linear_top1 = probe.top1
    eval_seconds = time.monotonic() - eval_started
    logger.info(
        "%s: kNN top-1 %.4f, linear top-1 %.4f, %d steps, %.0f s",
        cell.key,
        knn_top1,
        linear_top1,
        step,
        time.monotonic() - started,
    )

    return {
        "cell": asdict(cell),
        "budget": asdict(budget),
        "config": config.model_dump(mode="json"),
        "data": {
            "source": str(source),
            "name": splits.name,
            "train_images": len(splits.train),
            "memory_images": len(splits.memory),
            "test_images": len(splits.test),
        },
        "metrics": {
            "knn_top1": knn_top1,
            "linear_top1": linear_top1,
            "linear_probe_weight_decay": probe.weight_decay,
            "steps": step,
            "images_seen": step * cell.batch_size,
            "epoch_losses": losses,
        },
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "wall_seconds": round(time.monotonic() - started, 2),
        "hardware": hardware_info(device),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
    }


def run_untrained(
    budget: Budget, seeds: Sequence[int], out: Path, source: str | Path
) -> dict[str, Any]:
    """Evaluate untrained encoders (random initialisation) as a floor for the grid.

    Writes ``<out>/untrained.json`` with the kNN and linear top-1 per seed.
    """
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(source, budget)
    device = resolve_device("auto")
    results = []
    for seed in seeds:
        seed_everything(seed)
        model = build_model(
            budget.arch, cifar_stem=budget.cifar_stem, proj_dim=budget.proj_dim
        ).to(device)
        knn_top1, probe = evaluate_encoder(model, splits, budget, device)
        logger.info(
            "untrained, seed %d: kNN top-1 %.4f, linear top-1 %.4f",
            seed,
            knn_top1,
            probe.top1,
        )
        results.append({"seed": seed, "knn_top1": knn_top1, "linear_top1": probe.top1})
    record = {
        "budget": asdict(budget),
        "source": str(source),
        "untrained": results,
        "hardware": hardware_info(device),
    }
    write_json(out / UNTRAINED_NAME, record)
    return record


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write a record through a temporary file, so a crash never truncates it."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)


def check_budget(stored: dict[str, Any], budget: Budget, path: Path) -> None:
    """Raise if a stored cell was run under another budget than this grid's."""
    if stored.get("budget") != asdict(budget):
        raise ValueError(
            f"{path} was run with budget {stored.get('budget')}, not {asdict(budget)}; "
            "pass another --out folder, or delete the folder to start over"
        )


def run_grid(
    budget: Budget,
    cells: Sequence[Cell],
    out: Path,
    source: str | Path,
) -> list[dict[str, Any]]:
    """Run the cells that have no record in ``out`` yet and return all records.

    Raises:
        ValueError: a stored record in ``out`` has another budget.
    """
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    pending: list[Cell] = []
    for cell in cells:
        path = out / f"{cell.key}.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            check_budget(stored, budget, path)
            records.append(stored)
        else:
            pending.append(cell)
    logger.info(
        "%d of %d cells already done in %s; running %d",
        len(records),
        len(cells),
        out,
        len(pending),
    )
    if not pending:
        return records

    splits = load_splits(source, budget)
    for number, cell in enumerate(pending, start=1):
        logger.info("cell %d/%d: %s", number, len(pending), cell.key)
        record = run_cell(cell, budget, splits, str(source), out)
        write_json(out / f"{cell.key}.json", record)
        records.append(record)
    return records


def load_records(out: Path) -> list[dict[str, Any]]:
    """Read every finished cell in ``out``.

    Raises:
        ValueError: ``out`` has no cell records.
    """
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*-b*-s*.json"))]
    if not records:
        raise ValueError(f"{out} has no finished cells; run the grid first")
    return records


@dataclass
class Summary:
    """Accuracy of one loss at one batch size over its seeds, in [0, 1]."""

    loss: str
    batch_size: int
    seeds: list[int]
    knn: list[float]
    linear: list[float]


def summarise(records: Sequence[dict[str, Any]]) -> list[Summary]:
    """Group records by loss and batch size, in loss then batch-size order."""
    groups: dict[tuple[str, int], Summary] = {}
    for record in records:
        cell = record["cell"]
        key = (cell["loss"], cell["batch_size"])
        summary = groups.setdefault(key, Summary(key[0], key[1], [], [], []))
        summary.seeds.append(cell["seed"])
        summary.knn.append(record["metrics"]["knn_top1"])
        summary.linear.append(record["metrics"]["linear_top1"])
    order = {name: i for i, name in enumerate(LOSS_NAMES)}
    return sorted(groups.values(), key=lambda s: (order[s.loss], s.batch_size))


def format_accuracy(values: Sequence[float]) -> str:
    """Format accuracies as a percentage, with the min-max range over seeds."""
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    low, high = 100 * min(values), 100 * max(values)
    return f"{mean:.1f} ({low:.1f}–{high:.1f}, n={len(values)})"


def markdown_table(summaries: Sequence[Summary]) -> str:
    """Render top-1 kNN and linear accuracy per loss and batch size as Markdown.

    Each entry is the mean over seeds in percent, followed by the min-max range
    and the number of seeds when there is more than one.
    """
    batch_sizes = sorted({s.batch_size for s in summaries})
    by_key = {(s.loss, s.batch_size): s for s in summaries}
    losses = [name for name in LOSS_NAMES if any(s.loss == name for s in summaries)]
    header = "| metric | loss | " + " | ".join(f"batch {b}" for b in batch_sizes)
    lines = [header + " |", "|---|---|" + "---:|" * len(batch_sizes)]
    for metric in ("knn", "linear"):
        label = "kNN top-1 %" if metric == "knn" else "linear top-1 %"
        for loss in losses:
            entries = []
            for b in batch_sizes:
                summary = by_key.get((loss, b))
                entries.append(
                    format_accuracy(getattr(summary, metric)) if summary else "–"
                )
            lines.append(f"| {label} | {loss} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


def plot_summaries(
    summaries: Sequence[Summary],
    path: Path,
    title: str,
    untrained: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Plot accuracy against batch size, one line per loss, min-max error bars.

    With ``untrained`` results, a grey band marks their min-max range.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for axis, metric, label in (
        (axes[0], "knn", "kNN top-1 (%)"),
        (axes[1], "linear", "linear probe top-1 (%)"),
    ):
        for loss in LOSS_NAMES:
            rows = [s for s in summaries if s.loss == loss]
            if not rows:
                continue
            x = [s.batch_size for s in rows]
            values = [[100 * v for v in getattr(s, metric)] for s in rows]
            means = [statistics.fmean(v) for v in values]
            below = [m - min(v) for m, v in zip(means, values, strict=True)]
            above = [max(v) - m for m, v in zip(means, values, strict=True)]
            axis.errorbar(
                x, means, yerr=[below, above], marker="o", capsize=3, label=loss
            )
        if untrained:
            floor = [100 * r[f"{metric}_top1"] for r in untrained]
            axis.axhspan(
                min(floor), max(floor), color="grey", alpha=0.2, label="untrained"
            )
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({s.batch_size for s in summaries}))
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xlabel("batch size")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report(out: Path, table: Path | None, plot: Path | None) -> str:
    """Summarise the finished cells of ``out`` into a Markdown table and a plot.

    Returns:
        The Markdown table, which is also written to ``table`` (default
        ``<out>/report.md``). The plot goes to ``plot`` (default
        ``<out>/batch-size.png``).
    """
    records = load_records(out)
    summaries = summarise(records)
    text = markdown_table(summaries)
    budget = records[0]["budget"]["name"]
    wall = sum(r["wall_seconds"] for r in records)
    footer = (
        f"\n{len(records)} cells, budget {budget}, {wall / 60:.1f} min of cell time.\n"
    )
    untrained: list[dict[str, Any]] | None = None
    untrained_path = out / UNTRAINED_NAME
    if untrained_path.is_file():
        untrained = json.loads(untrained_path.read_text())["untrained"]
        knn = format_accuracy([r["knn_top1"] for r in untrained])
        linear = format_accuracy([r["linear_top1"] for r in untrained])
        footer += (
            "Untrained encoder (random initialisation, same evaluation): "
            f"kNN top-1 % {knn}, linear top-1 % {linear}.\n"
        )
    table = table or out / "report.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(text + footer)
    plot = plot or out / "batch-size.png"
    plot_summaries(
        summaries, plot, f"CIFAR-10, budget {budget}: accuracy by batch size", untrained
    )
    logger.info("wrote %s and %s", table, plot)
    return text + footer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="cpu",
        help="Model, data and schedule shared by every cell (see BUDGETS).",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="Data source: the CIFAR-10 shard folder, or any source that "
        'training.data accepts, such as "digits". Required unless --report.',
    )
    parser.add_argument(
        "--losses", nargs="+", default=list(LOSS_NAMES), help="Losses to run."
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=list(DEFAULT_BATCH_SIZES),
        help="Images per step; every batch size sees the same number of images.",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=list(DEFAULT_SEEDS),
        help="Seeds of the weights, augmentations and data order.",
    )
    parser.add_argument(
        "--seeded-batch-sizes",
        nargs="*",
        type=int,
        default=list(DEFAULT_SEEDED_BATCH_SIZES),
        help="Batch sizes that run every seed; the others run the first seed. "
        "Pass no value to run every seed at every batch size.",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="Stop each cell after this many steps (smoke runs only).",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--out", type=Path, required=True, help="Folder of the cells.")
    parser.add_argument(
        "--report", action="store_true", help="Summarise the cells in --out and exit."
    )
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="Evaluate untrained encoders for each of --seeds and exit.",
    )
    parser.add_argument("--table", type=Path, default=None, help="Markdown table path.")
    parser.add_argument("--plot", type=Path, default=None, help="PNG plot path.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    if args.report:
        logger.info("report:\n%s", report(args.out, args.table, args.plot))
        return

    if args.data is None:
        raise SystemExit("--data is required to run cells; pass the CIFAR-10 folder")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    if args.max_steps is not None:
        budget = replace(budget, max_steps=args.max_steps)
    if args.untrained:
        run_untrained(budget, args.seeds, args.out, args.data)
        return
    seeded = args.seeded_batch_sizes or None
    cells = plan_cells(args.losses, args.batch_sizes, args.seeds, seeded)
    grid_started = time.monotonic()
    records = run_grid(budget, cells, args.out, args.data)
    logger.info(
        "grid of %d cells done in %.1f min (this run)",
        len(records),
        (time.monotonic() - grid_started) / 60,
    )


if __name__ == "__main__":
    main()
