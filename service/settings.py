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
        description="When set, guarded requests need it as `Authorization: Bearer "
        "<key>` or in the X-API-Key header.",
    )
    auth_mode: Literal["writes", "all"] = Field(
        default="writes",
        description="Which requests need the API key: `writes` (POST /v1/items and "
        "DELETE) or `all` (every /v1 route and the demo page). /healthz, /readyz "
        "and /metrics stay open.",
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
    max_batch_fill_wait_ms: float = Field(
        default=25.0,
        ge=0,
        description="Under load, how long the first queued request waits, in "
        "all, for its batch to reach half the images in the service (queued, "
        "being decoded or being embedded), milliseconds. Raised to "
        "max_batch_wait_ms where lower.",
    )
    decode_threads: int = Field(
        default=4,
        gt=0,
        description="Worker threads that decode and preprocess uploaded images "
        "at once; more requests wait for a free one.",
    )
    max_queue_size: int = Field(
        default=256,
        gt=0,
        description="Maximum number of embedding requests waiting for the batcher; "
        "more get 429 with Retry-After.",
    )
    providers: Literal["auto", "cpu", "cuda", "tensorrt"] = Field(
        default="auto",
        description="ONNX Runtime execution provider: `auto` uses CUDA where the "
        "installed onnxruntime has it, `tensorrt` tries TensorRT, then CUDA, then "
        "the CPU.",
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime intra-op threads; 0 lets ONNX Runtime choose "
        "(one per physical core).",
    )
    intra_op_spinning: bool = Field(
        default=False,
        description="Let ONNX Runtime's intra-op threads busy-wait for work "
        "between operators. Spinning saves a little latency on dedicated cores, "
        "but takes CPU time from HTTP handling and image decoding on shared "
        "ones.",
    )
    max_metadata_depth: int = Field(
        default=8, gt=0, description="Nesting depth of a metadata object."
    )
    index_kind: Literal["exact", "hnsw", "ivfpq", "auto"] = Field(
        default="exact",
        description="FAISS index: `exact` (flat inner product), `hnsw`, `ivfpq` "
        "(exact until 312 vectors exist to train it), or `auto`: exact below "
        "100,000 items, HNSW below 2,000,000, IVF-PQ from there on.",
    )
    hnsw_m: int = Field(default=32, gt=0, description="HNSW graph degree (M).")
    hnsw_ef_construction: int = Field(
        default=200, gt=0, description="HNSW candidate list size while adding."
    )
    hnsw_ef_search: int = Field(
        default=64,
        gt=0,
        description="Default HNSW candidate list size per search; a search "
        "request's `ef_search` overrides it.",
    )
    ivf_nprobe: int = Field(
        default=16,
        gt=0,
        description="Default number of IVF lists visited per search; a search "
        "request's `nprobe` overrides it.",
    )
    ivf_rerank_factor: int = Field(
        default=1,
        ge=1,
        le=64,
        description="IVF-PQ only: fetch this many times k candidates per search "
        "and re-rank them by their exact float vectors, read from the SQLite "
        "store; 1 turns re-ranking off. A search request's `rerank_factor` "
        "overrides it.",
    )
    max_tombstone_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="Rebuild an HNSW or IVF-PQ index in the background once this "
        "share of its vectors are deleted or replaced ones.",
    )
    snapshot_every_changes: int = Field(
        default=1000,
        ge=0,
        description="Write an index snapshot once this many changes are not in "
        "the latest one; 0 turns this trigger off.",
    )
    snapshot_every_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Write an index snapshot this many seconds after the latest "
        "one if any change is not in it.",
    )
    snapshots_kept: int = Field(
        default=2, gt=0, description="Number of index snapshots kept on disk."
    )
    reembed_on_model_change: bool = Field(
        default=False,
        description="When the bundle differs from the one the data dir was built "
        "with, re-embed every item from its stored image at start-up instead of "
        "refusing to start. Items added by vector cannot be re-embedded.",
    )
    store_source_images: bool = Field(
        default=True,
        description="Keep the uploaded image bytes of items added by image, so a "
        "new model can re-embed them.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = Field(
        default=False, description="Write log records as one JSON object per line."
    )
