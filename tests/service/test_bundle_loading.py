"""Loading a bundle: a valid one works, a broken one fails with a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.bundle import BundleError, load_metadata
from service.encoder import Encoder
from tests.service.conftest import DIM
from tests.tiny_bundle import make_tiny_bundle


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def test_missing_folder(tmp_path: Path):
    with pytest.raises(BundleError, match="not found"):
        Encoder(tmp_path / "nope")


@pytest.mark.parametrize("name", ["model.onnx", "bundle.json"])
def test_missing_file(bundle_copy: Path, name: str):
    (bundle_copy / name).unlink()
    with pytest.raises(BundleError, match=f"{name} not found"):
        Encoder(bundle_copy)


def test_corrupt_json(bundle_copy: Path):
    (bundle_copy / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Encoder(bundle_copy)


def test_invalid_field(bundle_copy: Path):
    raw = json.loads((bundle_copy / "bundle.json").read_text())
    raw["embedding_dim"] = -1
    (bundle_copy / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="embedding_dim"):
        Encoder(bundle_copy)


def test_hash_mismatch(bundle_copy: Path):
    with (bundle_copy / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        Encoder(bundle_copy)


def test_wrong_embedding_dim(bundle_copy: Path):
    metadata = load_metadata(bundle_copy)
    wrong = metadata.model_copy(update={"embedding_dim": DIM + 1})
    (bundle_copy / "bundle.json").write_text(wrong.model_dump_json())
    with pytest.raises(BundleError, match="embedding_dim"):
        Encoder(bundle_copy)


def test_wrong_input_name(bundle_copy: Path):
    metadata = load_metadata(bundle_copy)
    wrong = metadata.model_copy(update={"input_name": "pixels"})
    (bundle_copy / "bundle.json").write_text(wrong.model_dump_json())
    with pytest.raises(BundleError, match="pixels"):
        Encoder(bundle_copy)


def test_encoder_output_shape_and_norm(bundle_dir: Path):
    encoder = Encoder(bundle_dir)
    batch = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    out = encoder.embed(batch)
    assert out.shape == (5, DIM)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert encoder.provider == "CPUExecutionProvider"
    assert encoder.embed(batch[:0]).shape == (0, DIM)


def test_encoder_rejects_wrong_shape(bundle_dir: Path):
    encoder = Encoder(bundle_dir)
    with pytest.raises(ValueError, match=r"expected \[N, 3, 32, 32\]"):
        encoder.embed(np.zeros((2, 3, 16, 16), dtype=np.float32))


def test_tiny_bundle_other_sizes(tmp_path: Path):
    encoder = Encoder(make_tiny_bundle(tmp_path / "b", dim=8, image_size=16))
    out = encoder.embed(np.ones((2, 3, 16, 16), dtype=np.float32))
    assert out.shape == (2, 8)
