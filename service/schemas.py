"""Request and response models of the HTTP API.

Limits that come from the settings (``max_k``, id length, metadata size, items
per request, embedding size) are checked by validators that read a
:class:`Limits` from the validation context, so every violation gets the same
422 response that names the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import from_json


@dataclass(frozen=True)
class Limits:
    """Request bounds, passed to validators as ``context={"limits": ...}``."""

    max_k: int = 1000
    max_id_length: int = 256
    max_metadata_bytes: int = 16 * 1024
    max_metadata_depth: int = 8
    max_items_per_request: int = 64
    dim: int | None = None


def _limits(info: ValidationInfo) -> Limits:
    context = info.context or {}
    limits = context.get("limits")
    return limits if isinstance(limits, Limits) else Limits()


def check_k(k: int, info: ValidationInfo) -> int:
    limits = _limits(info)
    if k > limits.max_k:
        raise ValueError(f"k is {k}, more than the limit of {limits.max_k}; lower k")
    return k


def check_id(item_id: str, info: ValidationInfo) -> str:
    limits = _limits(info)
    if len(item_id) > limits.max_id_length:
        raise ValueError(
            f"id has {len(item_id)} characters, more than the limit of "
            f"{limits.max_id_length}; use a shorter id"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in item_id):
        raise ValueError("id contains control characters; remove them")
    if item_id.endswith("/thumbnail"):
        raise ValueError(
            "id ends with '/thumbnail', which clashes with the thumbnail URL; "
            "choose another id"
        )
    return item_id


def check_metadata(metadata: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    limits = _limits(info)
    try:
        # Standard JSON has no NaN or Infinity, and SQLite's JSON functions
        # reject a stored document that contains them.
        encoded = json.dumps(metadata, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise ValueError(
            "metadata contains NaN or Infinity, which JSON does not allow; send "
            "null or a string in their place"
        ) from exc
    size = len(encoded.encode())
    if size > limits.max_metadata_bytes:
        raise ValueError(
            f"metadata is {size} bytes as JSON, more than the limit of "
            f"{limits.max_metadata_bytes}; store large data elsewhere and keep a "
            "reference in metadata"
        )
    depth = _json_depth(metadata)
    if depth > limits.max_metadata_depth:
        raise ValueError(
            f"metadata is nested {depth} levels deep, more than the limit of "
            f"{limits.max_metadata_depth}; flatten it"
        )
    return metadata


def _json_depth(value: object) -> int:
    """Return the nesting depth of a JSON value; a flat object has depth 1."""
    depth = 0
    level: list[object] = [value]
    while level:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            break
        depth += 1
        level = [
            child
            for container in containers
            for child in (
                container.values() if isinstance(container, dict) else container
            )
        ]
    return depth


def normalise_vector(vector: list[float], info: ValidationInfo) -> list[float]:
    """Check the size of a vector and scale it to unit L2 norm."""
    limits = _limits(info)
    if limits.dim is not None and len(vector) != limits.dim:
        raise ValueError(
            f"vector has {len(vector)} values, but the model's embeddings have "
            f"{limits.dim}; send a {limits.dim}-dimensional vector"
        )
    if not all(math.isfinite(x) for x in vector):
        raise ValueError("vector contains NaN or infinite values; send finite numbers")
    peak = max((abs(x) for x in vector), default=0.0)
    if peak == 0.0:
        raise ValueError(
            "vector is all zeros, so it has no direction to compare by cosine; "
            "send a non-zero vector"
        )
    # Dividing by the largest magnitude first keeps the squares from overflowing
    # (values near 1e308) or underflowing to zero (values near 1e-200).
    scaled = [x / peak for x in vector]
    norm = math.sqrt(math.fsum(x * x for x in scaled))
    return [x / norm for x in scaled]


_K_FIELD = Field(default=10, ge=1, description="Number of results, 1 to max_k.")
_ID_FIELD = Field(min_length=1, description="Item id chosen by the client.")


class ModelRef(BaseModel):
    """The model that made a response's vectors."""

    sha256: str
    architecture: str


class EmbedResponse(BaseModel):
    """Embeddings of the uploaded images, in upload order."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "embeddings": [[0.6, 0.8]],
                    "dim": 2,
                    "model": {"sha256": "9f2c" * 16, "architecture": "resnet18"},
                }
            ]
        }
    )

    embeddings: list[list[float]]
    dim: int
    model: ModelRef


MAX_EF_SEARCH = 4096
MAX_NPROBE = 65_536
# IVF-PQ re-ranking reads k times this many float vectors from the store at most.
MAX_RERANK_FACTOR = 64
MAX_FILTER_KEYS = 16
FilterScalar = StrictStr | StrictBool | StrictInt | StrictFloat | None


class SearchOptions(BaseModel):
    """Per-request search parameters and metadata filter."""

    ef_search: int | None = Field(
        default=None,
        ge=1,
        le=MAX_EF_SEARCH,
        description="HNSW candidate list size for this search; larger finds more "
        "true neighbours, slower. Ignored by other index kinds.",
    )
    nprobe: int | None = Field(
        default=None,
        ge=1,
        le=MAX_NPROBE,
        description="IVF lists visited for this search; larger finds more true "
        "neighbours, slower. Ignored by other index kinds.",
    )
    rerank_factor: int | None = Field(
        default=None,
        ge=1,
        le=MAX_RERANK_FACTOR,
        description="IVF-PQ only: fetch this many times k candidates and re-rank "
        "them by exact cosine on the stored vectors; 1 turns re-ranking off. "
        "Ignored by other index kinds.",
    )
    filter: dict[str, FilterScalar] | None = Field(
        default=None,
        description="Keep only items whose metadata has each of these top-level "
        'keys with this exact value, e.g. {"label": "cat"}. With the exact index '
        "k results come back whenever k items match; HNSW and IVF-PQ may return "
        "fewer for a selective filter.",
    )

    @field_validator("filter", mode="before")
    @classmethod
    def _parse_filter(cls, value: object) -> object:
        if isinstance(value, str | bytes):
            try:
                value = from_json(value)
            except ValueError as exc:
                raise ValueError(
                    f"filter is not valid JSON ({exc}); send a JSON object such as "
                    '{"label": "cat"}'
                ) from exc
        if isinstance(value, dict):
            if not value:
                raise ValueError(
                    "filter is empty; leave it out or give at least one key"
                )
            if "" in value:
                raise ValueError(
                    'filter has an empty key ""; name a top-level metadata key'
                )
            if any(
                isinstance(v, float) and not math.isfinite(v) for v in value.values()
            ):
                raise ValueError(
                    "filter contains NaN or Infinity, which no stored metadata "
                    "holds; filter on a finite number, a string, a boolean or null"
                )
            if len(value) > MAX_FILTER_KEYS:
                raise ValueError(
                    f"filter has {len(value)} keys, more than the limit of "
                    f"{MAX_FILTER_KEYS}; filter on fewer keys"
                )
        return value


class SearchRequest(SearchOptions):
    """Search by a query vector or by the vector of a stored item.

    Send exactly one of ``vector`` and ``id``. A search by id leaves that item
    out of its own results.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"vector": [0.1, 0.2, 0.3], "k": 5}, {"id": "cat-1", "k": 5}]
        },
    )

    vector: list[float] | None = None
    id: str | None = Field(default=None, min_length=1)
    k: int = _K_FIELD

    _check_k = field_validator("k")(check_k)

    @field_validator("vector")
    @classmethod
    def _check_vector(
        cls, vector: list[float] | None, info: ValidationInfo
    ) -> list[float] | None:
        return None if vector is None else normalise_vector(vector, info)

    @field_validator("id")
    @classmethod
    def _check_id(cls, item_id: str | None, info: ValidationInfo) -> str | None:
        return None if item_id is None else check_id(item_id, info)

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if (self.vector is None) == (self.id is None):
            raise ValueError(
                "send exactly one of 'vector' and 'id' (or upload an image as "
                "multipart field 'image')"
            )
        return self


class ImageSearchForm(SearchOptions):
    """Form fields of a multipart search by image; ``filter`` is a JSON string."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"k": 5}]})

    k: int = _K_FIELD

    _check_k = field_validator("k")(check_k)


class SearchHit(BaseModel):
    """One search result."""

    id: str
    score: float = Field(description="Cosine similarity, in [-1, 1].")
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    """Results sorted by score, best first; at most k."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {"id": "cat-1", "score": 0.93, "metadata": {"label": "cat"}}
                    ]
                }
            ]
        }
    )

    results: list[SearchHit]


class ItemIn(BaseModel):
    """An item to add or replace by vector."""

    model_config = ConfigDict(extra="forbid")

    id: str = _ID_FIELD
    vector: list[float] = Field(description="Scaled to unit L2 norm on arrival.")
    metadata: dict[str, JsonValue] = Field(default_factory=dict)

    _check_id = field_validator("id")(check_id)
    _check_vector = field_validator("vector")(normalise_vector)
    _check_metadata = field_validator("metadata")(check_metadata)


class ItemsRequest(BaseModel):
    """Add or replace several items by vector in one transaction."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"id": "a", "vector": [0.1, 0.2, 0.3], "metadata": {"x": 1}}
                    ]
                }
            ]
        },
    )

    items: list[ItemIn] = Field(min_length=1)

    @field_validator("items")
    @classmethod
    def _check_count(cls, items: list[ItemIn], info: ValidationInfo) -> list[ItemIn]:
        limits = _limits(info)
        if len(items) > limits.max_items_per_request:
            raise ValueError(
                f"{len(items)} items, more than the limit of "
                f"{limits.max_items_per_request}; split them into several requests"
            )
        ids = [item.id for item in items]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"ids {duplicates} appear more than once; send each once")
        return items


class ItemForm(BaseModel):
    """Form fields of a multipart add-or-replace by image."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"id": "cat-1", "metadata": {"label": "cat"}}]}
    )

    id: str = _ID_FIELD
    metadata: dict[str, JsonValue] = Field(
        default_factory=dict, description="A JSON object, as a string."
    )

    _check_id = field_validator("id")(check_id)
    _check_metadata = field_validator("metadata")(check_metadata)

    @field_validator("metadata", mode="before")
    @classmethod
    def _parse_metadata(cls, value: object) -> object:
        if not isinstance(value, str | bytes):
            return value
        try:
            parsed = from_json(value)
        except ValueError as exc:
            raise ValueError(
                f"metadata is not valid JSON ({exc}); send a JSON object such as "
                '{"label": "cat"}'
            ) from exc
        if not isinstance(parsed, dict):
            raise ValueError(
                f"metadata is a JSON {type(parsed).__name__}, not an object; send a "
                'JSON object such as {"label": "cat"}'
            )
        return parsed


class ItemOut(BaseModel):
    """A stored item."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "cat-1",
                    "metadata": {"label": "cat"},
                    "has_thumbnail": True,
                    "updated_at": "2025-01-31T12:00:00Z",
                }
            ]
        }
    )

    id: str
    metadata: dict[str, Any]
    has_thumbnail: bool
    updated_at: str


class ItemWritten(ItemOut):
    """A stored item after a write; ``created`` is False for a replacement."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "cat-1",
                    "metadata": {"label": "cat"},
                    "has_thumbnail": True,
                    "updated_at": "2025-01-31T12:00:00Z",
                    "created": True,
                }
            ]
        }
    )

    created: bool


class ItemsWritten(BaseModel):
    """The items of a batch write, in request order."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "id": "a",
                            "metadata": {"x": 1},
                            "has_thumbnail": False,
                            "updated_at": "2025-01-31T12:00:00Z",
                            "created": True,
                        }
                    ]
                }
            ]
        }
    )

    items: list[ItemWritten]


class DeletedItem(BaseModel):
    """The id of a deleted item."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"id": "cat-1", "deleted": True}]}
    )

    id: str
    deleted: bool = True


class IndexInfo(BaseModel):
    """The FAISS index's state."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "size": 10000,
                    "kind": "exact",
                    "dim": 512,
                    "applied_seq": 10250,
                    "snapshot_seq": 10000,
                }
            ]
        }
    )

    size: int = Field(description="Number of vectors in the index.")
    kind: str
    dim: int
    applied_seq: int = Field(description="Latest store change the index reflects.")
    snapshot_seq: int | None = Field(
        description="Change sequence number of the latest snapshot on disk."
    )


class ModelInfo(BaseModel):
    """The bundle's metadata and the ONNX Runtime provider in use."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "bundle": {"architecture": "resnet18", "embedding_dim": 512},
                    "provider": "CPUExecutionProvider",
                }
            ]
        }
    )

    bundle: dict[str, Any]
    provider: str


class ErrorDetail(BaseModel):
    """Error code, message and the invalid field of a rejected request."""

    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Body of every 4xx and 5xx response."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_request",
                        "message": "k: k is 5000, more than the limit of 1000; lower k",
                        "field": "k",
                    }
                }
            ]
        }
    )

    error: ErrorDetail


class Status(BaseModel):
    """Body of the health and readiness checks."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"status": "ready", "detail": None}]}
    )

    status: str
    detail: str | None = None
