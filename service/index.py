"""The FAISS index over the stored vectors, and its snapshots on disk.

The index is derived data: ``service.store`` is the source of truth, and a
snapshot records the change sequence number it reflects, so that start-up loads
it and replays only newer changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import faiss
import numpy as np

logger = logging.getLogger(__name__)

IndexKind = Literal["exact"]
SNAPSHOT_FILENAME = "index.json"
SNAPSHOT_FORMAT_VERSION = 1


class SnapshotError(RuntimeError):
    """A snapshot is missing, corrupt, or does not match the store."""


@dataclass(frozen=True)
class SearchParams:
    """Per-call search parameters.

    The exact index has none. Approximate kinds will read theirs from here, for
    example HNSW's ``ef_search`` or IVF's ``nprobe``, and pass them to FAISS for
    one call instead of setting them on the shared index.
    """


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

    def __len__(self) -> int: ...

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, keys: np.ndarray) -> int: ...

    def search(
        self, queries: np.ndarray, k: int, params: SearchParams | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def write(self, path: Path) -> None: ...


class ExactIndex:
    """Exact inner-product search, ``IndexIDMap2(IndexFlatIP(dim))``.

    Keys are the store's int64 FAISS keys. Thread-safe: searches run together
    (FAISS releases the GIL), and ``add`` and ``remove`` wait for them to finish.
    """

    kind = "exact"

    def __init__(self, dim: int, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self._index = index or faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._lock = ReadWriteLock()

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under keys that are not in the index yet."""
        keys, vectors = _check_keys_vectors(keys, vectors, self.dim)
        if len(keys) == 0:
            return
        with self._lock.write():
            self._index.add_with_ids(vectors, keys)

    def remove(self, keys: np.ndarray) -> int:
        """Remove these keys where present; return how many were removed."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return 0
        with self._lock.write():
            return int(self._index.remove_ids(faiss.IDSelectorBatch(keys)))

    def replace(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Set the vectors of these keys, whether present or not."""
        keys, vectors = _check_keys_vectors(keys, vectors, self.dim)
        with self._lock.write():
            if len(keys):
                self._index.remove_ids(faiss.IDSelectorBatch(keys))
                self._index.add_with_ids(vectors, keys)

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
        self, queries: np.ndarray, k: int, params: SearchParams | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, keys), each [Q, k], best first.

        Where fewer than k vectors exist, the missing places have key -1 and
        score -inf; callers drop them.
        """
        del params  # The exact index has no search parameters.
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries have shape {list(queries.shape)}; expected [Q, {self.dim}]"
            )
        if k < 1:
            raise ValueError(f"k is {k}; use k >= 1")
        with self._lock.read():
            scores, keys = self._index.search(queries, k)
        return scores, keys

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Block writes, but not searches, while the block runs."""
        with self._lock.read():
            yield

    def write(self, path: Path) -> None:
        """Write the index to ``path``. The caller must be inside ``frozen()``."""
        faiss.write_index(self._index, str(path))

    @classmethod
    def read(cls, path: Path, dim: int) -> ExactIndex:
        """Read an index written by ``write``.

        Raises:
            SnapshotError: the file is unreadable or not an exact index of ``dim``.
        """
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise SnapshotError(f"FAISS could not read {path}: {exc}") from exc
        if not isinstance(index, faiss.IndexIDMap2) or index.d != dim:
            raise SnapshotError(
                f"{path} contains a {type(index).__name__} of dimension {index.d}, "
                f"not an exact IndexIDMap2 of dimension {dim}"
            )
        return cls(dim, index)


def make_index(kind: str, dim: int) -> ExactIndex:
    """Build an empty index of ``kind``."""
    if kind == "exact":
        return ExactIndex(dim)
    # TODO: add "hnsw" and "ivfpq" kinds, with tombstones for deletions where
    # FAISS cannot remove ids, and per-call SearchParams.
    raise ValueError(f"index kind {kind!r} is not supported; use 'exact'")


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


# Snapshots


@dataclass(frozen=True)
class SnapshotInfo:
    """Contents of ``index.json``, written beside the FAISS file it describes."""

    seq: int
    bundle_sha256: str
    kind: str
    dim: int
    size: int
    index_file: str
    index_sha256: str
    format_version: int = SNAPSHOT_FORMAT_VERSION


def write_snapshot(
    index: ExactIndex, data_dir: Path, seq: int, bundle_sha256: str
) -> SnapshotInfo:
    """Write the index and ``index.json`` atomically; return what was written.

    The caller makes sure the index reflects exactly the changes up to ``seq``
    and is inside ``index.frozen()``. The FAISS file is named after ``seq`` and
    renamed into place before ``index.json`` points at it, so a crash at any
    point leaves the previous snapshot readable. Older FAISS files are removed
    afterwards.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    index_file = f"index-{seq:012d}.faiss"
    index_path = data_dir / index_file

    fd, tmp_name = tempfile.mkstemp(dir=data_dir, prefix=".index-", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        index.write(tmp_path)
        index_sha256 = _fsync_and_hash(tmp_path)
        os.replace(tmp_path, index_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    _fsync_dir(data_dir)

    info = SnapshotInfo(
        seq=seq,
        bundle_sha256=bundle_sha256,
        kind=index.kind,
        dim=index.dim,
        size=len(index),
        index_file=index_file,
        index_sha256=index_sha256,
    )
    _write_json_atomic(data_dir / SNAPSHOT_FILENAME, info.__dict__)
    _fsync_dir(data_dir)

    for old in data_dir.glob("index-*.faiss"):
        if old.name != index_file:
            old.unlink(missing_ok=True)
    logger.info(
        "Wrote index snapshot %s: %d vectors at seq %d", index_path, info.size, seq
    )
    return info


def read_snapshot(
    data_dir: Path, bundle_sha256: str, dim: int, kind: str
) -> tuple[ExactIndex, SnapshotInfo]:
    """Load the snapshot in ``data_dir`` and check it.

    Raises:
        SnapshotError: no snapshot, or it is corrupt or made for another model,
            dimension or index kind.
    """
    info_path = data_dir / SNAPSHOT_FILENAME
    if not info_path.is_file():
        raise SnapshotError(f"{info_path} not found")
    try:
        info = SnapshotInfo(**json.loads(info_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise SnapshotError(f"{info_path} is invalid: {exc}") from exc

    expected = {
        "format_version": SNAPSHOT_FORMAT_VERSION,
        "bundle_sha256": bundle_sha256,
        "dim": dim,
        "kind": kind,
    }
    for name, value in expected.items():
        if getattr(info, name) != value:
            raise SnapshotError(
                f"{info_path} has {name} {getattr(info, name)!r}, expected {value!r}"
            )

    index_path = data_dir / info.index_file
    if not index_path.is_file():
        raise SnapshotError(f"{index_path} not found")
    actual_sha256 = _sha256(index_path)
    if actual_sha256 != info.index_sha256:
        raise SnapshotError(
            f"{index_path} has sha256 {actual_sha256}, but {info_path} expects "
            f"{info.index_sha256}"
        )
    index = ExactIndex.read(index_path, dim)
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
