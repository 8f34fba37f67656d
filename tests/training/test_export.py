import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from service.bundle import load_metadata
from training.augment import eval_transform
from training.data import load_sample_images
from training.export import ExportVerificationError, export_bundle
from training.models import EmbeddingModel
from training.trainer import load_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module")
def bundle(digits_run, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bundles") / "digits"
    metadata = export_bundle(digits_run.checkpoint, out_dir)
    return out_dir, metadata


def preprocessed_digits(preprocessing, count):
    transform = eval_transform(preprocessing)
    images = load_sample_images("digits", count=count)
    return torch.stack([transform(image) for image in images])


def test_bundle_is_two_files(bundle):
    out_dir, _ = bundle

    assert sorted(p.name for p in out_dir.iterdir()) == ["bundle.json", "model.onnx"]


def test_bundle_model_passes_checker(bundle):
    out_dir, _ = bundle
    model = onnx.load(out_dir / "model.onnx")

    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["embeddings"]
    assert all(
        t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )


def test_bundle_metadata_loads(bundle, digits_run):
    out_dir, metadata = bundle

    loaded = load_metadata(out_dir)

    assert loaded == metadata
    assert loaded.architecture == "resnet18"
    assert loaded.cifar_stem is True
    assert loaded.embedding_dim == 512
    assert loaded.preprocessing.crop_size == 16
    assert loaded.training.dataset == "sklearn-digits"
    assert loaded.training.loss == "dcl"
    assert loaded.training.knn_top1 == pytest.approx(digits_run.knn_top1)
    assert set(loaded.versions) >= {"torch", "onnx", "onnxruntime", "dcl-embed"}


@pytest.mark.parametrize("batch_size", [1, 5])
def test_onnxruntime_matches_torch(bundle, digits_run, batch_size):
    out_dir, metadata = bundle
    encoder = model_from_checkpoint(load_checkpoint(digits_run.checkpoint)).encoder
    model = EmbeddingModel(encoder).eval()
    images = preprocessed_digits(metadata.preprocessing, batch_size)
    session = ort.InferenceSession(
        str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    (actual,) = session.run(["embeddings"], {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images).numpy()

    assert actual.shape == (batch_size, 512)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)


def test_export_rejects_mismatch_and_writes_nothing(digits_run, tmp_path):
    out_dir = tmp_path / "bundle"

    # ONNX Runtime and torch use different convolution kernels, so their float32
    # results differ by more than this.
    with pytest.raises(ExportVerificationError, match="differ by up to"):
        export_bundle(digits_run.checkpoint, out_dir, atol=1e-15)

    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_needs_two_sample_images(digits_run, tmp_path):
    image = load_sample_images("digits", count=1)

    with pytest.raises(ValueError, match="at least 2"):
        export_bundle(digits_run.checkpoint, tmp_path / "bundle", sample_images=image)
