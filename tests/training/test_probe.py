import json

import pytest
import torch

from dcl_embed.cli import main
from training.export import export_bundle
from training.probe import fit_linear_classifier, linear_probe


def blobs(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 5 dimensions, far apart."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0], [0, 0, 4.0, 0, 0]])
    labels = torch.arange(3).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(len(labels), 5, generator=generator)
    return features, labels


def test_linear_classifier_separates_blobs():
    features, labels = blobs(40, seed=0)

    classifier = fit_linear_classifier(features, labels, 3, weight_decay=1e-3)
    predicted = classifier(features).argmax(dim=1)

    assert (predicted == labels).float().mean() > 0.95


def test_linear_probe_picks_from_grid():
    train, train_labels = blobs(40, seed=1)
    test, test_labels = blobs(20, seed=2)

    result = linear_probe(
        train, train_labels, test, test_labels, weight_decays=(1e-4, 1e-2), max_iter=50
    )

    assert result.top1 > 0.9
    assert result.weight_decay in (1e-4, 1e-2)
    assert set(result.validation_top1) == {"0.0001", "0.01"}
    assert result.train_size == 120
    assert result.test_size == 60


def test_linear_probe_rejects_bad_arguments():
    features, labels = blobs(5, seed=0)

    with pytest.raises(ValueError, match="weight_decays"):
        linear_probe(features, labels, features, labels, weight_decays=())
    with pytest.raises(ValueError, match="one label per feature"):
        linear_probe(features, labels[:3], features, labels)
    with pytest.raises(ValueError, match="weight_decay must"):
        fit_linear_classifier(features, labels, 3, weight_decay=-1.0)


@pytest.fixture(scope="module")
def checkpoint_eval(digits_run, tmp_path_factory):
    """`dcl eval` of the digits run's checkpoint (ResNet-18 after one step)."""
    out = tmp_path_factory.mktemp("eval") / "checkpoint.json"
    status = main(
        [
            "eval",
            "--checkpoint",
            str(digits_run.checkpoint),
            "--num-workers",
            "0",
            "--knn-k",
            "20",
            "--out",
            str(out),
        ]
    )
    return status, json.loads(out.read_text()) if out.is_file() else None


def test_eval_checkpoint_on_digits(checkpoint_eval):
    status, result = checkpoint_eval

    assert status == 0
    assert result["dataset"] == "sklearn-digits"
    assert result["train_images"] == 1437
    assert result["test_images"] == 360
    assert result["feature_dim"] == 512
    # A network one step from random init: far above chance (0.1), below perfect.
    assert 0.5 < result["knn"]["top1"] <= 1.0
    assert 0.5 < result["linear"]["top1"] <= 1.0
    assert result["knn"]["k"] == 20
    assert result["linear"]["weight_decay"] > 0


def test_eval_bundle_matches_checkpoint(checkpoint_eval, digits_run, tmp_path):
    bundle = tmp_path / "bundle"
    export_bundle(digits_run.checkpoint, bundle)

    status = main(
        ["eval", "--bundle", str(bundle), "--data", "digits", "--knn", "--knn-k", "20"]
    )
    result = json.loads((bundle / "eval.json").read_text())

    assert status == 0
    assert result["linear"] is None
    assert result["model"]["backend"].startswith("onnxruntime")
    # Same weights; only the preprocessing code differs (Pillow vs torchvision).
    assert result["knn"]["top1"] == pytest.approx(
        checkpoint_eval[1]["knn"]["top1"], abs=0.02
    )


def test_eval_bundle_needs_data(tmp_path, caplog):
    status = main(["eval", "--bundle", str(tmp_path)])

    assert status == 2
    assert "--data" in caplog.text


def test_eval_rejects_unlabelled_data(digits_run, tmp_path, caplog):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")

    status = main(
        ["eval", "--checkpoint", str(digits_run.checkpoint), "--data", str(tmp_path)]
    )

    assert status == 2
    assert "no labels" in caplog.text
