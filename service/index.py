"""The FAISS index over the stored vectors, and its snapshots on disk.

The index is derived data: ``service.store`` is the source of truth, and a
snapshot records the change sequence number it reflects, so that start-up loads
it and replays only newer changes.

Three kinds share one interface:

- ``exact``: ``IndexIDMap2(IndexFlatIP)``, keyed by the store's FAISS keys.
- ``hnsw``: ``IndexHNSWFlat`` with inner product. FAISS cannot remove vectors
  from an HNSW graph, so a deletion or replacement marks the old position dead
  (a tombstone) and searches drop dead positions from the results.
- ``ivfpq``: ``IndexIVFPQ`` over inner product, with the list count and code
  size derived from the collection size. It needs training, so the service
  keeps an exact index until enough vectors exist.

The approximate kinds use the same tombstones, and the collection rebuilds them
in the background once the dead share passes a threshold.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import faiss
import numpy as np

from service.schemas import MAX_RERANK_FACTOR

logger = logging.getLogger(__name__)

IndexKind = Literal["exact", "hnsw", "ivfpq"]
INDEX_KINDS: tuple[str, ...] = ("exact", "hnsw", "ivfpq")
CONFIG_KINDS: tuple[str, ...] = (*INDEX_KINDS, "auto")

SNAPSHOT_FILENAME = "index.json"
SNAPSHOT_FORMAT_VERSION = 2
_SNAPSHOT_INFO_RE = re.compile(r"^index-(\d{12})\.json$")

# With DCL_INDEX_KIND=auto: below AUTO_HNSW_MIN_ITEMS an exact search over
# 512-dimensional float32 vectors scans at most 200 MB per query, a few
# milliseconds on two cores, and returns exact results. Above it HNSW keeps
# query latency nearly flat. From AUTO_IVFPQ_MIN_ITEMS on, full float vectors
# (2 KiB each at 512 dimensions, plus the HNSW graph) need more than 4 GiB, and
# IVF-PQ's 64-byte codes keep memory bounded at a cost in recall.
AUTO_HNSW_MIN_ITEMS = 100_000
AUTO_IVFPQ_MIN_ITEMS = 2_000_000

# FAISS's k-means warns below 39 training points per centroid.
IVF_POINTS_PER_CENTROID = 39
IVF_MIN_NLIST = 8
IVF_MAX_NLIST = 65_536
IVFPQ_MIN_TRAIN_SIZE = IVF_POINTS_PER_CENTROID * IVF_MIN_NLIST
# Retrain IVF-PQ when the collection has grown this many times past the size it
# was trained at, so that nlist keeps up with the data.
IVFPQ_RETRAIN_GROWTH = 4.0
# Over-fetch at most this many extra results to skip tombstones; with more dead
# positions a search passes a bitmap of live positions to FAISS instead.
MAX_OVERFETCH = 1024


class SnapshotError(RuntimeError):
    """A snapshot is missing, corrupt, or does not match the store."""


@dataclass(frozen=True)
class SearchParams:
    """Per-call search parameters, passed to FAISS for one call only.

    ``ef_search`` is HNSW's candidate list size and ``nprobe`` the number of
    IVF lists visited. ``rerank_factor`` makes an IVF-PQ search fetch
    ``rerank_factor * k`` candidates, which the collection re-ranks by their
    exact float vectors; 1 turns re-ranking off. None means the index's
    configured default. The exact index ignores all three, and HNSW ignores
    ``nprobe`` and ``rerank_factor``.
    """

    ef_search: int | None = None
    nprobe: int | None = None
    rerank_factor: int | None = None

    def __post_init__(self) -> None:
        for name in ("ef_search", "nprobe", "rerank_factor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} is {value}; use 1 or more")
        if self.rerank_factor is not None and self.rerank_factor > MAX_RERANK_FACTOR:
            raise ValueError(
                f"rerank_factor is {self.rerank_factor}; use at most "
                f"{MAX_RERANK_FACTOR}"
            )


@dataclass(frozen=True)
class IndexConfig:
    """Index kind and parameters of a collection.

    Args:
        kind: "exact", "hnsw", "ivfpq", or "auto" to choose by collection size.
        hnsw_m: HNSW graph degree (M).
        hnsw_ef_construction: HNSW candidate list size while adding.
        hnsw_ef_search: default HNSW candidate list size per search.
        ivf_nprobe: default number of IVF lists visited per search.
        ivf_rerank_factor: default IVF-PQ re-ranking factor per search (see
            ``SearchParams``); 1 turns re-ranking off.
        max_tombstone_fraction: rebuild an approximate index in the background
            once this share of its positions is dead.
    """

    kind: str = "exact"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 64
    ivf_nprobe: int = 16
    ivf_rerank_factor: int = 1
    max_tombstone_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in CONFIG_KINDS:
            raise ValueError(
                f"index kind {self.kind!r} is not supported; use one of "
                f"{', '.join(CONFIG_KINDS)}"
            )
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; use 1 or more")
        if not 1 <= self.ivf_rerank_factor <= MAX_RERANK_FACTOR:
            raise ValueError(
                f"ivf_rerank_factor is {self.ivf_rerank_factor}; use 1 to "
                f"{MAX_RERANK_FACTOR}"
            )
        if not 0.0 < self.max_tombstone_fraction < 1.0:
            raise ValueError(
                f"max_tombstone_fraction is {self.max_tombstone_fraction}; use a "
                "value between 0 and 1"
            )


def choose_kind(config: IndexConfig, size: int) -> IndexKind:
    """Return the kind to build for ``size`` vectors under ``config``.

    "auto" picks by the thresholds above. IVF-PQ falls back to exact until
    ``IVFPQ_MIN_TRAIN_SIZE`` vectors exist to train it.
    """
    kind = config.kind
    if kind == "auto":
        if size < AUTO_HNSW_MIN_ITEMS:
            kind = "exact"
        elif size < AUTO_IVFPQ_MIN_ITEMS:
            kind = "hnsw"
        else:
            kind = "ivfpq"
    if kind == "ivfpq" and size < IVFPQ_MIN_TRAIN_SIZE:
        return "exact"
    if kind == "exact":
        return "exact"
    return "hnsw" if kind == "hnsw" else "ivfpq"


def ivfpq_layout(size: int, dim: int) -> tuple[int, int, int]:
    """Return (nlist, m, nbits) of an IVF-PQ index trained on ``size`` vectors.

    nlist is the power of two nearest to 4·sqrt(size), capped so that every
    list gets 39 training points. m is the largest divisor of ``dim`` up to
    dim / 8, so each sub-quantizer covers at least 8 dimensions (64 bytes per
    vector at 512 dimensions). nbits is 8 where 39·256 training points exist,
    else fewer.
    """
    if size < IVFPQ_MIN_TRAIN_SIZE:
        raise ValueError(
            f"IVF-PQ needs at least {IVFPQ_MIN_TRAIN_SIZE} vectors to train, got "
            f"{size}; use the exact index until then"
        )
    nlist = 2 ** round(math.log2(4 * math.sqrt(size)))
    nlist = min(nlist, IVF_MAX_NLIST, size // IVF_POINTS_PER_CENTROID)
    nlist = max(IVF_MIN_NLIST, 2 ** int(math.log2(nlist)))
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    nbits = min(8, int(math.log2(size / IVF_POINTS_PER_CENTROID)))
    return nlist, m, nbits


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._condition:
            while self._writer or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if self._readers == 0:
                    self._condition.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._condition.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._condition:
                self._writer = False
                self._condition.notify_all()


class VectorIndex(Protocol):
    """Interface that every index kind implements."""

    kind: str
    dim: int
    trained_size: int

    def __len__(self) -> int: ...

    @property
    def tombstones(self) -> int: ...

    def apply(
        self, removed_keys: np.ndarray, keys: np.ndarray, vectors: np.ndarray
    ) -> None: ...

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, keys: np.ndarray) -> int: ...

    def search(
        self,
        queries: np.ndarray,
        k: int,
        params: SearchParams | None = None,
        allowed_keys: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def frozen(self) -> contextlib.AbstractContextManager[None]: ...

    def write(self, path: Path) -> list[str]: ...


class ExactIndex:
    """Exact inner-product search, ``IndexIDMap2(IndexFlatIP(dim))``.

    Keys are the store's int64 FAISS keys. Thread-safe: searches run together
    (FAISS releases the GIL), and ``apply`` waits for them to finish.
    """

    kind = "exact"
    trained_size = 0

    def __init__(self, dim: int, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self._index = index or faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._lock = ReadWriteLock()

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def tombstones(self) -> int:
        """Dead positions; always 0, because the exact index removes vectors."""
        return 0

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under keys that are not in the index yet."""
        self.apply(np.empty(0, dtype=np.int64), keys, vectors)

    def remove(self, keys: np.ndarray) -> int:
        """Remove these keys where present; return how many were removed."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return 0
        with self._lock.write():
            return int(self._index.remove_ids(faiss.IDSelectorBatch(keys)))

    def replace(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Set the vectors of these keys, whether present or not."""
        self.apply(keys, keys, vectors)

    def apply(
        self, removed_keys: np.ndarray, keys: np.ndarray, vectors: np.ndarray
    ) -> None:
        """Remove ``removed_keys``, then add ``vectors`` under ``keys``, atomically.

        Searches never see the state between the two steps.
        """
        removed_keys = np.ascontiguousarray(removed_keys, dtype=np.int64)
        keys, vectors = _check_keys_vectors(keys, vectors, self.dim)
        with self._lock.write():
            if len(removed_keys):
                self._index.remove_ids(faiss.IDSelectorBatch(removed_keys))
            if len(keys):
                self._index.add_with_ids(vectors, keys)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        params: SearchParams | None = None,
        allowed_keys: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, keys), each [Q, k], best first.

        ``allowed_keys`` restricts the results to these keys; the search stays
        exact, so it returns k results whenever k allowed keys exist. Missing
        places have key -1; callers drop them. ``params`` has no effect here.
        """
        del params
        queries = _check_queries(queries, k, self.dim)
        faiss_params = None
        selector = None
        if allowed_keys is not None:
            selector = faiss.IDSelectorBatch(
                np.ascontiguousarray(allowed_keys, dtype=np.int64)
            )
            faiss_params = faiss.SearchParameters(sel=selector)
        with self._lock.read():
            scores, keys = self._index.search(queries, k, params=faiss_params)
        return scores, keys

    def frozen(self) -> contextlib.AbstractContextManager[None]:
        """Block writes, but not searches, while the block runs."""
        return self._lock.read()

    def write(self, path: Path) -> list[str]:
        """Write the index to ``path``; return the file names written.

        The caller must be inside ``frozen()``.
        """
        faiss.write_index(self._index, str(path))
        return [path.name]

    @classmethod
    def read(cls, path: Path, dim: int) -> ExactIndex:
        """Read an index written by ``write``.

        Raises:
            SnapshotError: the file is unreadable or not an exact index of ``dim``.
        """
        index = _read_faiss(path)
        if not isinstance(index, faiss.IndexIDMap2) or index.d != dim:
            raise SnapshotError(
                f"{path} contains a {type(index).__name__} of dimension {index.d}, "
                f"not an exact IndexIDMap2 of dimension {dim}"
            )
        return cls(dim, index)


class ApproximateIndex:
    """An HNSW or IVF-PQ index with tombstones for removed vectors.

    FAISS numbers the vectors 0, 1, 2, ... in the order they were added (their
    positions). ``_labels`` maps each position to its store key, or to -1 once
    the vector is removed or replaced, and ``_position_of_key`` maps each live
    key to its position. Replacing a key adds a new position and kills the old
    one. Searches over-fetch by the number of dead positions (up to
    ``MAX_OVERFETCH``) and drop them, so k live results come back.

    Args:
        kind: "hnsw" or "ivfpq".
        dim: embedding size.
        index: an empty, trained FAISS index, or one read from a snapshot.
        labels: position -> store key (-1 if dead), for an index read from disk.
        default_params: search parameters used where a call passes none.
        trained_size: number of vectors the IVF-PQ quantizers were trained on.
    """

    def __init__(
        self,
        kind: str,
        dim: int,
        index: faiss.Index,
        default_params: SearchParams,
        labels: np.ndarray | None = None,
        trained_size: int = 0,
    ) -> None:
        if kind not in ("hnsw", "ivfpq"):
            raise ValueError(f"kind {kind!r} is not approximate; use hnsw or ivfpq")
        self.kind = kind
        self.dim = dim
        self.trained_size = trained_size
        self.default_params = default_params
        self._index = index
        self._lock = ReadWriteLock()
        labels = np.empty(0, dtype=np.int64) if labels is None else labels
        if len(labels) != index.ntotal:
            raise SnapshotError(
                f"{len(labels)} labels for {index.ntotal} vectors in the index"
            )
        self._labels = np.ascontiguousarray(labels, dtype=np.int64)
        live = np.flatnonzero(self._labels >= 0)
        size = int(self._labels.max()) + 1 if len(live) else 0
        self._position_of_key = np.full(size, -1, dtype=np.int64)
        self._position_of_key[self._labels[live]] = live
        self._live = len(live)
        self._live_bitmap: np.ndarray | None = None

    def __len__(self) -> int:
        return self._live

    @property
    def tombstones(self) -> int:
        """Dead positions still in the FAISS index."""
        return int(self._index.ntotal) - self._live

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under keys, replacing any key already present."""
        self.apply(keys, keys, vectors)

    def remove(self, keys: np.ndarray) -> int:
        """Mark these keys dead where present; return how many were live."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        with self._lock.write():
            return self._kill(keys)

    def apply(
        self, removed_keys: np.ndarray, keys: np.ndarray, vectors: np.ndarray
    ) -> None:
        """Kill ``removed_keys``, then add ``vectors`` under ``keys``, atomically."""
        removed_keys = np.ascontiguousarray(removed_keys, dtype=np.int64)
        keys, vectors = _check_keys_vectors(keys, vectors, self.dim)
        with self._lock.write():
            self._kill(np.concatenate([removed_keys, keys]))
            if len(keys) == 0:
                return
            start = int(self._index.ntotal)
            self._index.add(vectors)
            positions = np.arange(start, start + len(keys), dtype=np.int64)
            self._labels = np.concatenate([self._labels, keys])
            needed = int(keys.max()) + 1
            if needed > len(self._position_of_key):
                grown = np.full(max(needed, 2 * len(self._position_of_key)), -1)
                grown[: len(self._position_of_key)] = self._position_of_key
                self._position_of_key = grown
            self._position_of_key[keys] = positions
            self._live += len(keys)
            self._live_bitmap = None

    def _kill(self, keys: np.ndarray) -> int:
        keys = keys[(keys >= 0) & (keys < len(self._position_of_key))]
        if len(keys) == 0:
            return 0
        positions = np.unique(self._position_of_key[keys])
        positions = positions[positions >= 0]
        self._labels[positions] = -1
        self._position_of_key[keys] = -1
        self._live -= len(positions)
        self._live_bitmap = None
        return len(positions)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        params: SearchParams | None = None,
        allowed_keys: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, keys), each [Q, k], best first; missing places are -1.

        With ``allowed_keys``, FAISS only collects those keys (an
        ``IDSelectorBatch`` over their positions). HNSW's candidate list and
        IVF's visited lists still bound the search, so a selective filter can
        return fewer than k results although k allowed keys exist; a larger
        ``ef_search`` or ``nprobe`` finds more of them.
        """
        queries = _check_queries(queries, k, self.dim)
        params = params or SearchParams()
        with self._lock.read():
            ntotal = int(self._index.ntotal)
            if ntotal == 0:
                return _empty_results(len(queries), k)
            selector: faiss.IDSelector | None = None
            fetch = k
            if allowed_keys is not None:
                positions = self._positions(allowed_keys)
                if len(positions) == 0:
                    return _empty_results(len(queries), k)
                selector = faiss.IDSelectorBatch(positions)
            elif self.tombstones > MAX_OVERFETCH:
                selector = self._live_selector()
            else:
                fetch = k + self.tombstones
            fetch = min(fetch, ntotal)
            faiss_params = self._faiss_params(params, fetch, selector)
            scores, positions_found = self._index.search(
                queries, fetch, params=faiss_params
            )
            keys = np.where(positions_found >= 0, self._labels[positions_found], -1)
        return _first_live(scores, keys, k)

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        keys = keys[(keys >= 0) & (keys < len(self._position_of_key))]
        positions = self._position_of_key[keys]
        return np.ascontiguousarray(positions[positions >= 0])

    def _live_selector(self) -> faiss.IDSelector:
        if self._live_bitmap is None:
            self._live_bitmap = np.packbits(self._labels >= 0, bitorder="little")
        # FAISS keeps a pointer to the bitmap, which self._live_bitmap keeps alive
        # until the next write, and writes wait for searches to finish.
        return faiss.IDSelectorBitmap(
            len(self._live_bitmap), faiss.swig_ptr(self._live_bitmap)
        )

    def _faiss_params(
        self, params: SearchParams, fetch: int, selector: faiss.IDSelector | None
    ) -> faiss.SearchParameters:
        if self.kind == "hnsw":
            ef = params.ef_search or self.default_params.ef_search or fetch
            faiss_params = faiss.SearchParametersHNSW(efSearch=max(ef, fetch))
        else:
            nprobe = params.nprobe or self.default_params.nprobe or 1
            faiss_params = faiss.SearchParametersIVF(nprobe=nprobe)
        if selector is not None:
            faiss_params.sel = selector
        return faiss_params

    def frozen(self) -> contextlib.AbstractContextManager[None]:
        """Block writes, but not searches, while the block runs."""
        return self._lock.read()

    def write(self, path: Path) -> list[str]:
        """Write the FAISS index to ``path`` and the labels beside it.

        Returns the file names written. The caller must be inside ``frozen()``.
        """
        faiss.write_index(self._index, str(path))
        labels_path = _labels_path(path)
        np.save(labels_path, self._labels, allow_pickle=False)
        return [path.name, labels_path.name]

    @classmethod
    def read(
        cls, path: Path, kind: str, dim: int, config: IndexConfig, trained_size: int
    ) -> ApproximateIndex:
        """Read an index written by ``write``.

        Raises:
            SnapshotError: a file is unreadable or contains another kind of index.
        """
        index = _read_faiss(path)
        expected = faiss.IndexHNSWFlat if kind == "hnsw" else faiss.IndexIVFPQ
        if not isinstance(index, expected) or index.d != dim:
            raise SnapshotError(
                f"{path} contains a {type(index).__name__} of dimension {index.d}, "
                f"not a {expected.__name__} of dimension {dim}"
            )
        try:
            labels = np.load(_labels_path(path), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"cannot read the labels of {path}: {exc}") from exc
        return cls(kind, dim, index, _default_params(config), labels, trained_size)


def build_index(
    config: IndexConfig, dim: int, keys: np.ndarray, vectors: np.ndarray
) -> VectorIndex:
    """Build an index of the kind ``config`` chooses for these vectors."""
    keys, vectors = _check_keys_vectors(keys, vectors, dim)
    kind = choose_kind(config, len(keys))
    index: VectorIndex
    if kind == "exact":
        index = ExactIndex(dim)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = config.hnsw_ef_construction
        index = ApproximateIndex("hnsw", dim, hnsw, _default_params(config))
    else:
        index = _train_ivfpq(config, dim, vectors)
    index.add(keys, vectors)
    return index


def make_index(kind: str, dim: int, config: IndexConfig | None = None) -> VectorIndex:
    """Build an empty index of ``kind``; "ivfpq" needs vectors, see build_index."""
    if kind == "ivfpq" or kind not in INDEX_KINDS:
        raise ValueError(
            f"index kind {kind!r} cannot start empty; use 'exact' or 'hnsw', or "
            "build_index with training vectors for 'ivfpq'"
        )
    config = IndexConfig(kind=kind) if config is None else config
    empty = np.empty((0, dim), dtype=np.float32)
    if kind == "exact":
        return ExactIndex(dim)
    return build_index(
        IndexConfig(**{**asdict(config), "kind": kind}),
        dim,
        np.empty(0, dtype=np.int64),
        empty,
    )


def _train_ivfpq(
    config: IndexConfig, dim: int, vectors: np.ndarray
) -> ApproximateIndex:
    nlist, m, nbits = ivfpq_layout(len(vectors), dim)
    quantizer = faiss.IndexFlatIP(dim)
    ivfpq = faiss.IndexIVFPQ(
        quantizer, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT
    )
    # k-means cost grows with points x lists; 64 points per list (above FAISS's
    # minimum of 39) keeps training at 1M vectors within minutes on 2 cores.
    sample_size = min(len(vectors), 64 * max(nlist, 2**nbits))
    rng = np.random.default_rng(0)
    sample = vectors[rng.choice(len(vectors), sample_size, replace=False)]
    ivfpq.train(sample)
    logger.info(
        "Trained IVF-PQ on %d of %d vectors: nlist=%d, m=%d, nbits=%d",
        sample_size,
        len(vectors),
        nlist,
        m,
        nbits,
    )
    return ApproximateIndex(
        "ivfpq", dim, ivfpq, _default_params(config), trained_size=len(vectors)
    )


def _default_params(config: IndexConfig) -> SearchParams:
    return SearchParams(
        ef_search=config.hnsw_ef_search,
        nprobe=config.ivf_nprobe,
        rerank_factor=config.ivf_rerank_factor,
    )


def rerank_factor(index: VectorIndex, params: SearchParams | None) -> int:
    """Return how many candidates per result ``index`` fetches for re-ranking.

    Only IVF-PQ re-ranks, because its codes are lossy; other kinds return 1.
    """
    if not isinstance(index, ApproximateIndex) or index.kind != "ivfpq":
        return 1
    if params is not None and params.rerank_factor is not None:
        return params.rerank_factor
    return index.default_params.rerank_factor or 1


def rerank_exact(
    queries: np.ndarray,
    candidates: np.ndarray,
    keys: np.ndarray,
    vectors: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidate keys by exact inner product.

    Args:
        queries: float32 [Q, D].
        candidates: int64 [Q, F] keys from an approximate search, -1 for none.
        keys: int64 [U] keys whose vectors are known, sorted ascending.
        vectors: float32 [U, D], the vector of each key in ``keys``.
        k: results per query.

    Returns:
        (scores, keys), each [Q, k], best first; missing places have key -1.
        Candidates absent from ``keys`` (deleted since the search) are dropped.
        Equal scores keep the smaller key first.
    """
    out_scores, out_keys = _empty_results(len(queries), k)
    if len(keys) == 0:
        return out_scores, out_keys
    for row, query in enumerate(queries):
        found = np.unique(candidates[row][candidates[row] >= 0])
        positions = np.minimum(np.searchsorted(keys, found), len(keys) - 1)
        known = keys[positions] == found
        found, positions = found[known], positions[known]
        scores = vectors[positions] @ query
        best = np.argsort(-scores, kind="stable")[:k]
        out_scores[row, : len(best)] = scores[best]
        out_keys[row, : len(best)] = found[best]
    return out_scores, out_keys


def _check_keys_vectors(
    keys: np.ndarray, vectors: np.ndarray, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(
            f"vectors have shape {list(vectors.shape)}; expected [N, {dim}]"
        )
    if keys.shape != (vectors.shape[0],):
        raise ValueError(
            f"{len(keys)} keys for {vectors.shape[0]} vectors; pass one key each"
        )
    return keys, vectors


def _check_queries(queries: np.ndarray, k: int, dim: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(
            f"queries have shape {list(queries.shape)}; expected [Q, {dim}]"
        )
    if k < 1:
        raise ValueError(f"k is {k}; use k >= 1")
    return queries


def _empty_results(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.full((rows, k), -np.inf, dtype=np.float32)
    return scores, np.full((rows, k), -1, dtype=np.int64)


def _first_live(
    scores: np.ndarray, keys: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first k non-negative keys of each row, in order."""
    out_scores, out_keys = _empty_results(len(keys), k)
    for row in range(len(keys)):
        live = np.flatnonzero(keys[row] >= 0)[:k]
        out_scores[row, : len(live)] = scores[row, live]
        out_keys[row, : len(live)] = keys[row, live]
    return out_scores, out_keys


def _read_faiss(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise SnapshotError(f"FAISS could not read {path}: {exc}") from exc


def _labels_path(index_path: Path) -> Path:
    return index_path.with_suffix(".labels.npy")


# Snapshots


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot's description, written as ``index-<seq>.json`` beside its files.

    ``files`` maps each file of the snapshot to its sha256. ``index.json`` is a
    copy of the newest one.
    """

    seq: int
    bundle_sha256: str
    kind: str
    dim: int
    size: int
    index_file: str
    files: dict[str, str]
    trained_size: int = 0
    format_version: int = SNAPSHOT_FORMAT_VERSION


def write_snapshot(
    index: VectorIndex,
    data_dir: Path,
    seq: int,
    bundle_sha256: str,
    keep: int = 2,
) -> SnapshotInfo:
    """Write the index and its description atomically; return the description.

    The caller makes sure the index reflects exactly the changes up to ``seq``
    and is inside ``index.frozen()``. Each file is written to a temporary name,
    fsynced and renamed, and the folder is fsynced before ``index-<seq>.json``
    is written the same way, so a crash at any point leaves the older snapshots
    readable. Snapshots beyond the newest ``keep`` are removed afterwards.
    """
    if keep < 1:
        raise ValueError(f"keep is {keep}; keep at least 1 snapshot")
    data_dir.mkdir(parents=True, exist_ok=True)
    stem = f"index-{seq:012d}"
    index_file = f"{stem}.faiss"

    tmp_dir = Path(tempfile.mkdtemp(dir=data_dir, prefix=".snapshot-"))
    try:
        names = index.write(tmp_dir / index_file)
        files = {name: _fsync_and_hash(tmp_dir / name) for name in names}
        for name in names:
            os.replace(tmp_dir / name, data_dir / name)
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
        tmp_dir.rmdir()
    _fsync_dir(data_dir)

    info = SnapshotInfo(
        seq=seq,
        bundle_sha256=bundle_sha256,
        kind=index.kind,
        dim=index.dim,
        size=len(index),
        index_file=index_file,
        files=files,
        trained_size=index.trained_size,
    )
    _write_json_atomic(data_dir / f"{stem}.json", asdict(info))
    _write_json_atomic(data_dir / SNAPSHOT_FILENAME, asdict(info))
    _fsync_dir(data_dir)
    prune_snapshots(data_dir, keep)
    logger.info(
        "Wrote %s index snapshot %s: %d vectors at seq %d",
        info.kind,
        data_dir / index_file,
        info.size,
        seq,
    )
    return info


def prune_snapshots(data_dir: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` snapshots, and stray temporary files."""
    seqs = sorted(_snapshot_seqs(data_dir), reverse=True)
    kept = {f"index-{seq:012d}" for seq in seqs[:keep]}
    for path in data_dir.glob("index-*"):
        if path.name.split(".")[0] not in kept:
            path.unlink(missing_ok=True)
    for path in data_dir.glob(".index-*.tmp"):
        path.unlink(missing_ok=True)
    for folder in data_dir.glob(".snapshot-*"):
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()


def read_snapshot(
    data_dir: Path,
    bundle_sha256: str,
    dim: int,
    config: IndexConfig | None = None,
    max_seq: int | None = None,
) -> tuple[VectorIndex, SnapshotInfo]:
    """Load the newest good snapshot in ``data_dir``.

    Snapshots are tried newest first; one that is corrupt (checksum mismatch,
    unreadable), made for another model or dimension, or newer than ``max_seq``
    is skipped with a warning.

    Raises:
        SnapshotError: no good snapshot exists.
    """
    config = config or IndexConfig()
    seqs = sorted(_snapshot_seqs(data_dir), reverse=True)
    if not seqs:
        raise SnapshotError(f"no index snapshot in {data_dir}")
    for seq in seqs:
        info_path = data_dir / f"index-{seq:012d}.json"
        try:
            index, info = _read_one_snapshot(info_path, bundle_sha256, dim, config)
            if max_seq is not None and info.seq > max_seq:
                raise SnapshotError(
                    f"{info_path} is at seq {info.seq}, but the store only reaches "
                    f"seq {max_seq}"
                )
        except SnapshotError as exc:
            logger.warning("Skipped index snapshot: %s", exc)
            continue
        return index, info
    raise SnapshotError(f"no good index snapshot in {data_dir}")


def _snapshot_seqs(data_dir: Path) -> list[int]:
    if not data_dir.is_dir():
        return []
    seqs = []
    for path in data_dir.iterdir():
        match = _SNAPSHOT_INFO_RE.match(path.name)
        if match:
            seqs.append(int(match.group(1)))
    return seqs


def _read_one_snapshot(
    info_path: Path, bundle_sha256: str, dim: int, config: IndexConfig
) -> tuple[VectorIndex, SnapshotInfo]:
    try:
        info = SnapshotInfo(**json.loads(info_path.read_text()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise SnapshotError(f"{info_path} is invalid: {exc}") from exc

    expected = {
        "format_version": SNAPSHOT_FORMAT_VERSION,
        "bundle_sha256": bundle_sha256,
        "dim": dim,
    }
    for name, value in expected.items():
        if getattr(info, name) != value:
            raise SnapshotError(
                f"{info_path} has {name} {getattr(info, name)!r}, expected {value!r}"
            )
    if info.kind not in INDEX_KINDS:
        raise SnapshotError(f"{info_path} has unknown index kind {info.kind!r}")

    data_dir = info_path.parent
    for name, expected_sha256 in info.files.items():
        path = data_dir / name
        if not path.is_file():
            raise SnapshotError(f"{path} not found")
        actual_sha256 = _sha256(path)
        if actual_sha256 != expected_sha256:
            raise SnapshotError(
                f"{path} has sha256 {actual_sha256}, but {info_path} expects "
                f"{expected_sha256}"
            )

    index_path = data_dir / info.index_file
    index: VectorIndex
    if info.kind == "exact":
        index = ExactIndex.read(index_path, dim)
    else:
        index = ApproximateIndex.read(
            index_path, info.kind, dim, config, info.trained_size
        )
    if len(index) != info.size:
        raise SnapshotError(
            f"{index_path} contains {len(index)} vectors, but {info_path} expects "
            f"{info.size}"
        )
    return index, info


def _fsync_and_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb+") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
        os.fsync(f.fileno())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomic(path: Path, payload: dict[str, object]) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".index-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
