"""Service configuration, read from ``DCL_``-prefixed environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Settings for the embedding and search service.

    Every field can be set from the environment, e.g. ``DCL_BUNDLE_DIR`` or
    ``DCL_MAX_K``. Build an instance in ``main`` or the app's lifespan, never at
    import.
    """

    model_config = SettingsConfigDict(env_prefix="DCL_", extra="ignore")

    bundle_dir: Path = Field(description="Model bundle folder written by `dcl export`.")
    data_dir: Path = Field(
        description="Folder for the SQLite item store and the FAISS snapshots."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(
        default=None,
        description="When set, write requests need it in the X-API-Key header.",
    )
    max_image_bytes: int = Field(default=10 * MIB, gt=0, description="Per file.")
    max_image_pixels: int = Field(
        default=40_000_000,
        gt=0,
        description="Per image, width times height; also PIL's decompression-bomb "
        "limit.",
    )
    max_images_per_request: int = Field(default=64, gt=0)
    max_request_bytes: int = Field(
        default=128 * MIB, gt=0, description="Whole request body, all parts together."
    )
    max_k: int = Field(default=1000, gt=0)
    max_id_length: int = Field(default=256, gt=0)
    max_metadata_bytes: int = Field(
        default=16 * 1024, gt=0, description="Metadata object, encoded as JSON."
    )
    thumbnail_size: int = Field(
        default=96, gt=0, description="Longer side of stored thumbnails, pixels."
    )
    max_batch_size: int = Field(
        default=64,
        gt=0,
        description="Maximum number of images in one ONNX Runtime call, summed "
        "over the concurrent requests that share it.",
    )
    max_batch_wait_ms: float = Field(
        default=2.0,
        ge=0,
        description="How long the first queued request waits for others to join "
        "its batch, milliseconds.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
