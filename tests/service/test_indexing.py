"""Indexing a folder of real image files into a data dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.collection import Collection
from service.encoder import Encoder
from service.indexing import index_folder
from service.preprocess import decode_image, preprocess_batch
from tests.data_paths import extract_cifar10_subset
from tests.service.conftest import encode, random_image


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for label in ("red", "blue"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            seed = i if label == "red" else 10 + i
            fmt = "PNG" if i % 2 else "JPEG"
            suffix = ".png" if fmt == "PNG" else ".jpg"
            (root / label / f"{i}{suffix}").write_bytes(encode(random_image(seed), fmt))
    (root / "top.png").write_bytes(encode(random_image(99)))
    (root / "blue" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_index_folder_twice_no_duplicates(
    bundle_dir: Path, tmp_path: Path, image_folder: Path
):
    data_dir = tmp_path / "data"
    first = index_folder(bundle_dir, data_dir, image_folder, batch_size=3)
    assert first.scanned == 8
    assert first.added == 7
    assert first.updated == 0
    assert first.skipped == 1
    assert list(first.skipped_files) == ["blue/broken.jpg"]
    assert first.total_items == 7

    second = index_folder(bundle_dir, data_dir, image_folder, batch_size=4)
    assert second.added == 0
    assert second.updated == 0
    assert second.unchanged == 7
    assert second.skipped == 1
    assert second.total_items == 7

    # A rewritten file has a new size or modification time and is embedded again.
    (image_folder / "red/1.png").write_bytes(encode(random_image(1, size=(44, 32))))
    third = index_folder(bundle_dir, data_dir, image_folder, batch_size=4)
    assert third.updated == 1
    assert third.unchanged == 6

    encoder = Encoder(bundle_dir)
    collection = Collection(data_dir, encoder.sha256, encoder.dim)
    try:
        assert len(collection) == 7
        assert collection.snapshot_seq == collection.applied_seq == 8
        record = collection.store.get("red/1.png")
        assert record.metadata == {"path": "red/1.png", "label": "red"}
        assert record.has_thumbnail
        assert collection.store.get("top.png").metadata == {"path": "top.png"}

        image = decode_image((image_folder / "red/1.png").read_bytes(), 10**6)
        query = encoder.embed(preprocess_batch([image], encoder.metadata.preprocessing))
        (hits,) = collection.search(query, 3)
        assert hits[0].record.id == "red/1.png"
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    finally:
        collection.close()


def test_index_folder_rejects_missing_folder(bundle_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="not found"):
        index_folder(bundle_dir, tmp_path / "data", tmp_path / "nope")


def test_index_cifar_subset_finds_itself(bundle_dir: Path, tmp_path: Path):
    images = extract_cifar10_subset(tmp_path / "cifar", "test", per_class=3)
    report = index_folder(bundle_dir, tmp_path / "data", images, batch_size=16)
    assert report.added == 30
    assert report.skipped == 0

    encoder = Encoder(bundle_dir)
    collection = Collection(tmp_path / "data", encoder.sha256, encoder.dim)
    try:
        ids = ["cat/0000.jpg", "ship/0002.jpg"]
        decoded = [decode_image((images / i).read_bytes(), 10**6) for i in ids]
        queries = encoder.embed(
            preprocess_batch(decoded, encoder.metadata.preprocessing)
        )
        for item_id, hits in zip(ids, collection.search(queries, 5), strict=True):
            assert hits[0].record.id == item_id
            assert hits[0].record.metadata["label"] == item_id.split("/")[0]
            assert np.isclose(hits[0].score, 1.0, atol=1e-5)
    finally:
        collection.close()


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    """Make the run stop with KeyboardInterrupt (Ctrl-C) after some batches."""
    original = Collection.upsert
    calls = {"n": 0}

    def upsert_then_interrupt(self, items):
        if calls["n"] == batches:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, items)

    monkeypatch.setattr(Collection, "upsert", upsert_then_interrupt)


def test_index_folder_resumes_after_interrupt(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    images = tmp_path / "many"
    images.mkdir()
    for i in range(25):
        (images / f"{i:03d}.png").write_bytes(encode(random_image(200 + i)))
    data_dir = tmp_path / "data"

    _interrupt_after(monkeypatch, batches=2)
    with pytest.raises(KeyboardInterrupt):
        index_folder(bundle_dir, data_dir, images, batch_size=4)
    monkeypatch.undo()

    resumed = index_folder(bundle_dir, data_dir, images, batch_size=4)
    assert resumed.unchanged == 8
    assert resumed.added == 17
    assert resumed.total_items == 25


def test_index_cifar_resume(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    images = extract_cifar10_subset(tmp_path / "cifar", "test", per_class=4)
    data_dir = tmp_path / "data"
    _interrupt_after(monkeypatch, batches=1)
    with pytest.raises(KeyboardInterrupt):
        index_folder(bundle_dir, data_dir, images, batch_size=16)
    monkeypatch.undo()

    resumed = index_folder(bundle_dir, data_dir, images, batch_size=16)
    assert resumed.unchanged == 16
    assert resumed.added == 24
    assert resumed.skipped == 0
    assert resumed.total_items == 40
