"""A collection: the item store and the FAISS index kept in step with it.

Writes go to the store first and are acknowledged after the commit. The index
then catches up by replaying the store's change log, so it also picks up changes
that another process, such as ``dcl index``, committed to the same store.

A background thread (``start_background``) writes snapshots every N changes or
T seconds. Rebuilds (too many tombstones, IVF-PQ ready to train or grown past
its training size, ``auto`` crossing a size threshold) run in their own thread
on a fresh index and swap it in atomically, while searches and writes continue
on the old one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.index import (
    INDEX_KINDS,
    IVFPQ_RETRAIN_GROWTH,
    IndexConfig,
    SearchParams,
    SnapshotError,
    SnapshotInfo,
    VectorIndex,
    build_index,
    choose_kind,
    read_snapshot,
    rerank_exact,
    rerank_factor,
    write_snapshot,
)
from service.store import FilterValue, ItemRecord, ItemStore, NewItem, UpsertResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchHit:
    """One search result."""

    record: ItemRecord
    score: float


class Collection:
    """Items in SQLite and their vectors in a FAISS index, kept consistent.

    Searches run concurrently; writes are serialised, and the index applies the
    store's changes in sequence order.

    Args:
        data_dir: folder for the store and the index snapshots.
        bundle_sha256: sha256 of the model whose vectors the collection holds.
        dim: embedding size.
        kind: index kind, used when ``config`` is None.
        config: index kind and parameters.
        snapshots_kept: number of snapshots kept on disk.

    Raises:
        StoreError: the data folder was made with another model.
    """

    def __init__(
        self,
        data_dir: str | Path,
        bundle_sha256: str,
        dim: int,
        kind: str = "exact",
        config: IndexConfig | None = None,
        snapshots_kept: int = 2,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.bundle_sha256 = bundle_sha256
        self.dim = dim
        self.config = config or IndexConfig(kind=kind)
        if snapshots_kept < 1:
            raise ValueError(f"snapshots_kept is {snapshots_kept}; use 1 or more")
        self.snapshots_kept = snapshots_kept
        self.store = ItemStore(self.data_dir, bundle_sha256, dim)
        self._sync_lock = threading.Lock()
        self.snapshot_seq: int | None = None
        self.rebuilds = 0
        self._rebuild_thread: threading.Thread | None = None
        self._rebuild_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._snapshot_every_changes = 0
        self.index, self.applied_seq = self._load_index()

    @property
    def kind(self) -> str:
        """Kind of the index in use (IVF-PQ shows "exact" until it is trained)."""
        return self.index.kind

    def _load_index(self) -> tuple[VectorIndex, int]:
        store_seq = self.store.last_seq()
        try:
            index, info = read_snapshot(
                self.data_dir, self.bundle_sha256, self.dim, self.config, store_seq
            )
        except SnapshotError as exc:
            logger.info("Building the index from the store: %s", exc)
            return self._build_index()

        wanted = choose_kind(self.config, self.store.count())
        if info.kind != wanted and _kind_rank(wanted) > _kind_rank(info.kind):
            logger.info(
                "Index snapshot is %s but the configuration asks for %s; rebuilding",
                info.kind,
                wanted,
            )
            return self._build_index()

        self.snapshot_seq = info.seq
        changes = self.store.changes_since(info.seq)
        index.apply(changes.removed_keys, changes.keys, changes.vectors)
        logger.info(
            "Loaded %s index snapshot at seq %d (%d vectors) and replayed changes "
            "up to seq %d",
            info.kind,
            info.seq,
            info.size,
            changes.last_seq,
        )

        expected = self.store.count()
        if len(index) != expected and self.store.last_seq() == changes.last_seq:
            logger.warning(
                "Index contains %d vectors after replay but the store has %d items; "
                "rebuilding the index from the store",
                len(index),
                expected,
            )
            return self._build_index()
        return index, changes.last_seq

    def _build_index(self) -> tuple[VectorIndex, int]:
        seq, keys, vectors = self.store.all_vectors()
        index = build_index(self.config, self.dim, keys, vectors)
        self.snapshot_seq = None
        logger.info(
            "Built the %s index from the store: %d vectors at seq %d",
            index.kind,
            len(index),
            seq,
        )
        return index, seq

    # Writes

    def upsert(self, items: Sequence[NewItem]) -> list[UpsertResult]:
        """Add or replace items; return after the store commit and index update."""
        results = self.store.upsert(items)
        self.sync()
        return results

    def delete(self, item_id: str) -> ItemRecord | None:
        """Delete an item; return its record, or None if no item has that id."""
        record = self.store.delete(item_id)
        if record is not None:
            self.sync()
        return record

    def sync(self) -> int:
        """Apply the store's changes newer than the index; return the new seq.

        Starts a background rebuild when the index needs one, and wakes the
        snapshot thread once enough changes have piled up.
        """
        with self._sync_lock:
            changes = self.store.changes_since(self.applied_seq)
            if changes.last_seq > self.applied_seq:
                self.index.apply(changes.removed_keys, changes.keys, changes.vectors)
                self.applied_seq = changes.last_seq
            applied = self.applied_seq
            unsaved = applied - (self.snapshot_seq or 0)
        if self._snapshot_every_changes and unsaved >= self._snapshot_every_changes:
            self._wake.set()
        reason = self.rebuild_reason()
        if reason is not None:
            self.start_rebuild(reason)
        return applied

    # Rebuilds

    def rebuild_reason(self) -> str | None:
        """Return why the index should be rebuilt, or None if it should not."""
        index = self.index
        size = len(index)
        wanted = choose_kind(self.config, size)
        if _kind_rank(wanted) > _kind_rank(index.kind):
            return f"{size} vectors call for a {wanted} index instead of {index.kind}"
        total = size + index.tombstones
        if index.tombstones and (
            index.tombstones / total > self.config.max_tombstone_fraction
        ):
            return (
                f"{index.tombstones} of {total} positions are tombstones, more than "
                f"{self.config.max_tombstone_fraction:.0%}"
            )
        if index.kind == "ivfpq" and size >= IVFPQ_RETRAIN_GROWTH * index.trained_size:
            return (
                f"the IVF-PQ index was trained on {index.trained_size} vectors and "
                f"now holds {size}"
            )
        return None

    def start_rebuild(self, reason: str) -> bool:
        """Rebuild the index in a background thread unless one is running.

        Returns whether a rebuild was started.
        """
        with self._rebuild_lock:
            if self._rebuild_thread is not None and self._rebuild_thread.is_alive():
                return False
            if self._stopping.is_set():
                return False
            logger.info("Rebuilding the index in the background: %s", reason)
            self._rebuild_thread = threading.Thread(
                target=self._rebuild_logged, name="index-rebuild", daemon=True
            )
            self._rebuild_thread.start()
            return True

    def wait_for_rebuild(self, timeout: float | None = None) -> None:
        """Wait until the running background rebuild, if any, has finished."""
        thread = self._rebuild_thread
        if thread is not None:
            thread.join(timeout)

    def _rebuild_logged(self) -> None:
        try:
            self.rebuild()
        except Exception:
            # The old index keeps serving; the next write retries the rebuild.
            logger.exception("Background index rebuild failed")

    def rebuild(self) -> VectorIndex:
        """Build a fresh index from the store and swap it in; return it.

        Reading and building run without locks, so searches and writes go on
        with the old index. The new index then replays the changes committed
        meanwhile, under the sync lock, and replaces the old one in one
        assignment; a search that already holds the old index finishes on it.
        """
        seq, keys, vectors = self.store.all_vectors()
        fresh = build_index(self.config, self.dim, keys, vectors)
        with self._sync_lock:
            changes = self.store.changes_since(seq)
            fresh.apply(changes.removed_keys, changes.keys, changes.vectors)
            old = self.index
            self.index = fresh
            self.applied_seq = changes.last_seq
            self.rebuilds += 1
        logger.info(
            "Swapped in a rebuilt %s index: %d vectors at seq %d (was %s with %d "
            "tombstones)",
            fresh.kind,
            len(fresh),
            changes.last_seq,
            old.kind,
            old.tombstones,
        )
        return fresh

    # Snapshots

    def snapshot(self) -> SnapshotInfo:
        """Write an index snapshot at the applied seq; searches keep running.

        Writes wait until the snapshot is on disk.
        """
        with self._sync_lock, self.index.frozen():
            info = write_snapshot(
                self.index,
                self.data_dir,
                self.applied_seq,
                self.bundle_sha256,
                keep=self.snapshots_kept,
            )
        self.snapshot_seq = info.seq
        return info

    def start_background(self, every_changes: int, every_seconds: float) -> None:
        """Start the thread that writes a snapshot every N changes or T seconds.

        A snapshot is written once ``every_changes`` changes are not in the
        latest one, or ``every_seconds`` after the latest one if any change is
        missing from it. ``every_changes`` = 0 turns the count trigger off.
        """
        if every_changes < 0 or every_seconds <= 0:
            raise ValueError(
                f"every_changes is {every_changes} and every_seconds is "
                f"{every_seconds}; use every_changes >= 0 and every_seconds > 0"
            )
        if self._worker is not None:
            raise RuntimeError("the snapshot thread is already running")
        self._snapshot_every_changes = every_changes
        self._worker = threading.Thread(
            target=self._snapshot_loop,
            args=(every_changes, every_seconds),
            name="index-snapshots",
            daemon=True,
        )
        self._worker.start()

    def _snapshot_loop(self, every_changes: int, every_seconds: float) -> None:
        last_time = time.monotonic()
        while not self._stopping.is_set():
            self._wake.wait(
                timeout=max(0.0, last_time + every_seconds - time.monotonic())
            )
            self._wake.clear()
            if self._stopping.is_set():
                return
            unsaved = self.applied_seq - (self.snapshot_seq or 0)
            due_by_count = every_changes and unsaved >= every_changes
            due_by_time = time.monotonic() - last_time >= every_seconds
            if self.snapshot_seq != self.applied_seq and (due_by_count or due_by_time):
                try:
                    self.snapshot()
                except OSError:
                    logger.exception("Writing a periodic index snapshot failed")
                last_time = time.monotonic()
            elif due_by_time:
                last_time = time.monotonic()

    # Reads

    def search(
        self,
        queries: np.ndarray,
        k: int,
        params: SearchParams | None = None,
        metadata_filter: dict[str, FilterValue] | None = None,
    ) -> list[list[SearchHit]]:
        """Return up to k hits per query, best first, only items that exist.

        ``metadata_filter`` keeps items whose metadata has every given
        key-value pair. With the exact index, k hits come back whenever k items
        match; approximate kinds may return fewer for a selective filter (see
        ``ApproximateIndex.search``). IVF-PQ with a re-ranking factor above 1
        (``SearchParams.rerank_factor``) fetches that many times k candidates.
        They are then ordered by the exact inner product with their float
        vectors, read from the store, so scores are exact while the index keeps
        only the PQ codes in memory.
        """
        index = self.index
        allowed = None
        if metadata_filter:
            allowed = self.store.keys_matching(metadata_filter)
            if len(allowed) == 0:
                return [[] for _ in range(len(queries))]
        factor = rerank_factor(index, params)
        scores, keys = index.search(queries, k * factor, params, allowed)
        if factor > 1:
            stored_keys, vectors = self.store.vectors_by_keys(keys)
            queries = np.asarray(queries, dtype=np.float32)
            scores, keys = rerank_exact(queries, keys, stored_keys, vectors, k)
        found = self.store.get_by_keys(sorted({int(x) for x in keys.ravel() if x >= 0}))
        results: list[list[SearchHit]] = []
        for row_scores, row_keys in zip(scores, keys, strict=True):
            hits = [
                SearchHit(record=found[int(key)], score=float(score))
                for score, key in zip(row_scores, row_keys, strict=True)
                if key >= 0 and int(key) in found
            ]
            results.append(hits)
        return results

    def __len__(self) -> int:
        return len(self.index)

    def close(self) -> None:
        """Stop the background threads and close the store's connections."""
        self._stopping.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join()
        self.wait_for_rebuild()
        self.store.close()


def _kind_rank(kind: str) -> int:
    return INDEX_KINDS.index(kind)
