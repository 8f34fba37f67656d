import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.training.files import write_image_folder
from training.config import TrainConfig, load_config
from training.losses import DCLLoss
from training.models import build_model
from training.trainer import (
    StepSchedule,
    StopRequest,
    learning_rate_at,
    load_checkpoint,
    model_from_checkpoint,
    resolve_device,
    resolve_precision,
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


def tiny_config(tmp_path, run, **overrides):
    """A 12-image folder at 8 px: 3 steps per epoch at batch 4."""
    data = tmp_path / "images"
    if not data.exists():
        write_image_folder(data / "train", per_class=6, size=(12, 12))
        write_image_folder(data / "test", per_class=2, size=(12, 12))
    settings = {
        "data": str(data),
        "image_size": 8,
        "batch_size": 4,
        "epochs": 2,
        "warmup_epochs": 1,
        "num_workers": 0,
        "proj_hidden_dim": 16,
        "proj_dim": 8,
        "knn_k": 3,
        "device": "cpu",
        "out_dir": tmp_path / run,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize("method, optimizer", [("simclr", "sgd"), ("nnclr", "lars")])
def test_resume_matches_uninterrupted_run(tmp_path, method, optimizer):
    common = {"method": method, "optimizer": optimizer, "support_size": 6}
    straight = train(tiny_config(tmp_path, "straight", **common))
    # Stop in the middle of epoch 2, then continue from the run folder.
    first = train(tiny_config(tmp_path, "halves", stop_at_step=4, **common))
    resumed = train(TrainConfig(resume=str(tmp_path / "halves")))

    assert straight.steps == 6
    assert not first.completed
    assert first.steps == 4
    assert resumed.completed
    assert resumed.steps == 6
    assert resumed.epochs == 2
    expected = load_checkpoint(straight.checkpoint)
    actual = load_checkpoint(resumed.checkpoint)
    for name, tensor in expected["model"].items():
        assert torch.equal(actual["model"][name], tensor), name
    for name, tensor in expected["loss"].items():
        assert torch.equal(actual["loss"][name], tensor), name
    timing = {"train_seconds", "elapsed_seconds"}
    for got, want in zip(resumed.history, straight.history, strict=True):
        assert {k: v for k, v in got.items() if k not in timing} == {
            k: v for k, v in want.items() if k not in timing
        }
    lines = (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6]


def test_resume_warns_about_changed_settings(tmp_path, caplog):
    train(tiny_config(tmp_path, "run", epochs=2, stop_at_step=2))

    with caplog.at_level("WARNING", logger="training.trainer"):
        result = train(
            TrainConfig(resume=str(tmp_path / "run" / "checkpoint.pt"), lr=0.1)
        )

    assert result.steps == 6
    assert "lr: 0.3 -> 0.1" in caplog.text
    assert "will not match" in caplog.text
    assert load_config(tmp_path / "run" / "config.yaml").lr == pytest.approx(0.1)


def test_resume_rejects_missing_run_and_past_stop(tmp_path):
    train(tiny_config(tmp_path, "run", stop_at_step=4))

    with pytest.raises(ValueError, match="not found"):
        train(TrainConfig(resume=str(tmp_path / "absent")))
    with pytest.raises(ValueError, match="stop_at_step 3 is not after"):
        train(TrainConfig(resume=str(tmp_path / "run"), stop_at_step=3))


def test_resume_of_finished_run_trains_nothing(tmp_path):
    done = train(tiny_config(tmp_path, "run", epochs=1, warmup_epochs=0))
    again = train(TrainConfig(resume=str(tmp_path / "run")))

    assert again.steps == done.steps
    assert again.history == done.history


@pytest.mark.parametrize(
    "name, device, expected",
    [
        ("auto", "cpu", None),
        ("fp32", "cpu", None),
        ("bf16", "cpu", torch.bfloat16),
        ("fp16", "cpu", torch.float16),
    ],
)
def test_resolve_precision(name, device, expected):
    assert resolve_precision(name, torch.device(device)) == expected


def test_resolve_precision_rejects_unknown():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))


def small_model():
    torch.manual_seed(0)
    return build_model("resnet18", cifar_stem=True, proj_hidden_dim=32, proj_dim=16)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_train_step_autocast_paths(dtype):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = model.head.layers[3].weight.detach().clone()
    views = torch.randn(2, 4, 3, 8, 8)

    loss = train_step(
        model, DCLLoss(0.1), optimizer, views[0], views[1], autocast_dtype=dtype
    )

    # The loss is computed in float32 outside autocast, and the weights stay fp32.
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert model.head.layers[3].weight.dtype == torch.float32
    assert not torch.equal(model.head.layers[3].weight, before)


def test_train_step_bf16_close_to_fp32():
    views = torch.randn(2, 4, 3, 8, 8)
    losses = []
    for dtype in (None, torch.bfloat16):
        model = small_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = train_step(
            model, DCLLoss(0.5), optimizer, views[0], views[1], autocast_dtype=dtype
        )
        losses.append(loss.item())

    assert losses[1] == pytest.approx(losses[0], abs=0.05)


def test_train_step_fp16_scaler_and_clipping():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    views = torch.randn(2, 4, 3, 8, 8)

    loss = train_step(
        model,
        DCLLoss(0.1),
        optimizer,
        views[0],
        views[1],
        scaler=scaler,
        autocast_dtype=torch.float16,
        grad_clip=0.5,
    )

    # The gradients were unscaled before clipping, so their norm is the clip.
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    )
    assert torch.isfinite(loss)
    assert norm.item() == pytest.approx(0.5, rel=1e-3)
    assert scaler.get_scale() == 2.0**10


def test_stop_request_turns_signal_into_flag():
    with StopRequest() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_sigterm_saves_checkpoint_then_resume_finishes(tmp_path):
    config = tiny_config(
        tmp_path, "run", epochs=200, warmup_epochs=0, checkpoint_every=1
    )
    config_path = config.save(tmp_path / "config.yaml")
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    process = subprocess.Popen(
        [sys.executable, "-m", "dcl_embed.cli", "train", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 50
        while not checkpoint.exists() and process.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint after 50 s")
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=50)
    finally:
        process.kill()

    assert process.returncode == 130, output
    assert "continue with `dcl train --resume" in output
    saved = load_checkpoint(checkpoint)
    assert 1 <= saved["step"] < 600
    assert not saved["state"]["completed"]
    resumed = train(
        TrainConfig(resume=str(tmp_path / "run"), max_steps=saved["step"] + 1)
    )
    assert resumed.steps == saved["step"] + 1
    assert resumed.completed
