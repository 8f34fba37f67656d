import json
import math

import pytest
import torch

from tests.training.files import write_image_folder
from training.config import TrainConfig, load_config
from training.losses import DCLLoss
from training.models import build_model
from training.trainer import (
    StepSchedule,
    learning_rate_at,
    load_checkpoint,
    model_from_checkpoint,
    resolve_device,
    schedule_progress,
    train,
    train_step,
)


def test_learning_rate_warmup_then_cosine():
    assert learning_rate_at(0.0, 1.0, 0.1) == 0.0
    assert learning_rate_at(0.05, 1.0, 0.1) == pytest.approx(0.5)
    assert learning_rate_at(0.1, 1.0, 0.1) == pytest.approx(1.0)
    assert learning_rate_at(0.55, 1.0, 0.1) == pytest.approx(0.5)
    assert learning_rate_at(1.0, 1.0, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_learning_rate_without_warmup():
    assert learning_rate_at(0.0, 0.3, 0.0) == pytest.approx(0.3)
    assert learning_rate_at(0.25, 0.3, 0.0) == pytest.approx(
        0.3 * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert learning_rate_at(2.0, 0.3, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_schedule_progress_by_steps_and_time():
    assert schedule_progress(0, 10, 0.0, None) == pytest.approx(0.05)
    assert schedule_progress(9, 10, 1e6, None) == pytest.approx(0.95)
    assert schedule_progress(0, 10, 30.0, 60.0) == pytest.approx(0.5)
    assert schedule_progress(5, 10, 120.0, 60.0) == 1.0


def test_step_schedule_bounds():
    by_steps = StepSchedule(total_steps=3, base_lr=1.0, warmup_fraction=0.0)
    by_time = StepSchedule(
        total_steps=100, base_lr=1.0, warmup_fraction=0.0, max_seconds=60.0
    )
    by_time.started -= 61.0

    assert not by_steps.finished()
    by_steps.step = 3
    assert by_steps.finished()
    assert by_time.finished()
    assert by_time.current_lr() == pytest.approx(0.0, abs=1e-12)


def test_resolve_device_cpu_and_invalid():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_train_step_updates_weights():
    torch.manual_seed(0)
    model = build_model("resnet18", cifar_stem=True, proj_hidden_dim=32, proj_dim=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = model.head.layers[3].weight.detach().clone()
    views = torch.randn(2, 4, 3, 8, 8)

    loss = train_step(model, DCLLoss(0.1), optimizer, views[0], views[1])

    assert loss.dim() == 0
    assert torch.isfinite(loss)
    assert not loss.requires_grad
    assert not torch.equal(model.head.layers[3].weight, before)


def test_train_step_rejects_nan_loss():
    model = build_model("resnet18", cifar_stem=True, proj_hidden_dim=32, proj_dim=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    views = torch.full((2, 4, 3, 8, 8), float("nan"))

    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train_step(model, DCLLoss(0.1), optimizer, views[0], views[1])


def test_digits_run_stops_on_time_limit(digits_run):
    # max_minutes is far below one step, so the run stops after its first step.
    assert digits_run.steps == 1
    assert digits_run.epochs == 1
    assert 0.0 <= digits_run.knn_top1 <= 1.0


def test_digits_run_writes_metrics(digits_run):
    run_dir = digits_run.checkpoint.parent
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]

    assert len(records) == 1
    assert records[0]["step"] == 1
    assert records[0]["knn_top1"] == pytest.approx(digits_run.knn_top1)
    assert math.isfinite(records[0]["loss"])
    assert records == digits_run.history


def test_digits_run_saves_config_and_checkpoint(digits_run):
    run_dir = digits_run.checkpoint.parent
    config = load_config(run_dir / "config.yaml")
    checkpoint = load_checkpoint(digits_run.checkpoint)
    model = model_from_checkpoint(checkpoint)

    assert config.image_size == 16
    assert checkpoint["config"]["max_minutes"] == pytest.approx(0.001)
    assert checkpoint["epoch"] == 1
    assert checkpoint["knn_top1"] == pytest.approx(digits_run.knn_top1)
    assert checkpoint["arch"]["feature_dim"] == 512
    assert checkpoint["dataset"] == "sklearn-digits"
    assert model.head.layers[0].out_features == 64
    assert checkpoint["preprocessing"]["crop_size"] == 16


def test_train_stops_at_max_steps(tmp_path):
    data = tmp_path / "images"
    write_image_folder(data / "train", per_class=6, size=(12, 12))
    write_image_folder(data / "test", per_class=2, size=(12, 12))
    config = TrainConfig(
        data=str(data),
        image_size=8,
        batch_size=4,
        epochs=5,
        max_steps=4,
        warmup_epochs=1,
        num_workers=1,
        proj_hidden_dim=16,
        proj_dim=8,
        device="cpu",
        out_dir=tmp_path / "run",
    )

    result = train(config)

    assert result.steps == 4
    # 12 images at batch 4 are 3 steps per epoch, so step 4 is in epoch 2.
    assert result.epochs == 2
    assert [record["step"] for record in result.history] == [3, 4]
    assert result.checkpoint.is_file()


def test_train_rejects_batch_larger_than_data(tmp_path):
    data = tmp_path / "images"
    write_image_folder(data, per_class=5, size=(12, 12))
    config = TrainConfig(
        data=str(data), batch_size=64, num_workers=0, out_dir=tmp_path / "run"
    )

    with pytest.raises(ValueError, match="batch_size 64"):
        train(config)


def test_load_checkpoint_rejects_other_files(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)

    with pytest.raises(ValueError, match="not a dcl-embed checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
