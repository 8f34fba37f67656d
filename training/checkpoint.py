"""Checkpoints of a pretraining run: writing, loading, resuming and RNG states.

A checkpoint is a ``torch.save`` dict that loads with ``weights_only=True``: model
weights, architecture, preprocessing and configuration always; optimizer, schedule,
scaler, loss state and random number generator states when the run can resume.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import TrainConfig
from training.models import ContrastiveModel, build_model

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"

# Settings that a resumed run may change without changing its results.
RESULT_NEUTRAL_FIELDS = {
    "out_dir",
    "resume",
    "stop_at_step",
    "checkpoint_every",
    "knn_k",
    "knn_t",
}


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a generator for data loaders."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    """Capture the random number generators of this process as checkpoint data.

    The NumPy state is stored as tensors and plain numbers, so the checkpoint loads
    with ``torch.load(weights_only=True)``.
    """
    name, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "loader": loader_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["name"],
            saved["keys"].numpy().astype(np.uint32),
            saved["position"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """Turn the lists of a round-tripped ``random.getstate()`` back into tuples."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(item) for item in value)
    return value


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
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        pickle.UnpicklingError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
    ) as exc:
        reason = _first_sentence(exc)
        cause = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        raise ValueError(
            f"cannot read {path} as a checkpoint ({cause}); the file is truncated "
            "or is not a checkpoint. Pass the checkpoint.pt that `dcl train` wrote"
        ) from exc
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{path} contains a {type(checkpoint).__name__}, not a checkpoint dict; "
            "pass the checkpoint.pt that `dcl train` wrote"
        )
    missing = {"model", "config", "arch", "preprocessing"} - set(checkpoint)
    if missing:
        raise ValueError(
            f"{path} is not a dcl-embed checkpoint: it lacks {sorted(missing)}; pass "
            "the checkpoint.pt that `dcl train` wrote"
        )
    return checkpoint


def _first_sentence(error: BaseException) -> str:
    """Return the first sentence of an error's message.

    torch's load errors go on with advice for other cases, such as retrying with
    ``weights_only=False``, which is unsafe for files of unknown origin.
    """
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else ""
    return first_line.split(". ", 1)[0].rstrip(".")


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


def resume_config(config: TrainConfig) -> tuple[TrainConfig, dict[str, Any], list[str]]:
    """Merge a run's saved configuration with the fields set in ``config``.

    ``config.resume`` names the run folder or its ``checkpoint.pt``. The saved
    configuration is the base; the fields that ``config`` sets explicitly
    (``model_fields_set``: the flags and the config file given with ``--resume``)
    replace it. The run folder stays the checkpoint's folder unless ``out_dir`` is
    set, and ``stop_at_step`` applies only when given again.

    Returns:
        The merged configuration, the checkpoint, and warnings for the settings
        that changed in a way that changes the results.

    Raises:
        ValueError: no checkpoint is found, it has no resume state, or the merged
            configuration is invalid.
    """
    if config.resume is None:
        raise ValueError("resume_config needs config.resume; pass --resume RUN_DIR")
    path = Path(config.resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    checkpoint = load_checkpoint(path)
    if "optimizer" not in checkpoint or "schedule" not in checkpoint:
        raise ValueError(
            f"{path} has no optimizer and schedule state, so the run cannot be "
            "resumed; start a new run, or use it only with `dcl export`"
        )

    saved = dict(checkpoint["config"])
    explicit = config.model_dump(mode="json", include=config.model_fields_set)
    merged = {**saved, "stop_at_step": None, **explicit}
    merged["resume"] = str(path)
    if "out_dir" not in explicit:
        merged["out_dir"] = str(path.parent)
    try:
        resumed = TrainConfig.model_validate(merged)
    except ValueError as exc:
        raise ValueError(f"invalid configuration for resuming {path}:\n{exc}") from exc

    warnings = []
    changed = sorted(
        name
        for name, value in explicit.items()
        if name not in RESULT_NEUTRAL_FIELDS and saved.get(name) != value
    )
    if changed:
        details = ", ".join(
            f"{n}: {saved.get(n)!r} -> {explicit[n]!r}" for n in changed
        )
        warnings.append(
            f"resuming with changed settings ({details}); the run will not match "
            "an uninterrupted one"
        )
    if resumed.max_minutes is not None:
        warnings.append(
            "the run is time-bounded (max_minutes), so its LR schedule depends on "
            "the machine's speed and a resumed run cannot match an uninterrupted "
            "one exactly"
        )
    if resumed.num_workers > 0:
        warnings.append(
            f"num_workers={resumed.num_workers}: data-loading workers restart with "
            "new random states, so the augmentations after the resume differ from "
            "those of an uninterrupted run; pass --num-workers 0 for an exact resume"
        )
    return resumed, checkpoint, warnings
