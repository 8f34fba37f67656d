"""The SQLite item store: the source of truth for items and their vectors.

Every write runs in one transaction and returns only after the commit, which
with ``synchronous=FULL`` in WAL mode survives a process or power failure. Each
upsert and deletion appends a row to the ``changes`` table with a new sequence
number, so that a FAISS snapshot taken at sequence S is brought up to date by
replaying the changes after S.

Items added from an image keep their source (the uploaded bytes, or the path,
size and modification time of a file indexed by ``dcl index``), so that a new
model can re-embed them; see ``ItemStore.switch_model``.
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
SCHEMA_VERSION = 2

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
    updated_at TEXT NOT NULL,
    source BLOB,
    source_path TEXT,
    source_size INTEGER,
    source_mtime_ns INTEGER
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('upsert', 'delete')),
    id TEXT NOT NULL,
    key INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reembedded (
    key INTEGER PRIMARY KEY,
    bundle_sha256 TEXT NOT NULL,
    vector BLOB NOT NULL
);
"""

# Version 1 stores lack the source columns and the re-embedding table.
_MIGRATE_1_TO_2 = """
ALTER TABLE items ADD COLUMN source BLOB;
ALTER TABLE items ADD COLUMN source_path TEXT;
ALTER TABLE items ADD COLUMN source_size INTEGER;
ALTER TABLE items ADD COLUMN source_mtime_ns INTEGER;
CREATE TABLE IF NOT EXISTS reembedded (
    key INTEGER PRIMARY KEY,
    bundle_sha256 TEXT NOT NULL,
    vector BLOB NOT NULL
);
UPDATE meta SET value = '2' WHERE key = 'schema_version';
"""

FilterValue = str | int | float | bool | None


class StoreError(RuntimeError):
    """The data folder belongs to another model or another schema."""


@dataclass(frozen=True)
class FileSource:
    """An image file on disk that an item was embedded from."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class NewItem:
    """An item to add or replace.

    ``source`` is the encoded image it was embedded from and ``source_file``
    the file it was read from; either lets a new model re-embed the item. An
    item added by vector has neither.
    """

    id: str
    vector: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    thumbnail: bytes | None = None
    source: bytes | None = None
    source_file: FileSource | None = None


@dataclass(frozen=True)
class SourceRow:
    """An item's key and the image source a new model re-embeds it from."""

    key: int
    id: str
    source: bytes | None
    source_path: str | None


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
        check_model: with False, open a store made with another model, to
            re-embed its items; ``bundle_sha256`` and ``dim`` then become the
            stored ones.

    Raises:
        StoreError: the store was made with another model or embedding size.
    """

    def __init__(
        self,
        data_dir: str | Path,
        bundle_sha256: str,
        dim: int,
        check_model: bool = True,
    ) -> None:
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
        self._check_model = check_model
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

        if meta.get("schema_version") == "1":
            with self._write_lock, self._transaction() as conn:
                conn.executescript("BEGIN IMMEDIATE;" + _MIGRATE_1_TO_2 + "COMMIT;")
            meta["schema_version"] = "2"
            logger.info("Migrated item store %s to schema version 2", self.path)
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.path} has schema version {meta.get('schema_version')}, but "
                f"this release reads version {SCHEMA_VERSION}; use a new data dir"
            )
        if not self._check_model:
            self.bundle_sha256 = meta["bundle_sha256"]
            self.dim = int(meta["dim"])
        if meta.get("bundle_sha256") != self.bundle_sha256:
            raise StoreError(
                f"{self.path} contains vectors from the model with sha256 "
                f"{meta.get('bundle_sha256')}, but the loaded bundle's sha256 is "
                f"{self.bundle_sha256}; vectors from different models cannot be "
                "compared; start the server with DCL_REEMBED_ON_MODEL_CHANGE=true "
                "to re-embed the items, or use a new data dir"
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
                file = item.source_file
                conn.execute(
                    "INSERT INTO items (id, key, vector, metadata, thumbnail, seq, "
                    "updated_at, source, source_path, source_size, source_mtime_ns) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET vector = excluded.vector, "
                    "metadata = excluded.metadata, thumbnail = excluded.thumbnail, "
                    "seq = excluded.seq, updated_at = excluded.updated_at, "
                    "source = excluded.source, source_path = excluded.source_path, "
                    "source_size = excluded.source_size, "
                    "source_mtime_ns = excluded.source_mtime_ns",
                    (
                        item.id,
                        key,
                        blob,
                        metadata_text,
                        item.thumbnail,
                        seq,
                        now,
                        item.source,
                        None if file is None else file.path,
                        None if file is None else file.size,
                        None if file is None else file.mtime_ns,
                    ),
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

    def file_sources(self, item_ids: Sequence[str]) -> dict[str, FileSource]:
        """Return the recorded source files of these items, where they have one."""
        sources: dict[str, FileSource] = {}
        with self._reader() as conn:
            for start in range(0, len(item_ids), 900):
                chunk = list(item_ids[start : start + 900])
                placeholders = ",".join("?" * len(chunk))
                rows = conn.execute(
                    "SELECT id, source_path, source_size, source_mtime_ns FROM items "
                    f"WHERE id IN ({placeholders}) AND source_path IS NOT NULL",
                    chunk,
                ).fetchall()
                for item_id, path, size, mtime_ns in rows:
                    sources[item_id] = FileSource(path, int(size), int(mtime_ns))
        return sources

    def keys_matching(self, metadata_filter: dict[str, FilterValue]) -> np.ndarray:
        """Return the keys of items whose metadata has every key-value pair given.

        Values compare by JSON type and value: ``1`` matches ``1`` and ``1.0``
        but not ``true`` or ``"1"``. Only top-level keys and scalar values are
        supported. Scans every item's metadata, so it costs O(items).
        """
        if not metadata_filter:
            raise ValueError("the filter is empty; pass at least one key-value pair")
        clauses, params = [], []
        for name, value in metadata_filter.items():
            json_types, atom = _json_atom(name, value)
            type_marks = ",".join("?" * len(json_types))
            clause = (
                "EXISTS (SELECT 1 FROM json_each(items.metadata) AS m "
                f"WHERE m.key = ? AND m.type IN ({type_marks})"
            )
            params += [name, *json_types]
            if atom is not None:
                clause += " AND m.atom = ?"
                params.append(atom)
            clauses.append(clause + ")")
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT key FROM items WHERE {' AND '.join(clauses)}", params
            ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

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

    def vectors_by_keys(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (sorted keys, float32 vectors) of the stored items among ``keys``.

        Keys below 0 (FAISS's "no result") and keys of deleted items are skipped.
        """
        unique_keys = np.unique(keys[keys >= 0])
        keys_parts = [np.empty(0, dtype=np.int64)]
        vector_parts = [np.empty((0, self.dim), dtype=np.float32)]
        with self._reader() as conn:
            # SQLite allows at least 999 bound parameters per statement.
            for start in range(0, len(unique_keys), 900):
                chunk = tuple(int(key) for key in unique_keys[start : start + 900])
                where = f"key IN ({','.join('?' * len(chunk))})"
                found_keys, vectors = self._vectors_where(conn, where, chunk)
                keys_parts.append(found_keys)
                vector_parts.append(vectors)
        return np.concatenate(keys_parts), np.concatenate(vector_parts)

    def all_vectors(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Return (last seq, keys, vectors) of every item in one snapshot."""
        with self._reader() as conn:
            conn.execute("BEGIN")
            last_seq = _last_seq(conn)
            keys, vectors = self._vectors_where(conn, "1", ())
            conn.execute("COMMIT")
        return last_seq, keys, vectors

    # Re-embedding with a new model

    def count_without_source(self, limit: int = 10) -> tuple[int, list[str]]:
        """Return how many items have no image source, and up to ``limit`` ids."""
        where = "source IS NULL AND source_path IS NULL"
        with self._reader() as conn:
            count = conn.execute(f"SELECT COUNT(*) FROM items WHERE {where}")
            total = int(count.fetchone()[0])
            rows = conn.execute(
                f"SELECT id FROM items WHERE {where} ORDER BY key LIMIT ?", (limit,)
            ).fetchall()
        return total, [r[0] for r in rows]

    def sources_to_reembed(
        self, bundle_sha256: str, after_key: int, limit: int
    ) -> list[SourceRow]:
        """Return up to ``limit`` items after ``after_key`` not yet re-embedded.

        Items already re-embedded for ``bundle_sha256`` by an earlier, interrupted
        run are skipped.
        """
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT i.key, i.id, i.source, i.source_path FROM items AS i "
                "LEFT JOIN reembedded AS r "
                "ON r.key = i.key AND r.bundle_sha256 = ? "
                "WHERE i.key > ? AND r.key IS NULL ORDER BY i.key LIMIT ?",
                (bundle_sha256, after_key, limit),
            ).fetchall()
        return [SourceRow(int(r[0]), r[1], r[2], r[3]) for r in rows]

    def put_reembedded(
        self, bundle_sha256: str, keys: Sequence[int], vectors: np.ndarray
    ) -> None:
        """Store the new model's vectors of these keys beside the current ones."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(
                f"{len(keys)} keys for vectors of shape {list(vectors.shape)}; "
                "pass one vector per key"
            )
        if not np.all(np.isfinite(vectors)):
            raise ValueError("re-embedded vectors contain NaN or inf values")
        rows = [
            (int(key), bundle_sha256, vector.tobytes())
            for key, vector in zip(keys, vectors, strict=True)
        ]
        with self._write_lock, self._transaction() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT OR REPLACE INTO reembedded (key, bundle_sha256, vector) "
                "VALUES (?, ?, ?)",
                rows,
            )
            conn.execute("COMMIT")

    def switch_model(self, bundle_sha256: str, dim: int) -> None:
        """Replace every vector by its re-embedded one and record the new model.

        Runs in one transaction, so a crash leaves either the old model's
        vectors or the new model's, never a mix. Every change gets a new row in
        the change log.

        Raises:
            StoreError: some items have not been re-embedded for this model.
        """
        with self._write_lock, self._transaction() as conn:
            conn.execute("BEGIN IMMEDIATE")
            missing = conn.execute(
                "SELECT COUNT(*) FROM items AS i LEFT JOIN reembedded AS r "
                "ON r.key = i.key AND r.bundle_sha256 = ? WHERE r.key IS NULL",
                (bundle_sha256,),
            ).fetchone()[0]
            if missing:
                raise StoreError(
                    f"{missing} items have no vector from the model with sha256 "
                    f"{bundle_sha256}; re-embed them before switching"
                )
            conn.execute(
                "UPDATE items SET vector = (SELECT r.vector FROM reembedded AS r "
                "WHERE r.key = items.key)"
            )
            conn.execute(
                "INSERT INTO changes (op, id, key) "
                "SELECT 'upsert', id, key FROM items ORDER BY key"
            )
            conn.execute("DELETE FROM reembedded")
            conn.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                [(bundle_sha256, "bundle_sha256"), (str(dim), "dim")],
            )
            conn.execute("COMMIT")
        self.bundle_sha256 = bundle_sha256
        self.dim = dim

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


def _json_atom(name: str, value: FilterValue) -> tuple[list[str], Any]:
    """Return the json_each types and atom that match ``value``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"filter key {name!r} is invalid; use a non-empty string")
    if value is None:
        return ["null"], None
    if isinstance(value, bool):
        return ["true" if value else "false"], None
    if isinstance(value, int | float):
        return ["integer", "real"], value
    if isinstance(value, str):
        return ["text"], value
    raise ValueError(
        f"filter value for {name!r} is a {type(value).__name__}; use a string, "
        "number, boolean or null"
    )


def read_store_model(data_dir: str | Path) -> tuple[str, int] | None:
    """Return the (bundle sha256, dim) a store was made with, or None if absent."""
    path = Path(data_dir) / STORE_FILENAME
    if not path.is_file():
        return None
    conn = sqlite3.connect(path, timeout=30.0)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    if "bundle_sha256" not in meta:
        return None
    return meta["bundle_sha256"], int(meta["dim"])


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
