"""The SQLite item store: the source of truth for items and their vectors.

Every write runs in one transaction and returns only after the commit, which
with ``synchronous=FULL`` in WAL mode survives a process or power failure. Each
upsert and deletion appends a row to the ``changes`` table with a new sequence
number, so that a FAISS snapshot taken at sequence S is brought up to date by
replaying the changes after S.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

STORE_FILENAME = "items.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    key INTEGER NOT NULL UNIQUE,
    vector BLOB NOT NULL,
    metadata TEXT NOT NULL,
    thumbnail BLOB,
    seq INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('upsert', 'delete')),
    id TEXT NOT NULL,
    key INTEGER NOT NULL
);
"""


class StoreError(RuntimeError):
    """The data folder belongs to another model or another schema."""


@dataclass(frozen=True)
class NewItem:
    """An item to add or replace."""

    id: str
    vector: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class ItemRecord:
    """A stored item, without its vector and thumbnail bytes."""

    id: str
    key: int
    metadata: dict[str, Any]
    has_thumbnail: bool
    seq: int
    updated_at: str


@dataclass(frozen=True)
class UpsertResult:
    """The outcome of one upserted item."""

    record: ItemRecord
    created: bool


@dataclass(frozen=True)
class ChangeBatch:
    """Changes after some sequence number, read in one consistent snapshot.

    ``removed_keys`` are all FAISS keys touched by the changes; ``keys`` and
    ``vectors`` are the current vectors of those that still exist.
    """

    last_seq: int
    removed_keys: np.ndarray
    keys: np.ndarray
    vectors: np.ndarray


class ItemStore:
    """Items, their vectors and the change log in one SQLite file.

    Writes are serialised by one writer connection and a lock. Reads use a pool
    of read-only connections, so they run concurrently with each other and with
    a write.

    Args:
        data_dir: folder for ``items.sqlite3``; created if missing.
        bundle_sha256: sha256 of the model that makes the vectors.
        dim: embedding size.

    Raises:
        StoreError: the store was made with another model or embedding size.
    """

    def __init__(self, data_dir: str | Path, bundle_sha256: str, dim: int) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / STORE_FILENAME
        self.bundle_sha256 = bundle_sha256
        self.dim = dim

        self._write_lock = threading.Lock()
        self._writer = self._connect(read_only=False)
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        try:
            self._init_schema()
        except BaseException:
            self._writer.close()
            raise

    def _connect(self, read_only: bool) -> sqlite3.Connection:
        # isolation_level=None: transactions are opened explicitly with BEGIN.
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        if read_only:
            conn.execute("PRAGMA query_only=ON")
        return conn

    def _init_schema(self) -> None:
        with self._write_lock, self._transaction() as conn:
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")

        with self._write_lock, self._transaction() as conn:
            conn.execute("BEGIN IMMEDIATE")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("bundle_sha256", self.bundle_sha256),
                        ("dim", str(self.dim)),
                        ("next_key", "0"),
                        ("created_at", _now()),
                    ],
                )
                conn.execute("COMMIT")
                logger.info("Created item store %s", self.path)
                return
            conn.execute("ROLLBACK")

        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.path} has schema version {meta.get('schema_version')}, but "
                f"this release reads version {SCHEMA_VERSION}; use a new data dir"
            )
        if meta.get("bundle_sha256") != self.bundle_sha256:
            raise StoreError(
                f"{self.path} contains vectors from the model with sha256 "
                f"{meta.get('bundle_sha256')}, but the loaded bundle's sha256 is "
                f"{self.bundle_sha256}; vectors from different models cannot be "
                "compared, so use a new data dir or re-embed the items with "
                "`dcl index` into a new data dir"
            )
        if meta.get("dim") != str(self.dim):
            raise StoreError(
                f"{self.path} contains {meta.get('dim')}-dimensional vectors, but the "
                f"bundle makes {self.dim}-dimensional ones; use a new data dir"
            )
        logger.info("Opened item store %s", self.path)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Yield the writer connection; roll back if the block raises."""
        if self._closed:
            raise StoreError(f"{self.path} is closed")
        try:
            yield self._writer
        except BaseException:
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise StoreError(f"{self.path} is closed")
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect(read_only=True)
            with self._readers_lock:
                self._all_readers.append(conn)
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._readers.put(conn)

    def close(self) -> None:
        """Close every connection. The store cannot be used afterwards."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
        with self._readers_lock:
            for conn in self._all_readers:
                conn.close()
            self._all_readers.clear()

    # Writes

    def upsert(self, items: Sequence[NewItem]) -> list[UpsertResult]:
        """Add or replace items in one transaction; return after the commit.

        A replaced item keeps its FAISS key; a new item gets a key never used
        before, also when its id was deleted earlier.
        """
        ids = [item.id for item in items]
        if len(set(ids)) != len(ids):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"ids {duplicates} appear more than once; send each once")
        blobs = [self._vector_blob(item) for item in items]
        metadata_texts = [json.dumps(item.metadata, sort_keys=True) for item in items]

        results: list[UpsertResult] = []
        with self._write_lock, self._transaction() as conn:
            conn.execute("BEGIN IMMEDIATE")
            next_key = int(_meta_value(conn, "next_key"))
            now = _now()
            for item, blob, metadata_text in zip(
                items, blobs, metadata_texts, strict=True
            ):
                row = conn.execute(
                    "SELECT key FROM items WHERE id = ?", (item.id,)
                ).fetchone()
                created = row is None
                if created:
                    key = next_key
                    next_key += 1
                else:
                    key = row[0]
                seq = conn.execute(
                    "INSERT INTO changes (op, id, key) VALUES ('upsert', ?, ?)",
                    (item.id, key),
                ).lastrowid
                conn.execute(
                    "INSERT INTO items (id, key, vector, metadata, thumbnail, seq, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET vector = excluded.vector, "
                    "metadata = excluded.metadata, thumbnail = excluded.thumbnail, "
                    "seq = excluded.seq, updated_at = excluded.updated_at",
                    (item.id, key, blob, metadata_text, item.thumbnail, seq, now),
                )
                record = ItemRecord(
                    id=item.id,
                    key=key,
                    metadata=json.loads(metadata_text),
                    has_thumbnail=item.thumbnail is not None,
                    seq=int(seq or 0),
                    updated_at=now,
                )
                results.append(UpsertResult(record=record, created=created))
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'next_key'", (str(next_key),)
            )
            conn.execute("COMMIT")
        return results

    def delete(self, item_id: str) -> ItemRecord | None:
        """Delete an item; return its record, or None if no item has that id."""
        with self._write_lock, self._transaction() as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM items WHERE id = ?", (item_id,)
            ).fetchone()
            if row is None:
                conn.execute("ROLLBACK")
                return None
            record = _record(row)
            conn.execute(
                "INSERT INTO changes (op, id, key) VALUES ('delete', ?, ?)",
                (item_id, record.key),
            )
            conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
            conn.execute("COMMIT")
        return record

    def _vector_blob(self, item: NewItem) -> bytes:
        vector = np.asarray(item.vector, dtype=np.float32)
        if vector.shape != (self.dim,):
            raise ValueError(
                f"item {item.id!r} has a vector of shape {list(vector.shape)}; "
                f"expected [{self.dim}]"
            )
        if not np.all(np.isfinite(vector)):
            raise ValueError(f"item {item.id!r} has a vector with NaN or inf values")
        return vector.tobytes()

    # Reads

    def get(self, item_id: str) -> ItemRecord | None:
        """Return an item's record, or None if no item has that id."""
        with self._reader() as conn:
            row = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM items WHERE id = ?", (item_id,)
            ).fetchone()
        return None if row is None else _record(row)

    def get_vector(self, item_id: str) -> np.ndarray | None:
        """Return an item's float32 vector, or None if no item has that id."""
        with self._reader() as conn:
            row = conn.execute(
                "SELECT vector FROM items WHERE id = ?", (item_id,)
            ).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32)

    def get_thumbnail(self, item_id: str) -> bytes | None:
        """Return an item's JPEG thumbnail, or None if it has none or is absent."""
        with self._reader() as conn:
            row = conn.execute(
                "SELECT thumbnail FROM items WHERE id = ?", (item_id,)
            ).fetchone()
        return None if row is None else row[0]

    def get_by_keys(self, keys: Sequence[int]) -> dict[int, ItemRecord]:
        """Return the records of the items with these FAISS keys that still exist."""
        if not keys:
            return {}
        records: dict[int, ItemRecord] = {}
        with self._reader() as conn:
            # SQLite allows at least 999 bound parameters per statement.
            for start in range(0, len(keys), 900):
                chunk = [int(k) for k in keys[start : start + 900]]
                placeholders = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT {_RECORD_COLUMNS} FROM items "
                    f"WHERE key IN ({placeholders})",
                    chunk,
                ).fetchall()
                for row in rows:
                    record = _record(row)
                    records[record.key] = record
        return records

    def count(self) -> int:
        """Return the number of items."""
        with self._reader() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def last_seq(self) -> int:
        """Return the sequence number of the latest change, 0 if none."""
        with self._reader() as conn:
            return _last_seq(conn)

    def changes_since(self, seq: int) -> ChangeBatch:
        """Return the changes after ``seq`` with the current vectors they touch."""
        with self._reader() as conn:
            conn.execute("BEGIN")
            last_seq = _last_seq(conn)
            touched = [
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT key FROM changes WHERE seq > ? AND seq <= ?",
                    (seq, last_seq),
                )
            ]
            keys, vectors = self._vectors_where(
                conn,
                "key IN (SELECT key FROM changes WHERE seq > ? AND seq <= ?)",
                (seq, last_seq),
            )
            conn.execute("COMMIT")
        return ChangeBatch(
            last_seq=last_seq,
            removed_keys=np.asarray(touched, dtype=np.int64),
            keys=keys,
            vectors=vectors,
        )

    def all_vectors(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Return (last seq, keys, vectors) of every item in one snapshot."""
        with self._reader() as conn:
            conn.execute("BEGIN")
            last_seq = _last_seq(conn)
            keys, vectors = self._vectors_where(conn, "1", ())
            conn.execute("COMMIT")
        return last_seq, keys, vectors

    def _vectors_where(
        self, conn: sqlite3.Connection, where: str, params: tuple[Any, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = conn.execute(
            f"SELECT key, vector FROM items WHERE {where} ORDER BY key", params
        ).fetchall()
        keys = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.empty((len(rows), self.dim), dtype=np.float32)
        for i, row in enumerate(rows):
            vectors[i] = np.frombuffer(row[1], dtype=np.float32)
        return keys, vectors


_RECORD_COLUMNS = "id, key, metadata, thumbnail IS NOT NULL, seq, updated_at"


def _record(row: tuple[Any, ...]) -> ItemRecord:
    return ItemRecord(
        id=row[0],
        key=int(row[1]),
        metadata=json.loads(row[2]),
        has_thumbnail=bool(row[3]),
        seq=int(row[4]),
        updated_at=row[5],
    )


def _meta_value(conn: sqlite3.Connection, key: str) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise StoreError(f"the store's meta table has no {key!r}; use a new data dir")
    return str(row[0])


def _last_seq(conn: sqlite3.Connection) -> int:
    # The change log keeps every row, so its largest seq is the latest change.
    row = conn.execute("SELECT MAX(seq) FROM changes").fetchone()
    return int(row[0] or 0)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
