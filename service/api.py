"""The FastAPI application: embeddings, similarity search and stored items.

``create_app(settings)`` returns an app whose lifespan loads the bundle, the
item store and the FAISS index in a worker thread. ``/healthz`` returns 200
while they load, and ``/readyz`` returns 200 once they are loaded. Decoding,
preprocessing, search and store access run in the thread pool, and inference
runs through the dynamic batcher, so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import anyio
import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batching import BatcherClosed, EmbeddingBatcher, QueueFull
from service.collection import Collection
from service.encoder import Encoder, choose_providers
from service.errors import ApiError, error_response, install_error_handlers
from service.errors import validation_error as to_api_error
from service.index import SearchParams
from service.indexing import open_collection
from service.metrics import Metrics
from service.observability import RequestObserver
from service.preprocess import (
    ImageError,
    decode_image,
    make_thumbnail,
    preprocess_batch,
    set_pixel_limit,
)
from service.schemas import (
    DeletedItem,
    EmbedResponse,
    ErrorResponse,
    ImageSearchForm,
    IndexInfo,
    ItemForm,
    ItemOut,
    ItemsRequest,
    ItemsWritten,
    ItemWritten,
    Limits,
    ModelInfo,
    ModelRef,
    SearchHit,
    SearchRequest,
    SearchResponse,
    Status,
)
from service.settings import Settings
from service.store import ItemRecord, NewItem, StoreError

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

API_KEY_HEADER = "X-API-Key"
# Seconds a client should wait after a 429 from a full embedding queue.
RETRY_AFTER_S = 1
STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class Runtime:
    """The loaded components that requests use."""

    settings: Settings
    limits: Limits
    encoder: Encoder
    collection: Collection
    batcher: EmbeddingBatcher
    metrics: Metrics
    decode_limiter: anyio.CapacityLimiter


class ServiceState:
    """Loading state of one app; ``runtime`` is set once loading succeeds."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime: Runtime | None = None
        self.load_failed = False
        self.stopping = False


# Dependencies


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


def get_runtime(request: Request) -> Runtime:
    state = get_state(request)
    if state.runtime is None or state.stopping:
        raise ApiError(
            503,
            "not_ready",
            "the service has not loaded the model and index yet; retry when "
            "/readyz returns 200",
        )
    return state.runtime


_bearer_scheme = HTTPBearer(
    auto_error=False, description="The API key as `Authorization: Bearer <key>`."
)
_header_scheme = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description=f"The API key in the {API_KEY_HEADER} header.",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)]
ApiKeyHeaderDep = Annotated[str | None, Depends(_header_scheme)]


def check_api_key(request: Request, bearer: str | None, header: str | None) -> None:
    """Reject the request unless a supplied key equals the configured one.

    Compares in constant time. Does nothing when no key is configured.
    """
    expected = get_state(request).settings.api_key
    if expected is None:
        return
    secret = expected.get_secret_value().encode()
    supplied = [key.encode() for key in (bearer, header) if key is not None]
    # Compare every supplied key, so the time taken does not depend on which one
    # matched.
    matches = [hmac.compare_digest(key, secret) for key in supplied]
    if not any(matches):
        reason = "a wrong API key" if supplied else "no API key"
        raise ApiError(
            401,
            "unauthorized",
            f"this request has {reason}; send the key as 'Authorization: Bearer "
            f"<key>' or in the {API_KEY_HEADER} header",
            API_KEY_HEADER,
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_key_for_writes(
    request: Request, bearer: BearerDep, header: ApiKeyHeaderDep
) -> None:
    """Guard a write route: needs the key whenever one is configured."""
    check_api_key(request, bearer.credentials if bearer else None, header)


def require_key_for_reads(
    request: Request, bearer: BearerDep, header: ApiKeyHeaderDep
) -> None:
    """Guard a read route: needs the key only with ``auth_mode`` ``all``."""
    if get_state(request).settings.auth_mode == "all":
        check_api_key(request, bearer.credentials if bearer else None, header)


StateDep = Annotated[ServiceState, Depends(get_state)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
WriteGuard = Depends(require_key_for_writes)
ReadGuard = Depends(require_key_for_reads)


# Request parsing


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _parse_json(model: type[M], body: bytes, limits: Limits) -> M:
    try:
        return model.model_validate_json(body, context={"limits": limits})
    except ValidationError as exc:
        raise to_api_error(exc) from exc


def _parse_form(model: type[M], values: dict[str, Any], limits: Limits) -> M:
    try:
        return model.model_validate(values, context={"limits": limits})
    except ValidationError as exc:
        raise to_api_error(exc) from exc


async def _read_form(request: Request, runtime: Runtime) -> FormData:
    try:
        return await request.form(
            max_files=runtime.settings.max_images_per_request,
            max_fields=16,
            max_part_size=runtime.settings.max_metadata_bytes + 1024,
        )
    except StarletteHTTPException as exc:
        raise ApiError(
            400,
            "invalid_multipart",
            f"the multipart body is invalid: {exc.detail}",
        ) from exc


async def _read_uploads(
    form: FormData, field: str, runtime: Runtime, max_count: int
) -> list[tuple[str, bytes]]:
    """Return (name, bytes) of each file in ``field``, checking count and size."""
    values = form.getlist(field)
    if not values:
        raise ApiError(
            422,
            "invalid_request",
            f"{field}: field required; upload the image file as multipart field "
            f"{field!r}",
            field,
        )
    if len(values) > max_count:
        raise ApiError(
            422,
            "invalid_request",
            f"{field}: {len(values)} files, more than the limit of {max_count}; "
            "split them into several requests",
            field,
        )
    max_bytes = runtime.settings.max_image_bytes
    uploads: list[tuple[str, bytes]] = []
    for i, value in enumerate(values):
        label = f"{field}[{i}]" if max_count > 1 else field
        if not isinstance(value, UploadFile):
            raise ApiError(
                422,
                "invalid_request",
                f"{label} is a text field; upload the image as a file",
                field,
            )
        data = await value.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ApiError(
                413,
                "image_too_large",
                f"{label} ({value.filename}) is larger than the limit of "
                f"{max_bytes} bytes; downscale or recompress it",
                field,
            )
        uploads.append((label, data))
    return uploads


def _decode_batch(
    uploads: list[tuple[str, bytes]], runtime: Runtime, thumbnails: bool
) -> tuple[np.ndarray, list[bytes | None]]:
    """Decode and preprocess images; runs in a worker thread."""
    images = []
    for label, data in uploads:
        try:
            images.append(
                decode_image(data, runtime.settings.max_image_pixels, name=label)
            )
        except ImageError as exc:
            status = 413 if exc.too_large else 400
            field = label.split("[")[0]
            raise ApiError(status, "invalid_image", str(exc), field) from exc
    batch = preprocess_batch(images, runtime.encoder.metadata.preprocessing)
    thumbs: list[bytes | None] = [
        make_thumbnail(image, runtime.settings.thumbnail_size) if thumbnails else None
        for image in images
    ]
    return batch, thumbs


def _overloaded(max_queue_size: int) -> ApiError:
    return ApiError(
        429,
        "overloaded",
        f"the embedding queue is full (limit of {max_queue_size} waiting requests, "
        f"DCL_MAX_QUEUE_SIZE); retry after {RETRY_AFTER_S} s or send fewer "
        "requests at once",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _embed_uploads(
    uploads: list[tuple[str, bytes]], runtime: Runtime, thumbnails: bool = False
) -> tuple[np.ndarray, list[bytes | None]]:
    batcher = runtime.batcher
    # Reject before decoding too, so that overload costs no decoding work.
    if batcher.queue_depth >= batcher.max_queue_size:
        runtime.metrics.queue_rejections.inc()
        raise _overloaded(batcher.max_queue_size)
    # The batcher waits for announced images, so embed must follow the block
    # with no await in between.
    with batcher.incoming(len(uploads)), runtime.metrics.time("decode"):
        batch, thumbs = await anyio.to_thread.run_sync(
            _decode_batch,
            uploads,
            runtime,
            thumbnails,
            limiter=runtime.decode_limiter,
        )
    try:
        with runtime.metrics.time("embed"):
            embeddings = await batcher.embed(batch)
    except QueueFull as exc:
        raise _overloaded(exc.max_queue_size) from exc
    except BatcherClosed as exc:
        raise ApiError(
            503,
            "not_ready",
            "the service is stopping; retry on another replica",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from exc
    runtime.metrics.images_embedded.inc(len(uploads))
    return embeddings, thumbs


def _item_out(record: ItemRecord) -> ItemOut:
    return ItemOut(
        id=record.id,
        metadata=record.metadata,
        has_thumbnail=record.has_thumbnail,
        updated_at=record.updated_at,
    )


def _not_found(item_id: str) -> ApiError:
    return ApiError(
        404, "item_not_found", f"item {item_id!r} not found; check the id", "id"
    )


async def _run(runtime: Runtime, stage: str, func: Callable[..., T], *args: Any) -> T:
    with runtime.metrics.time(stage):
        return await anyio.to_thread.run_sync(func, *args)


# Routes

_ERROR_DESCRIPTIONS = {
    400: "The image or multipart body is invalid.",
    401: "The API key is missing or wrong (only when one is configured).",
    404: "The item or thumbnail was not found.",
    413: "The body, an image's bytes or an image's pixels exceed a limit.",
    415: "The Content-Type is not one this route accepts.",
    422: "A field is missing or breaks a limit; the message names it.",
    429: "The embedding queue is full; retry after Retry-After seconds.",
    503: "The model and index are not loaded yet, or the service is stopping.",
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {
        "model": ErrorResponse,
        "description": description,
        "content": {
            "application/json": {
                "example": {
                    "error": {
                        "code": "invalid_request",
                        "message": description,
                        "field": None,
                    }
                }
            }
        },
    }
    for code, description in _ERROR_DESCRIPTIONS.items()
}


def _body_doc(
    json_model: type[BaseModel] | None,
    form: dict[str, Any],
    form_example: dict[str, Any],
) -> dict:
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": form, "example": form_example}
    }
    if json_model is not None:
        schema = json_model.model_json_schema()
        content["application/json"] = {
            "schema": schema,
            "example": schema["examples"][0],
        }
    return {"requestBody": {"required": True, "content": content}}


_IMAGE_FILE = {"type": "string", "format": "binary"}

router = APIRouter(prefix="/v1", responses=_ERRORS, dependencies=[ReadGuard])


@router.post(
    "/embed",
    response_model=EmbedResponse,
    tags=["embeddings"],
    summary="Embed images",
    openapi_extra=_body_doc(
        None,
        {
            "type": "object",
            "properties": {"images": {"type": "array", "items": _IMAGE_FILE}},
            "required": ["images"],
        },
        {"images": ["(binary JPEG or PNG file)"]},
    ),
)
async def embed(request: Request, runtime: RuntimeDep) -> EmbedResponse:
    """Embed one or more images, uploaded as multipart field `images`."""
    if _media_type(request) != "multipart/form-data":
        raise _unsupported_media(request, "multipart/form-data")
    form = await _read_form(request, runtime)
    uploads = await _read_uploads(
        form, "images", runtime, runtime.settings.max_images_per_request
    )
    embeddings, _ = await _embed_uploads(uploads, runtime)
    return EmbedResponse(
        embeddings=embeddings.tolist(),
        dim=runtime.encoder.dim,
        model=_model_ref(runtime),
    )


@router.post(
    "/search",
    response_model=SearchResponse,
    openapi_extra=_body_doc(
        SearchRequest,
        {
            "type": "object",
            "properties": {
                "image": _IMAGE_FILE,
                "k": {"type": "integer"},
                "ef_search": {"type": "integer"},
                "nprobe": {"type": "integer"},
                "rerank_factor": {"type": "integer"},
                "filter": {"type": "string", "description": "A JSON object."},
            },
            "required": ["image"],
        },
        {"image": "(binary JPEG or PNG file)", "k": 10},
    ),
    tags=["search"],
    summary="Find nearest items",
)
async def search(request: Request, runtime: RuntimeDep) -> SearchResponse:
    """Find the k stored items nearest to an image, a vector or a stored item.

    Send multipart with file `image` and form field `k`, or JSON
    `{"vector": [...], "k": 10}`, or JSON `{"id": "...", "k": 10}`. A search by
    id leaves that item out of the results.
    """
    media_type = _media_type(request)
    exclude_id: str | None = None
    if media_type == "multipart/form-data":
        form = await _read_form(request, runtime)
        values = {"k": form.get("k", 10)}
        for name in ("ef_search", "nprobe", "rerank_factor", "filter"):
            if form.get(name) is not None:
                values[name] = form.get(name)
        params = _parse_form(ImageSearchForm, values, runtime.limits)
        uploads = await _read_uploads(form, "image", runtime, max_count=1)
        embeddings, _ = await _embed_uploads(uploads, runtime)
        query, k, options = embeddings[0], params.k, params
    elif media_type == "application/json":
        body = _parse_json(SearchRequest, await request.body(), runtime.limits)
        k, options = body.k, body
        if body.vector is not None:
            query = np.asarray(body.vector, dtype=np.float32)
        else:
            # SearchRequest's validator guarantees an id when there is no vector.
            item_id = cast(str, body.id)
            stored = await _run(
                runtime, "store", runtime.collection.store.get_vector, item_id
            )
            if stored is None:
                raise _not_found(item_id)
            query, exclude_id = stored, item_id
    else:
        raise _unsupported_media(request, "multipart/form-data or application/json")

    # One extra result leaves room to drop the query item itself.
    fetch = k + 1 if exclude_id is not None else k
    search_params = SearchParams(
        ef_search=options.ef_search,
        nprobe=options.nprobe,
        rerank_factor=options.rerank_factor,
    )
    (hits,) = await _run(
        runtime,
        "search",
        runtime.collection.search,
        query[None, :],
        fetch,
        search_params,
        options.filter,
    )
    results = [
        SearchHit(
            id=hit.record.id,
            # Float32 rounding can put a unit vector's self-score just above 1.
            score=min(max(hit.score, -1.0), 1.0),
            metadata=hit.record.metadata,
        )
        for hit in hits
        if hit.record.id != exclude_id
    ]
    results.sort(key=lambda hit: hit.score, reverse=True)
    return SearchResponse(results=results[:k])


@router.post(
    "/items",
    status_code=201,
    response_model=ItemWritten | ItemsWritten,
    dependencies=[WriteGuard],
    openapi_extra=_body_doc(
        ItemsRequest,
        {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "image": _IMAGE_FILE,
                "metadata": {"type": "string", "description": "A JSON object."},
            },
            "required": ["id", "image"],
        },
        {
            "id": "cat-1",
            "image": "(binary JPEG or PNG file)",
            "metadata": '{"label": "cat"}',
        },
    ),
    tags=["items"],
    summary="Add or replace items",
)
async def put_items(
    request: Request, runtime: RuntimeDep
) -> ItemWritten | ItemsWritten:
    """Add or replace items, and return after the store has committed them.

    Multipart with form `id`, file `image` and optional form `metadata` (a JSON
    object) embeds the image and stores a thumbnail. JSON
    `{"items": [{"id", "vector", "metadata"}]}` adds or replaces items by
    vector in one transaction.
    """
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        form = await _read_form(request, runtime)
        values = {"id": form.get("id")} if form.get("id") is not None else {}
        if form.get("metadata") is not None:
            values["metadata"] = form.get("metadata")
        fields = _parse_form(ItemForm, values, runtime.limits)
        uploads = await _read_uploads(form, "image", runtime, max_count=1)
        embeddings, thumbs = await _embed_uploads(uploads, runtime, thumbnails=True)
        new_items = [
            NewItem(
                id=fields.id,
                vector=embeddings[0],
                metadata=fields.metadata,
                thumbnail=thumbs[0],
                source=uploads[0][1] if runtime.settings.store_source_images else None,
            )
        ]
    elif media_type == "application/json":
        body = _parse_json(ItemsRequest, await request.body(), runtime.limits)
        new_items = [
            NewItem(
                id=item.id,
                vector=np.asarray(item.vector, dtype=np.float32),
                metadata=item.metadata,
            )
            for item in body.items
        ]
    else:
        raise _unsupported_media(request, "multipart/form-data or application/json")

    results = await _run(runtime, "store", runtime.collection.upsert, new_items)
    written = [
        ItemWritten(**_item_out(r.record).model_dump(), created=r.created)
        for r in results
    ]
    if media_type == "multipart/form-data":
        return written[0]
    return ItemsWritten(items=written)


@router.get(
    "/items/{item_id:path}/thumbnail",
    response_class=Response,
    tags=["items"],
    summary="Get an item's thumbnail",
    responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG."}},
)
async def get_thumbnail(item_id: str, runtime: RuntimeDep) -> Response:
    """Return an item's JPEG thumbnail."""
    data = await _run(runtime, "store", runtime.collection.store.get_thumbnail, item_id)
    if data is None:
        record = await _run(runtime, "store", runtime.collection.store.get, item_id)
        if record is None:
            raise _not_found(item_id)
        raise ApiError(
            404,
            "thumbnail_not_found",
            f"item {item_id!r} has no thumbnail, because it was added by vector",
            "id",
        )
    return Response(content=data, media_type="image/jpeg")


@router.get(
    "/items/{item_id:path}", response_model=ItemOut, tags=["items"], summary="Get item"
)
async def get_item(item_id: str, runtime: RuntimeDep) -> ItemOut:
    """Return an item's id, metadata and whether it has a thumbnail."""
    record = await _run(runtime, "store", runtime.collection.store.get, item_id)
    if record is None:
        raise _not_found(item_id)
    return _item_out(record)


@router.delete(
    "/items/{item_id:path}",
    response_model=DeletedItem,
    dependencies=[WriteGuard],
    tags=["items"],
    summary="Delete item",
)
async def delete_item(item_id: str, runtime: RuntimeDep) -> DeletedItem:
    """Delete an item, and return after the store has committed the deletion."""
    record = await _run(runtime, "store", runtime.collection.delete, item_id)
    if record is None:
        raise _not_found(item_id)
    return DeletedItem(id=item_id)


@router.get(
    "/index", response_model=IndexInfo, tags=["service"], summary="Describe the index"
)
async def index_info(runtime: RuntimeDep) -> IndexInfo:
    """Return the index's size, kind, dimension and snapshot seq."""
    collection = runtime.collection
    return IndexInfo(
        size=len(collection),
        kind=collection.kind,
        dim=collection.dim,
        applied_seq=collection.applied_seq,
        snapshot_seq=collection.snapshot_seq,
    )


@router.get(
    "/model", response_model=ModelInfo, tags=["service"], summary="Describe the model"
)
async def model_info(runtime: RuntimeDep) -> ModelInfo:
    """Return the bundle's metadata and the ONNX Runtime provider in use."""
    return ModelInfo(
        bundle=runtime.encoder.metadata.model_dump(mode="json"),
        provider=runtime.encoder.provider,
    )


def _model_ref(runtime: Runtime) -> ModelRef:
    metadata = runtime.encoder.metadata
    return ModelRef(sha256=metadata.onnx_sha256, architecture=metadata.architecture)


def _unsupported_media(request: Request, expected: str) -> ApiError:
    return ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {_media_type(request) or '(none)'!r} is not supported here; "
        f"send {expected}",
        "Content-Type",
    )


probes = APIRouter()


@probes.get(
    "/healthz",
    response_model=Status,
    responses={503: {"model": Status, "description": "Loading the bundle failed."}},
    tags=["probes"],
    summary="Liveness probe",
)
async def healthz(state: StateDep) -> Any:
    """Return 200 while the process works, 503 if loading the model failed."""
    if state.load_failed:
        return JSONResponse(
            status_code=503,
            content=Status(
                status="failed", detail="loading failed; the server log has details"
            ).model_dump(),
        )
    return Status(status="ok")


@probes.get(
    "/readyz",
    response_model=Status,
    responses={503: {"model": Status, "description": "Loading, failed or stopping."}},
    tags=["probes"],
    summary="Readiness probe",
)
async def readyz(state: StateDep) -> Any:
    """Return 200 once the bundle, store and index are loaded, else 503."""
    if state.runtime is not None and not state.stopping:
        return Status(status="ready")
    detail = "loading failed" if state.load_failed else "loading"
    if state.stopping:
        detail = "stopping"
    return JSONResponse(
        status_code=503, content=Status(status="not_ready", detail=detail).model_dump()
    )


@probes.get("/metrics", include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    """Return Prometheus metrics."""
    return Response(
        generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


demo = APIRouter(include_in_schema=False)


@demo.get("/")
async def demo_page() -> FileResponse:
    """Return the demo page: upload an image, see its nearest neighbours."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


# Application


class BodySizeLimit:
    """Reject request bodies larger than ``max_bytes`` with 413.

    Checks Content-Length up front and counts the bytes of streamed bodies.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, "request_too_large", self._message())
            await response(scope, receive, send)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(413, "request_too_large", self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return (
            f"the request body is larger than the limit of {self.max_bytes} bytes; "
            "send fewer or smaller images per request"
        )


def load_components(settings: Settings) -> tuple[Encoder, Collection]:
    """Load the bundle, open the store and bring the index up to date.

    Writes a fresh snapshot when the index had to replay changes or be rebuilt,
    so the next start-up is faster.
    """
    encoder = Encoder(
        settings.bundle_dir,
        providers=choose_providers(settings.providers),
        intra_op_threads=settings.intra_op_threads,
        intra_op_spinning=settings.intra_op_spinning,
    )
    collection = open_collection(settings, encoder)
    return encoder, collection


async def _load(state: ServiceState) -> None:
    settings = state.settings
    try:
        encoder, collection = await anyio.to_thread.run_sync(load_components, settings)
    except (OSError, ValueError, StoreError):
        # BundleError is a ValueError; the traceback names the failing file.
        state.load_failed = True
        logger.exception("Loading the service failed; /readyz will return 503")
        return

    batcher = EmbeddingBatcher(
        encoder,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000,
        max_queue_size=settings.max_queue_size,
        metrics=state.metrics,
        max_fill_wait_s=settings.max_batch_fill_wait_ms / 1000,
    )
    batcher.start()
    limits = Limits(
        max_k=settings.max_k,
        max_id_length=settings.max_id_length,
        max_metadata_bytes=settings.max_metadata_bytes,
        max_metadata_depth=settings.max_metadata_depth,
        max_items_per_request=settings.max_images_per_request,
        dim=encoder.dim,
    )
    state.metrics.track_index_size(lambda: float(len(collection)))
    state.metrics.track_queue_depth(lambda: float(batcher.queue_depth))
    state.metrics.set_model(
        encoder.sha256, encoder.metadata.architecture, encoder.provider
    )
    state.runtime = Runtime(
        settings=settings,
        limits=limits,
        encoder=encoder,
        collection=collection,
        batcher=batcher,
        metrics=state.metrics,
        decode_limiter=anyio.CapacityLimiter(settings.decode_threads),
    )
    logger.info(
        "Ready: %d items, model sha256 %s, provider %s",
        len(collection),
        encoder.sha256[:12],
        encoder.provider,
    )


def _shutdown(collection: Collection) -> None:
    try:
        if collection.snapshot_seq != collection.applied_seq:
            collection.snapshot()
    except OSError:
        logger.exception("Writing the shutdown index snapshot failed")
    finally:
        collection.close()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the components in the background; snapshot and close at shutdown."""
    state: ServiceState = app.state.service
    set_pixel_limit(state.settings.max_image_pixels)
    loader = asyncio.create_task(_load(state), name="load-service")
    try:
        yield
    finally:
        state.stopping = True
        if not loader.done():
            loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
        runtime = state.runtime
        if runtime is not None:
            await runtime.batcher.stop()
            await anyio.to_thread.run_sync(_shutdown, runtime.collection)
            logger.info(
                "Stopped; index snapshot at seq %s", runtime.collection.snapshot_seq
            )


def create_app(settings: Settings) -> FastAPI:
    """Build the app; its lifespan loads the bundle, store and index."""
    app = FastAPI(
        title="dcl-embed",
        summary="Image embeddings and similarity search with a DCL-pretrained encoder.",
        version="0.1.0",
        lifespan=lifespan,
    )
    metrics = Metrics()
    app.state.service = ServiceState(settings, metrics)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(probes)
    app.include_router(demo)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    # Added last, so it is outermost: it also sees BodySizeLimit's 413s.
    app.add_middleware(RequestObserver, metrics=metrics)
    return app
