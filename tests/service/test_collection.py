"""Item store, FAISS index, snapshots and replay, on real SQLite and FAISS."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from service.collection import Collection
from service.index import ExactIndex, make_index
from service.store import ItemStore, NewItem, StoreError

DIM = 8
SHA = "a" * 64


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def items(ids: list[str], seed: int = 0) -> list[NewItem]:
    vectors = unit_vectors(len(ids), seed)
    return [
        NewItem(id=i, vector=v, metadata={"name": i})
        for i, v in zip(ids, vectors, strict=True)
    ]


def search_ids(collection: Collection, vector: np.ndarray, k: int) -> list[str]:
    (hits,) = collection.search(vector[None, :], k)
    return [hit.record.id for hit in hits]


@pytest.fixture
def collection(tmp_path: Path):
    c = Collection(tmp_path, SHA, DIM)
    yield c
    c.close()


def test_add_search_finds_itself(collection: Collection):
    added = items([f"item-{i}" for i in range(20)])
    results = collection.upsert(added)
    assert all(r.created for r in results)
    assert len(collection) == 20
    for item in added:
        (hits,) = collection.search(item.vector[None, :], 5)
        assert hits[0].record.id == item.id
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)


def test_fewer_items_than_k(collection: Collection):
    collection.upsert(items(["a", "b"]))
    (hits,) = collection.search(unit_vectors(1, seed=9), 10)
    assert sorted(h.record.id for h in hits) == ["a", "b"]


def test_replace_keeps_key_and_moves_vector(collection: Collection):
    (first,) = collection.upsert(items(["x"], seed=1))
    new_vector = unit_vectors(1, seed=2)[0]
    (second,) = collection.upsert([NewItem(id="x", vector=new_vector, metadata={})])
    assert not second.created
    assert second.record.key == first.record.key
    assert len(collection) == 1
    (hits,) = collection.search(new_vector[None, :], 1)
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert collection.store.get("x").metadata == {}


def test_delete_never_returned(collection: Collection):
    added = items(["a", "b", "c"])
    collection.upsert(added)
    assert collection.delete("b") is not None
    assert collection.delete("b") is None
    assert len(collection) == 2
    assert "b" not in search_ids(collection, added[1].vector, 10)
    assert collection.store.get("b") is None


def test_readd_after_delete_gets_new_key(collection: Collection):
    (first,) = collection.upsert(items(["a"]))
    collection.delete("a")
    (again,) = collection.upsert(items(["a"]))
    assert again.created
    assert again.record.key != first.record.key


def test_duplicate_ids_rejected(collection: Collection):
    with pytest.raises(ValueError, match="more than once"):
        collection.upsert(items(["a", "a"]))
    assert len(collection) == 0


def test_wrong_vector_dim_rejected(collection: Collection):
    with pytest.raises(ValueError, match=r"expected \[8\]"):
        collection.upsert([NewItem(id="a", vector=np.ones(3, dtype=np.float32))])
    assert collection.store.count() == 0


def test_snapshot_then_replay_after_reopen(tmp_path: Path):
    added = items([f"i{n}" for n in range(10)])
    c = Collection(tmp_path, SHA, DIM)
    c.upsert(added)
    info = c.snapshot()
    assert info.seq == 10
    # Changes after the snapshot: one delete, one replace, one new item.
    c.delete("i3")
    moved = unit_vectors(1, seed=5)[0]
    c.upsert([NewItem(id="i4", vector=moved)])
    c.upsert(items(["new"], seed=6))
    c.close()

    reopened = Collection(tmp_path, SHA, DIM)
    try:
        assert reopened.snapshot_seq == 10
        assert reopened.applied_seq == 13
        assert len(reopened) == 10
        assert "i3" not in search_ids(reopened, added[3].vector, 20)
        assert search_ids(reopened, moved, 1) == ["i4"]
        assert search_ids(reopened, unit_vectors(1, seed=6)[0], 1) == ["new"]
    finally:
        reopened.close()


def test_corrupt_snapshot_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    added = items([f"i{n}" for n in range(5)])
    c = Collection(tmp_path, SHA, DIM)
    c.upsert(added)
    info = c.snapshot()
    c.close()
    index_path = tmp_path / info.index_file
    index_path.write_bytes(index_path.read_bytes()[:-10] + b"0123456789")

    with caplog.at_level("INFO", logger="service.collection"):
        reopened = Collection(tmp_path, SHA, DIM)
    try:
        assert "Building the index from the store" in caplog.text
        assert reopened.snapshot_seq is None
        assert len(reopened) == 5
        assert search_ids(reopened, added[2].vector, 1) == ["i2"]
    finally:
        reopened.close()


def test_garbage_snapshot_json_rebuilt(tmp_path: Path):
    c = Collection(tmp_path, SHA, DIM)
    c.upsert(items(["a", "b"]))
    c.snapshot()
    c.close()
    (tmp_path / "index.json").write_text("{broken")
    (tmp_path / "index-000000000002.json").write_text("{broken")
    reopened = Collection(tmp_path, SHA, DIM)
    try:
        assert len(reopened) == 2
    finally:
        reopened.close()


def test_snapshot_newer_than_store_rebuilt(tmp_path: Path):
    c = Collection(tmp_path, SHA, DIM)
    c.upsert(items(["a", "b"]))
    c.snapshot()
    c.close()
    info_path = tmp_path / "index-000000000002.json"
    info = json.loads(info_path.read_text())
    info["seq"] = 99
    info_path.write_text(json.dumps(info))
    reopened = Collection(tmp_path, SHA, DIM)
    try:
        assert reopened.snapshot_seq is None
        assert reopened.applied_seq == 2
        assert len(reopened) == 2
    finally:
        reopened.close()


def test_sync_picks_up_other_writer(tmp_path: Path):
    server_side = Collection(tmp_path, SHA, DIM)
    other = ItemStore(tmp_path, SHA, DIM)
    try:
        other.upsert(items(["from-cli"], seed=3))
        assert len(server_side) == 0
        server_side.upsert(items(["from-api"], seed=4))
        # The server's own write replays the other writer's change first.
        assert len(server_side) == 2
        assert search_ids(server_side, unit_vectors(1, seed=3)[0], 1) == ["from-cli"]
    finally:
        other.close()
        server_side.close()


def test_store_rejects_other_bundle(tmp_path: Path):
    ItemStore(tmp_path, SHA, DIM).close()
    with pytest.raises(StoreError, match="DCL_REEMBED_ON_MODEL_CHANGE"):
        ItemStore(tmp_path, "b" * 64, DIM)
    with pytest.raises(StoreError, match="new data dir"):
        ItemStore(tmp_path, SHA, DIM + 1)


def test_store_is_wal_with_change_log(tmp_path: Path):
    store = ItemStore(tmp_path, SHA, DIM)
    store.upsert(items(["a", "b"]))
    store.delete("a")
    store.close()
    conn = sqlite3.connect(tmp_path / "items.sqlite3")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        ops = conn.execute("SELECT seq, op, id FROM changes ORDER BY seq").fetchall()
    finally:
        conn.close()
    assert ops == [(1, "upsert", "a"), (2, "upsert", "b"), (3, "delete", "a")]


def test_store_write_survives_reopen(tmp_path: Path):
    store = ItemStore(tmp_path, SHA, DIM)
    vector = unit_vectors(1)[0]
    store.upsert([NewItem(id="a", vector=vector, metadata={"k": [1, 2]})])
    store.close()
    reopened = ItemStore(tmp_path, SHA, DIM)
    try:
        np.testing.assert_array_equal(reopened.get_vector("a"), vector)
        assert reopened.get("a").metadata == {"k": [1, 2]}
    finally:
        reopened.close()


def test_index_remove_and_replace():
    index = make_index("exact", DIM)
    vectors = unit_vectors(4)
    index.add(np.arange(4), vectors)
    assert index.remove(np.array([1, 7])) == 1
    index.replace(np.array([2]), vectors[3:4])
    scores, keys = index.search(vectors[3:4], 4)
    assert list(keys[0][:2]) in ([2, 3], [3, 2])
    assert keys[0][3] == -1
    assert len(index) == 3


def test_index_rejects_bad_input():
    index = ExactIndex(DIM)
    with pytest.raises(ValueError, match=r"expected \[N, 8\]"):
        index.add(np.arange(2), np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="k is 0"):
        index.search(unit_vectors(1), 0)
    with pytest.raises(ValueError, match="cannot start empty"):
        make_index("ivfpq", DIM)
