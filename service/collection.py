"""A collection: the item store and the FAISS index kept in step with it.

Writes go to the store first and are acknowledged after the commit. The index
then catches up by replaying the store's change log, so it also picks up changes
that another process, such as ``dcl index``, committed to the same store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.index import (
    ExactIndex,
    SearchParams,
    SnapshotError,
    SnapshotInfo,
    make_index,
    read_snapshot,
    write_snapshot,
)
from service.store import ItemRecord, ItemStore, NewItem, UpsertResult

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
        kind: index kind; only "exact" for now.

    Raises:
        StoreError: the data folder was made with another model.
    """

    def __init__(
        self, data_dir: str | Path, bundle_sha256: str, dim: int, kind: str = "exact"
    ) -> None:
        self.data_dir = Path(data_dir)
        self.bundle_sha256 = bundle_sha256
        self.dim = dim
        self.kind = kind
        self.store = ItemStore(self.data_dir, bundle_sha256, dim)
        self._sync_lock = threading.Lock()
        self.snapshot_seq: int | None = None
        self.index, self.applied_seq = self._load_index()

    def _load_index(self) -> tuple[ExactIndex, int]:
        try:
            index, info = read_snapshot(
                self.data_dir, self.bundle_sha256, self.dim, self.kind
            )
        except SnapshotError as exc:
            logger.info("Building the index from the store: %s", exc)
            return self._build_index()

        store_seq = self.store.last_seq()
        if info.seq > store_seq:
            logger.warning(
                "Index snapshot is at seq %d but the store only reaches seq %d; "
                "rebuilding the index from the store",
                info.seq,
                store_seq,
            )
            return self._build_index()

        self.snapshot_seq = info.seq
        changes = self.store.changes_since(info.seq)
        index.apply(changes.removed_keys, changes.keys, changes.vectors)
        logger.info(
            "Loaded index snapshot at seq %d (%d vectors) and replayed changes up "
            "to seq %d",
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

    def _build_index(self) -> tuple[ExactIndex, int]:
        seq, keys, vectors = self.store.all_vectors()
        index = make_index(self.kind, self.dim)
        index.add(keys, vectors)
        self.snapshot_seq = None
        logger.info(
            "Built the index from the store: %d vectors at seq %d", len(index), seq
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
        """Apply the store's changes newer than the index; return the new seq."""
        with self._sync_lock:
            changes = self.store.changes_since(self.applied_seq)
            if changes.last_seq > self.applied_seq:
                self.index.apply(changes.removed_keys, changes.keys, changes.vectors)
                self.applied_seq = changes.last_seq
            return self.applied_seq

    def snapshot(self) -> SnapshotInfo:
        """Write an index snapshot at the applied seq; searches keep running."""
        with self._sync_lock, self.index.frozen():
            info = write_snapshot(
                self.index, self.data_dir, self.applied_seq, self.bundle_sha256
            )
        self.snapshot_seq = info.seq
        return info

    # Reads

    def search(
        self, queries: np.ndarray, k: int, params: SearchParams | None = None
    ) -> list[list[SearchHit]]:
        """Return up to k hits per query, best first, only items that exist."""
        scores, keys = self.index.search(queries, k, params)
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
        """Close the store's connections."""
        self.store.close()
