"""The training configuration, validated once and saved with every run.

This module imports only pydantic and PyYAML, so the command-line parser can use
it without importing torch.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

logger = logging.getLogger(__name__)

# Images up to this side get the CIFAR stem (3x3 stride-1 conv1, no max-pool)
# unless `cifar_stem` is set.
CIFAR_STEM_MAX_SIZE = 64


def _default_out_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


class TrainConfig(BaseModel):
    """Settings of one pretraining run.

    The defaults pretrain ResNet-18 on 32 px images at batch 256 for 200 epochs
    with SGD (momentum 0.9) and a cosine schedule. For a bounded run such as a
    demo, set ``max_minutes``: the schedule then ends at whichever bound, epochs or
    minutes, comes first.

    NOTE: the defaults of lr, weight_decay and warmup_epochs are common SimCLR
    settings for CIFAR-10 and were not tuned for DCL.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str = Field(
        default="digits",
        description='Data source: "digits" or a folder (image folder, CIFAR-10 '
        "python batches, or CIFAR-10 shards).",
    )
    arch: Literal["resnet18", "resnet34", "resnet50"] = Field(
        default="resnet18", description="Encoder architecture (torchvision name)."
    )
    cifar_stem: bool | None = Field(
        default=None,
        description="Use the 3x3 stride-1 stem without max-pool; default: on for "
        f"images up to {CIFAR_STEM_MAX_SIZE} px.",
    )
    image_size: int = Field(
        default=32, ge=8, le=1024, description="Side of the training crops, pixels."
    )
    loss: Literal["infonce", "dcl", "dclw"] = Field(
        default="dcl", description="Contrastive loss."
    )
    temperature: float = Field(
        default=0.1, gt=0, description="Temperature τ of the loss (dimensionless)."
    )
    sigma: float = Field(
        default=0.5, gt=0, description="σ of the DCLW weighting; used by dclw only."
    )
    batch_size: int = Field(
        default=256, ge=2, description="Images per step (each gives two views)."
    )
    epochs: int = Field(default=200, ge=1, description="Epochs to train at most.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Stop after this many optimizer steps (for smoke tests).",
    )
    max_minutes: float | None = Field(
        default=None,
        gt=0,
        description="Stop after the first step that ends past this many minutes of "
        "training, then evaluate and save; the LR schedule ends there too.",
    )
    lr: float = Field(
        default=0.3,
        gt=0,
        description="Base learning rate for a batch of 256; the run uses "
        "lr * batch_size / 256.",
    )
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(
        default=5e-4, ge=0, description="SGD weight decay (L2 penalty)."
    )
    warmup_epochs: float = Field(
        default=10,
        ge=0,
        description="Linear LR warm-up, in epochs (a fraction of the schedule).",
    )
    num_workers: int = Field(
        default=4, ge=0, description="Data-loading worker processes; 0 loads inline."
    )
    seed: int = Field(default=0, description="Seed for weights, augmentations, split.")
    knn_k: int = Field(default=200, ge=1, description="Neighbours of the kNN monitor.")
    knn_t: float = Field(
        default=0.1, gt=0, description="Temperature of the kNN monitor's weights."
    )
    out_dir: Path = Field(
        default_factory=_default_out_dir,
        description="Run folder for checkpoint.pt, metrics.jsonl and config.yaml.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description='"auto" uses CUDA when available.'
    )
    proj_dim: int = Field(default=128, ge=1, description="Size of the projections.")
    proj_hidden_dim: int | None = Field(
        default=None,
        ge=1,
        description="Hidden width of the projection head; default: the encoder's "
        "feature size (512 or 2048).",
    )

    @model_validator(mode="after")
    def _check_warmup(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be less than epochs "
                f"({self.epochs}); pass a smaller warmup_epochs, or 0"
            )
        return self

    @property
    def use_cifar_stem(self) -> bool:
        """Whether the encoder gets the CIFAR stem, resolving ``None`` by size."""
        if self.cifar_stem is not None:
            return self.cifar_stem
        return self.image_size <= CIFAR_STEM_MAX_SIZE

    @property
    def scaled_lr(self) -> float:
        """The learning rate that the optimizer uses: lr * batch_size / 256."""
        return self.lr * self.batch_size / 256

    def save(self, path: Path) -> Path:
        """Write the configuration as YAML (``.yaml``/``.yml``) or JSON."""
        data = self.model_dump(mode="json")
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            path.write_text(json.dumps(data, indent=2) + "\n")
        return path


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Read a YAML or JSON config file, apply overrides and validate the result.

    Args:
        path: A ``.yaml``, ``.yml`` or ``.json`` file, or ``None`` for the defaults.
        overrides: Field values that replace the file's; ``None`` values are
            ignored.

    Raises:
        ValueError: the file is missing or unreadable, or a key or value is
            invalid.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} not found; pass an existing file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(
                f"config file {path} must contain a mapping of field names to "
                f"values, got {type(loaded).__name__}"
            )
        data.update(loaded or {})
    data.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        source = f" in {path}" if path is not None else ""
        raise ValueError(f"invalid training configuration{source}:\n{exc}") from exc
