"""HNSW and IVF-PQ indexes, tombstones, rebuilds, filters and snapshots."""

from __future__ import annotations

import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from service.collection import Collection
from service.index import (
    IVFPQ_MIN_TRAIN_SIZE,
    MAX_OVERFETCH,
    MAX_RERANK_FACTOR,
    ApproximateIndex,
    IndexConfig,
    SearchParams,
    build_index,
    choose_kind,
    ivfpq_layout,
    read_snapshot,
    rerank_exact,
)
from service.store import NewItem

DIM = 16
SHA = "c" * 64


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def new_items(start: int, n: int, seed: int = 0) -> list[NewItem]:
    vectors = unit_vectors(n, seed)
    return [
        NewItem(
            id=f"item-{start + i}",
            vector=vectors[i],
            metadata={"label": ["cat", "dog"][(start + i) % 2], "n": start + i},
        )
        for i in range(n)
    ]


def hit_ids(collection: Collection, vector: np.ndarray, k: int, **kwargs) -> list[str]:
    (hits,) = collection.search(vector[None, :], k, **kwargs)
    return [hit.record.id for hit in hits]


@pytest.fixture
def hnsw(tmp_path: Path):
    config = IndexConfig(kind="hnsw", hnsw_m=8, max_tombstone_fraction=0.5)
    collection = Collection(tmp_path, SHA, DIM, config=config)
    yield collection
    collection.close()


def test_choose_kind_thresholds():
    auto = IndexConfig(kind="auto")
    assert choose_kind(auto, 10) == "exact"
    assert choose_kind(auto, 100_000) == "hnsw"
    assert choose_kind(auto, 2_000_000) == "ivfpq"
    ivfpq = IndexConfig(kind="ivfpq")
    assert choose_kind(ivfpq, IVFPQ_MIN_TRAIN_SIZE - 1) == "exact"
    assert choose_kind(ivfpq, IVFPQ_MIN_TRAIN_SIZE) == "ivfpq"
    with pytest.raises(ValueError, match="not supported"):
        IndexConfig(kind="lsh")


def test_ivfpq_layout_fits_training_size():
    for size, dim in [(312, 16), (100_000, 512), (1_000_000, 512), (5_000, 30)]:
        nlist, m, nbits = ivfpq_layout(size, dim)
        assert size >= 39 * nlist
        assert size >= 39 * 2**nbits
        assert dim % m == 0
    assert ivfpq_layout(1_000_000, 512) == (4096, 64, 8)
    with pytest.raises(ValueError, match="at least 312"):
        ivfpq_layout(100, 16)


def test_hnsw_add_replace_delete(hnsw: Collection):
    items = new_items(0, 50)
    hnsw.upsert(items)
    assert hnsw.kind == "hnsw"
    assert len(hnsw) == 50
    assert hit_ids(hnsw, items[7].vector, 1) == ["item-7"]

    moved = unit_vectors(1, seed=99)[0]
    hnsw.upsert([NewItem(id="item-7", vector=moved)])
    hnsw.delete("item-8")
    assert len(hnsw) == 49
    assert hnsw.index.tombstones == 2
    assert hit_ids(hnsw, moved, 1) == ["item-7"]
    assert "item-8" not in hit_ids(hnsw, items[8].vector, 49)
    # The old vector of item-7 is dead, so item-7 is not its nearest any more.
    assert hit_ids(hnsw, items[7].vector, 1) != ["item-7"]


def test_hnsw_k_results_despite_tombstones(hnsw: Collection):
    items = new_items(0, 60)
    hnsw.upsert(items)
    for i in range(20):
        hnsw.delete(f"item-{i}")
    assert hnsw.index.tombstones == 20
    ids = hit_ids(hnsw, items[0].vector, 10)
    assert len(ids) == 10
    assert all(int(i.split("-")[1]) >= 20 for i in ids)
    # Asking for every live item returns all of them.
    assert (
        len(hit_ids(hnsw, items[0].vector, 40, params=SearchParams(ef_search=200)))
        == 40
    )


def test_many_tombstones_use_live_bitmap():
    config = IndexConfig(kind="hnsw", hnsw_m=8)
    vectors = unit_vectors(MAX_OVERFETCH + 200, seed=3)
    keys = np.arange(len(vectors))
    index = build_index(config, DIM, keys, vectors)
    index.remove(keys[: MAX_OVERFETCH + 100])
    assert index.tombstones > MAX_OVERFETCH
    _, found = index.search(vectors[-1:], 10, SearchParams(ef_search=256))
    assert found[0][0] == keys[-1]
    assert np.all(found[0] >= MAX_OVERFETCH + 100)


def test_tombstones_trigger_background_rebuild(tmp_path: Path):
    config = IndexConfig(kind="hnsw", hnsw_m=8, max_tombstone_fraction=0.2)
    collection = Collection(tmp_path, SHA, DIM, config=config)
    try:
        items = new_items(0, 40)
        collection.upsert(items)
        old_index = collection.index
        for i in range(12):
            collection.delete(f"item-{i}")
        collection.wait_for_rebuild(timeout=30)
        assert collection.rebuilds >= 1
        assert collection.index is not old_index
        # Deletions after the rebuild started leave at most 3 new tombstones.
        assert collection.index.tombstones <= 3
        assert len(collection) == 28
        assert collection.applied_seq == collection.store.last_seq()
        assert hit_ids(collection, items[30].vector, 1) == ["item-30"]
    finally:
        collection.close()


def test_rebuild_swaps_while_searching(hnsw: Collection):
    items = new_items(0, 200)
    hnsw.upsert(items)
    errors: list[BaseException] = []
    stop = threading.Event()

    def search_forever() -> None:
        try:
            while not stop.is_set():
                ids = hit_ids(hnsw, items[5].vector, 3)
                if ids[0] != "item-5":
                    raise AssertionError(f"search returned {ids}")
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=search_forever) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            hnsw.rebuild()
            hnsw.upsert(new_items(1000, 1, seed=7))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert hnsw.rebuilds == 3
    assert len(hnsw) == 201


def test_search_params_are_per_call(hnsw: Collection):
    items = new_items(0, 100)
    hnsw.upsert(items)
    index = hnsw.index
    assert isinstance(index, ApproximateIndex)
    inner = index._index
    before = inner.hnsw.efSearch
    hit_ids(hnsw, items[0].vector, 5, params=SearchParams(ef_search=1))
    hit_ids(hnsw, items[0].vector, 5, params=SearchParams(ef_search=500))
    assert inner.hnsw.efSearch == before
    with pytest.raises(ValueError, match="ef_search is 0"):
        SearchParams(ef_search=0)


def test_ivfpq_falls_back_then_trains(tmp_path: Path):
    config = IndexConfig(kind="ivfpq", ivf_nprobe=4)
    collection = Collection(tmp_path, SHA, DIM, config=config)
    try:
        collection.upsert(new_items(0, IVFPQ_MIN_TRAIN_SIZE - 12))
        assert collection.kind == "exact"
        items = new_items(1000, 100, seed=1)
        collection.upsert(items)
        collection.wait_for_rebuild(timeout=60)
        assert collection.kind == "ivfpq"
        assert len(collection) == IVFPQ_MIN_TRAIN_SIZE + 88
        inner = collection.index._index
        assert isinstance(inner, faiss.IndexIVFPQ)
        nlist = inner.nlist
        # With every list visited, the coarse 3-bit PQ codes of this small
        # training set still rank an item among its own 20 nearest.
        params = SearchParams(nprobe=nlist)
        found = sum(
            item.id in hit_ids(collection, item.vector, 20, params=params)
            for item in items[:20]
        )
        assert found >= 15
        assert inner.nprobe == 1

        collection.delete(items[0].id)
        assert items[0].id not in hit_ids(
            collection, items[0].vector, 20, params=params
        )
    finally:
        collection.close()


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_filter_returns_k_matches(tmp_path: Path, kind: str):
    collection = Collection(tmp_path, SHA, DIM, kind=kind)
    try:
        collection.upsert(new_items(0, 100))
        query = unit_vectors(1, seed=5)[0]
        (hits,) = collection.search(
            query[None, :], 10, SearchParams(ef_search=100), {"label": "cat"}
        )
        assert len(hits) == 10
        assert all(hit.record.metadata["label"] == "cat" for hit in hits)
        # The filtered results are the exact top 10 among the cat items.
        vectors = unit_vectors(100)
        cats = np.arange(0, 100, 2)
        best = cats[np.argsort(-(vectors[cats] @ query))[:10]]
        if kind == "exact":
            assert [hit.record.id for hit in hits] == [f"item-{i}" for i in best]
    finally:
        collection.close()


def test_filter_types_and_misses(tmp_path: Path):
    collection = Collection(tmp_path, SHA, DIM)
    try:
        collection.upsert(
            [
                NewItem(id="a", vector=unit_vectors(1, 1)[0], metadata={"x": 1}),
                NewItem(id="b", vector=unit_vectors(1, 2)[0], metadata={"x": True}),
                NewItem(id="c", vector=unit_vectors(1, 3)[0], metadata={"x": "1"}),
                NewItem(id="d", vector=unit_vectors(1, 4)[0], metadata={"x": None}),
            ]
        )
        query = unit_vectors(1, 9)
        for value, expected in [(1, "a"), (1.0, "a"), (True, "b"), ("1", "c")]:
            (hits,) = collection.search(query, 5, metadata_filter={"x": value})
            assert [hit.record.id for hit in hits] == [expected], value
        (hits,) = collection.search(query, 5, metadata_filter={"x": None})
        assert [hit.record.id for hit in hits] == ["d"]
        (hits,) = collection.search(query, 5, metadata_filter={"missing": 1})
        assert hits == []
        with pytest.raises(ValueError, match="filter value"):
            collection.search(query, 5, metadata_filter={"x": [1]})
    finally:
        collection.close()


def test_hnsw_snapshot_round_trip(tmp_path: Path):
    config = IndexConfig(kind="hnsw", hnsw_m=8, max_tombstone_fraction=0.9)
    collection = Collection(tmp_path, SHA, DIM, config=config)
    items = new_items(0, 30)
    collection.upsert(items)
    collection.delete("item-3")
    collection.snapshot()
    collection.delete("item-4")
    collection.close()

    reopened = Collection(tmp_path, SHA, DIM, config=config)
    try:
        assert reopened.kind == "hnsw"
        assert reopened.snapshot_seq == 31
        assert reopened.applied_seq == 32
        assert len(reopened) == 28
        assert reopened.index.tombstones == 2
        ids = hit_ids(reopened, items[3].vector, 28, params=SearchParams(ef_search=64))
        assert "item-3" not in ids
        assert "item-4" not in ids
        assert hit_ids(reopened, items[9].vector, 1) == ["item-9"]
    finally:
        reopened.close()


def test_corrupt_newest_snapshot_falls_back(tmp_path: Path):
    collection = Collection(tmp_path, SHA, DIM, snapshots_kept=2)
    collection.upsert(new_items(0, 5))
    older = collection.snapshot()
    collection.upsert(new_items(5, 5, seed=1))
    newest = collection.snapshot()
    collection.close()
    path = tmp_path / newest.index_file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    index, info = read_snapshot(tmp_path, SHA, DIM)
    assert info.seq == older.seq
    assert len(index) == 5
    reopened = Collection(tmp_path, SHA, DIM)
    try:
        assert reopened.snapshot_seq == older.seq
        assert len(reopened) == 10
    finally:
        reopened.close()


def test_old_snapshots_pruned(tmp_path: Path):
    collection = Collection(tmp_path, SHA, DIM, snapshots_kept=2)
    try:
        for n in range(4):
            collection.upsert(new_items(n, 1, seed=n))
            collection.snapshot()
    finally:
        collection.close()
    infos = sorted(p.name for p in tmp_path.glob("index-*.json"))
    assert infos == ["index-000000000003.json", "index-000000000004.json"]
    assert len(list(tmp_path.glob("index-*.faiss"))) == 2
    assert not list(tmp_path.glob(".snapshot-*"))


def test_periodic_snapshot_after_n_changes(tmp_path: Path):
    collection = Collection(tmp_path, SHA, DIM)
    try:
        collection.start_background(every_changes=5, every_seconds=3600)
        collection.upsert(new_items(0, 3))
        assert collection.snapshot_seq is None
        collection.upsert(new_items(3, 3, seed=1))
        for _ in range(200):
            if collection.snapshot_seq is not None:
                break
            threading.Event().wait(0.05)
        assert collection.snapshot_seq == 6
        assert (tmp_path / "index-000000000006.json").is_file()
    finally:
        collection.close()


def test_periodic_snapshot_after_t_seconds(tmp_path: Path):
    collection = Collection(tmp_path, SHA, DIM)
    try:
        collection.start_background(every_changes=0, every_seconds=0.2)
        collection.upsert(new_items(0, 2))
        for _ in range(200):
            if collection.snapshot_seq == 2:
                break
            threading.Event().wait(0.05)
        assert collection.snapshot_seq == 2
    finally:
        collection.close()


@pytest.fixture
def trained_ivfpq(tmp_path: Path):
    """An IVF-PQ collection of 600 items, trained, with its item vectors."""
    collection = Collection(tmp_path, SHA, DIM, config=IndexConfig(kind="ivfpq"))
    items = new_items(0, IVFPQ_MIN_TRAIN_SIZE - 12)
    collection.upsert(items)
    more = new_items(len(items), 600 - len(items), seed=1)
    collection.upsert(more)
    collection.wait_for_rebuild(timeout=60)
    yield collection, items + more
    collection.close()


def test_ivfpq_rerank_matches_exact(trained_ivfpq):
    collection, items = trained_ivfpq
    assert collection.kind == "ivfpq"
    vectors = np.stack([item.vector for item in items])
    ids = np.array([item.id for item in items])
    queries = unit_vectors(10, seed=7)
    nlist = collection.index._index.nlist
    # 10 x 64 candidates cover all 600 items, so re-ranking must give exact
    # results, although the 3-bit PQ codes of this small set rank poorly.
    params = SearchParams(nprobe=nlist, rerank_factor=MAX_RERANK_FACTOR)

    results = collection.search(queries, 10, params=params)

    for query, hits in zip(queries, results, strict=True):
        exact_scores = vectors @ query
        expected = ids[np.argsort(-exact_scores, kind="stable")[:10]]
        assert [hit.record.id for hit in hits] == list(expected)
        scores = [hit.score for hit in hits]
        assert scores == sorted(scores, reverse=True)
        by_id = dict(zip(ids, exact_scores, strict=True))
        np.testing.assert_allclose(
            scores, [by_id[hit.record.id] for hit in hits], atol=1e-5
        )


def test_ivfpq_without_rerank_scores_approximate(trained_ivfpq):
    # The check above can fail: PQ distances differ from exact inner products.
    collection, items = trained_ivfpq
    vectors = {item.id: item.vector for item in items}
    query = unit_vectors(1, seed=7)[0]
    nlist = collection.index._index.nlist

    (hits,) = collection.search(
        query[None, :], 5, params=SearchParams(nprobe=nlist, rerank_factor=1)
    )

    errors = [abs(hit.score - float(vectors[hit.record.id] @ query)) for hit in hits]
    assert max(errors) > 1e-3


def test_ivfpq_rerank_skips_deleted(trained_ivfpq):
    collection, items = trained_ivfpq
    nlist = collection.index._index.nlist
    params = SearchParams(nprobe=nlist, rerank_factor=MAX_RERANK_FACTOR)
    target = items[3]
    assert hit_ids(collection, target.vector, 10, params=params)[0] == target.id

    collection.delete(target.id)

    assert target.id not in hit_ids(collection, target.vector, 10, params=params)


def test_rerank_exact_orders_and_drops():
    keys = np.array([2, 5, 9], dtype=np.int64)
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    queries = np.array([[0.0, 1.0]], dtype=np.float32)
    # Key 7 has no stored vector (deleted) and -1 is an empty place.
    candidates = np.array([[2, 7, 9, -1, 5]], dtype=np.int64)

    scores, found = rerank_exact(queries, candidates, keys, vectors, 4)

    assert found.tolist() == [[5, 9, 2, -1]]
    np.testing.assert_allclose(scores[0, :3], [1.0, 0.8, 0.0], atol=1e-6)
    assert scores[0, 3] == -np.inf


def test_rerank_exact_no_stored_vectors():
    candidates = np.array([[4, 1]], dtype=np.int64)
    queries = np.ones((1, 2), dtype=np.float32)

    _, found = rerank_exact(
        queries, candidates, np.empty(0, np.int64), np.empty((0, 2), np.float32), 2
    )

    assert found.tolist() == [[-1, -1]]


@pytest.mark.parametrize("factor", [0, MAX_RERANK_FACTOR + 1])
def test_rerank_factor_bounds(factor: int):
    with pytest.raises(ValueError, match="rerank_factor"):
        SearchParams(rerank_factor=factor)
    with pytest.raises(ValueError, match="ivf_rerank_factor"):
        IndexConfig(kind="ivfpq", ivf_rerank_factor=factor)
