"""The training configuration, validated once and saved with every run.

This module imports only pydantic and PyYAML, so the command-line parser can use
it without importing torch.
"""

from __future__ import annotations

import difflib
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
        description='Data source: "digits" or a folder (image folder, unlabelled '
        "images, CIFAR-10 or CIFAR-100 python batches, MNIST-style IDX files, or "
        "tar shards).",
    )
    eval_data: str | None = Field(
        default=None,
        description="Labelled source for the kNN monitor's memory bank and test "
        "set; default: the training source's own splits (none if unlabelled).",
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
    crop_min_scale: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Smallest fraction of the image area a random crop keeps; "
        "default: 0.2 up to 64 px, else 0.08 (SimCLR's values).",
    )
    horizontal_flip: bool = Field(
        default=True,
        description="Flip views horizontally; turn off for images whose mirror "
        "image means something else, such as digits or text.",
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
        description="Base learning rate for a global batch of 256; lr_scaling sets "
        "how the run's rate follows the global batch (batch_size x processes).",
    )
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        default="linear",
        description="LR rule for a global batch B: linear lr*B/256, sqrt "
        "lr*sqrt(B/256), or none (lr as given).",
    )
    optimizer: Literal["sgd", "lars", "adamw"] = Field(
        default="sgd",
        description="Optimizer: SGD with momentum, LARS (SGD with layer-wise trust "
        "ratios), or AdamW.",
    )
    momentum: float = Field(
        default=0.9, ge=0, lt=1, description="Momentum of SGD and LARS."
    )
    weight_decay: float = Field(
        default=5e-4,
        ge=0,
        description="Weight decay; biases and normalisation parameters get none.",
    )
    lars_eta: float = Field(
        default=0.001, gt=0, description="Trust coefficient of LARS; used by lars only."
    )
    grad_clip: float | None = Field(
        default=None, gt=0, description="Clip the gradient's total L2 norm to this."
    )
    warmup_epochs: float = Field(
        default=10,
        ge=0,
        description="Linear LR warm-up, in epochs (a fraction of the schedule). "
        "Unless set, runs of 10 epochs or fewer warm up for a tenth of the run.",
    )
    num_workers: int = Field(
        default=4, ge=0, description="Data-loading worker processes; 0 loads inline."
    )
    seed: int = Field(default=0, description="Seed for weights, augmentations, split.")
    knn_k: int = Field(default=200, ge=1, description="Neighbours of the kNN monitor.")
    knn_t: float = Field(
        default=0.1, gt=0, description="Temperature of the kNN monitor's weights."
    )
    log_every_steps: int = Field(
        default=50,
        ge=1,
        description="Write loss, LR and throughput to steps.jsonl and TensorBoard "
        "every this many steps.",
    )
    tensorboard: bool = Field(
        default=True, description="Write TensorBoard event files to the run folder."
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
    method: Literal["simclr", "nnclr"] = Field(
        default="simclr",
        description="Positives: the other view (simclr), or the other view's "
        "nearest neighbour in a support set of past projections (nnclr).",
    )
    support_size: int = Field(
        default=16384,
        ge=1,
        description="Projections in the NNCLR support set (a FIFO queue); used by "
        "nnclr only. Keep it well below the number of training images.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description='Autocast precision; "auto": bf16 on CUDA where supported, '
        "else fp16 on CUDA, fp32 on the CPU.",
    )
    channels_last: bool | None = Field(
        default=None,
        description="Channels-last memory format; default: on for CUDA, off on "
        "the CPU.",
    )
    compile: bool = Field(
        default=False,
        description="Compile the model with torch.compile; the first steps then "
        "take longer, which counts against max_minutes.",
    )
    sync_bn: bool = Field(
        default=False,
        description="Synchronise batch-norm statistics across processes (CUDA only).",
    )
    checkpoint_every: int | None = Field(
        default=None,
        ge=1,
        description="Also save checkpoint.pt every this many steps within an "
        "epoch; by default it is saved at the end of each epoch.",
    )
    stop_at_step: int | None = Field(
        default=None,
        ge=1,
        description="Save a checkpoint and stop after this step, keeping the LR "
        "schedule of the full run; continue it with --resume.",
    )
    resume: str | None = Field(
        default=None,
        description="Run folder or checkpoint.pt to continue from; other flags "
        "given with it replace the checkpoint's settings.",
    )

    @model_validator(mode="after")
    def _check_warmup(self) -> TrainConfig:
        if "warmup_epochs" not in self.model_fields_set and self.warmup_epochs >= (
            self.epochs
        ):
            # The default suits long runs; shrink it rather than reject a short one.
            # object.__setattr__ skips validate_assignment, which would recurse.
            object.__setattr__(self, "warmup_epochs", self.epochs / 10)
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
        """The learning rate of a one-process run; see :meth:`lr_for_world`."""
        return self.lr_for_world(1)

    def lr_for_world(self, world_size: int) -> float:
        """Return the run's peak learning rate for ``world_size`` processes.

        The global batch is ``batch_size * world_size``; ``lr_scaling`` sets the
        rule. This is the only place where the learning rate is scaled.
        """
        global_batch = self.batch_size * world_size
        if self.lr_scaling == "linear":
            return self.lr * global_batch / 256
        if self.lr_scaling == "sqrt":
            return self.lr * (global_batch / 256) ** 0.5
        return self.lr

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
        raise ValueError(
            f"invalid training configuration{source}:\n{describe_errors(exc)}"
        ) from exc


def describe_errors(exc: ValidationError) -> str:
    """Format validation errors one per line: the key, the problem, the value."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, list(TrainConfig.model_fields), 1)
            hint = f"did you mean {close[0]}?" if close else "see `dcl train --help`"
            lines.append(f"  {key}: unknown key; {hint}")
        elif not key:
            # A check across fields: its message names the fields and the fix.
            lines.append(f"  {error['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {error['msg']} (got {error['input']!r})")
    return "\n".join(lines)
