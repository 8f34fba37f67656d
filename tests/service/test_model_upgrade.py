"""Starting with a different model: refuse, or re-embed every item from its source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.collection import Collection
from service.encoder import Encoder
from service.indexing import index_folder, open_collection
from service.preprocess import decode_image, preprocess_batch
from service.settings import Settings
from service.store import NewItem, StoreError
from tests.service.conftest import encode, random_image
from tests.tiny_bundle import make_tiny_bundle


@pytest.fixture
def new_bundle(tmp_path: Path) -> Path:
    # Another embedding size gives another model with another sha256.
    return make_tiny_bundle(tmp_path / "new-bundle", dim=16, image_size=32)


def settings(bundle: Path, data_dir: Path, **overrides) -> Settings:
    return Settings(bundle_dir=bundle, data_dir=data_dir, **overrides)


def test_model_change_refused_by_default(
    bundle_dir: Path, new_bundle: Path, tmp_path: Path
):
    data_dir = tmp_path / "data"
    old = Encoder(bundle_dir)
    collection = Collection(data_dir, old.sha256, old.dim)
    collection.upsert([NewItem(id="a", vector=np.ones(old.dim, dtype=np.float32))])
    collection.close()

    with pytest.raises(StoreError, match="DCL_REEMBED_ON_MODEL_CHANGE=true"):
        open_collection(settings(new_bundle, data_dir), Encoder(new_bundle))


def test_reembed_from_files_and_uploads(
    bundle_dir: Path, new_bundle: Path, tmp_path: Path
):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        (images / f"{i}.png").write_bytes(encode(random_image(300 + i)))
    data_dir = tmp_path / "data"
    index_folder(bundle_dir, data_dir, images, batch_size=4)
    old = Encoder(bundle_dir)
    uploaded = encode(random_image(400), "JPEG")
    collection = Collection(data_dir, old.sha256, old.dim)
    collection.upsert(
        [
            NewItem(
                id="upload",
                vector=np.ones(old.dim, dtype=np.float32) / np.sqrt(old.dim),
                metadata={"from": "api"},
                source=uploaded,
            )
        ]
    )
    collection.close()

    encoder = Encoder(new_bundle)
    reembedded = open_collection(
        settings(new_bundle, data_dir, reembed_on_model_change=True), encoder
    )
    try:
        assert reembedded.store.bundle_sha256 == encoder.sha256
        assert reembedded.dim == 16
        assert len(reembedded) == 7
        for item_id, data in [
            ("3.png", (images / "3.png").read_bytes()),
            ("upload", uploaded),
        ]:
            image = decode_image(data, 10**6)
            query = encoder.embed(
                preprocess_batch([image], encoder.metadata.preprocessing)
            )
            (hits,) = reembedded.search(query, 1)
            assert hits[0].record.id == item_id
            assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert reembedded.store.get("upload").metadata == {"from": "api"}
    finally:
        reembedded.close()

    # The old model is now the other one and is refused in turn.
    with pytest.raises(StoreError, match="DCL_REEMBED_ON_MODEL_CHANGE"):
        open_collection(settings(bundle_dir, data_dir), old)


def test_reembed_refuses_items_added_by_vector(
    bundle_dir: Path, new_bundle: Path, tmp_path: Path
):
    data_dir = tmp_path / "data"
    old = Encoder(bundle_dir)
    collection = Collection(data_dir, old.sha256, old.dim)
    collection.upsert(
        [NewItem(id="by-vector", vector=np.ones(old.dim, dtype=np.float32))]
    )
    collection.close()

    new_settings = settings(new_bundle, data_dir, reembed_on_model_change=True)
    with pytest.raises(StoreError, match="added by vector"):
        open_collection(new_settings, Encoder(new_bundle))
    # Nothing was switched: the old model still opens the store.
    reopened = Collection(data_dir, old.sha256, old.dim)
    try:
        assert reopened.store.get("by-vector") is not None
    finally:
        reopened.close()


def test_reembed_over_http_uploads(
    bundle_dir: Path, new_bundle: Path, tmp_path: Path, server_factory
):
    data_dir = tmp_path / "data"
    live = server_factory(data_dir=data_dir)
    image = encode(random_image(500), "PNG")
    with live.client() as client:
        response = client.post(
            "/v1/items", data={"id": "cat"}, files={"image": ("c.png", image)}
        )
        assert response.status_code == 201, response.text
    live.stop()

    live = server_factory(
        data_dir=data_dir, bundle_dir=new_bundle, reembed_on_model_change=True
    )
    with live.client() as client:
        assert client.get("/v1/index").json()["dim"] == 16
        response = client.post("/v1/search", files={"image": ("q.png", image)})
        assert response.status_code == 200, response.text
        (top,) = response.json()["results"][:1]
        assert top["id"] == "cat"
        assert top["score"] == pytest.approx(1.0, abs=1e-4)
