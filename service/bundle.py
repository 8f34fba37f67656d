"""The model bundle: the only contract between training and the service.

A bundle is a folder with two files:

- ``model.onnx``: input ``images``, float32 [N, 3, H, W], already normalised, with a
  dynamic batch axis; output ``embeddings``, float32 [N, D], L2-normalised inside the
  graph.
- ``bundle.json``: a :class:`BundleMetadata`, which states the preprocessing, the
  embedding size, the training run that made the model, and the sha256 of
  ``model.onnx``.

This module needs only pydantic and the standard library, so that both sides can
import it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT_VERSION = 1
MODEL_FILENAME = "model.onnx"
METADATA_FILENAME = "bundle.json"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


class BundleError(ValueError):
    """A bundle folder is missing, corrupt, or does not match its metadata."""


class Preprocessing(BaseModel):
    """The evaluation transform that the encoder expects.

    The image is converted to RGB, its shorter side is resized to ``resize_size``
    pixels with ``interpolation``, it is center-cropped to ``crop_size`` square,
    scaled to [0, 1], and normalised per channel with ``mean`` and ``std``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize_size: int = Field(gt=0, description="Shorter side after resizing, pixels.")
    crop_size: int = Field(gt=0, description="Side of the center crop, pixels.")
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @model_validator(mode="after")
    def _check_sizes(self) -> Preprocessing:
        if self.crop_size > self.resize_size:
            raise ValueError(
                f"crop_size {self.crop_size} is larger than resize_size "
                f"{self.resize_size}; use crop_size <= resize_size"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std {self.std} must be positive in every channel")
        return self


class TrainingProvenance(BaseModel):
    """The training run that produced the encoder."""

    model_config = ConfigDict(extra="allow")

    dataset: str
    loss: str
    temperature: float
    batch_size: int
    epochs: int
    knn_top1: float | None = Field(
        default=None, description="Weighted kNN top-1 accuracy, in [0, 1]."
    )
    seed: int | None = None


class BundleMetadata(BaseModel):
    """Contents of ``bundle.json``."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    architecture: str = Field(description="torchvision name, e.g. resnet18.")
    cifar_stem: bool = Field(
        description="True for the 3x3 stride-1 stem without max-pool."
    )
    preprocessing: Preprocessing
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    embedding_dim: int = Field(gt=0)
    metric: Literal["cosine"] = Field(
        default="cosine",
        description="Embeddings are L2-normalised, so inner product is cosine.",
    )
    training: TrainingProvenance
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: str = Field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds")
    )
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _check_version(self) -> BundleMetadata:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"bundle format_version {self.format_version} is not supported; "
                f"this release reads version {FORMAT_VERSION}, so re-export the "
                "bundle with a matching dcl-embed"
            )
        return self


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hash a file in chunks and return the hex digest."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_metadata(bundle_dir: Path, metadata: BundleMetadata) -> Path:
    """Write ``bundle.json`` into ``bundle_dir`` and return its path."""
    path = bundle_dir / METADATA_FILENAME
    path.write_text(metadata.model_dump_json(indent=2) + "\n")
    return path


def load_metadata(bundle_dir: str | Path, verify_hash: bool = True) -> BundleMetadata:
    """Read and validate a bundle's metadata, and check ``model.onnx`` against it.

    Raises:
        BundleError: the folder, a file, or a field is missing or invalid, or the
            sha256 of ``model.onnx`` differs from the one in ``bundle.json``.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(
            f"bundle folder {bundle_dir} not found; pass the folder that "
            f"`dcl export` wrote (it contains {MODEL_FILENAME} and {METADATA_FILENAME})"
        )

    metadata_path = bundle_dir / METADATA_FILENAME
    model_path = bundle_dir / MODEL_FILENAME
    for path in (metadata_path, model_path):
        if not path.is_file():
            raise BundleError(
                f"{path} not found; the bundle is incomplete, so export it again "
                "with `dcl export`"
            )

    try:
        raw = json.loads(metadata_path.read_text())
        metadata = BundleMetadata.model_validate(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{metadata_path} is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        raise BundleError(f"{metadata_path} is invalid:\n{exc}") from exc

    if verify_hash:
        actual = sha256_file(model_path)
        if actual != metadata.onnx_sha256:
            raise BundleError(
                f"{model_path} has sha256 {actual}, but {metadata_path} expects "
                f"{metadata.onnx_sha256}; the model file was changed or corrupted, "
                "so export the bundle again"
            )
    return metadata
