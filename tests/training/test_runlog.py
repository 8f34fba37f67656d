import json

import numpy as np
import pytest
from PIL import Image

from dcl_embed.cli import main
from training.config import TrainConfig
from training.plot import plot_runs
from training.runlog import RunLog
from training.trainer import train


def event_tags(run_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def write_run(run_dir, losses, knn):
    with RunLog(run_dir, log_every_steps=2) as log:
        for step, loss in enumerate(losses, start=1):
            log.log_step(step, loss, lr=0.1 * step, batch_images=32)
        for epoch, accuracy in enumerate(knn, start=1):
            log.log_epoch(
                {"epoch": epoch, "step": 2 * epoch, "loss": 1.0, "knn_top1": accuracy}
            )


def test_runlog_writes_jsonl_and_events(tmp_path):
    write_run(tmp_path, losses=[5.0, 4.0, 3.5, 3.0, 2.5], knn=[0.2, None])

    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").open()]
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]

    assert [r["step"] for r in steps] == [2, 4]
    assert steps[1]["loss"] == pytest.approx(3.0)
    assert steps[1]["images_per_second"] > 0
    assert epochs[1]["knn_top1"] is None
    assert {"step/loss", "step/lr", "epoch/knn_top1"} <= event_tags(tmp_path)


def test_runlog_progress_fields(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)

    first = log.log_step(1, 2.5, lr=0.01, batch_images=8)
    second = log.log_step(2, 2.25, lr=0.02, batch_images=8)

    assert first == {"loss": "2.5000", "lr": "0.01", "img/s": "-"}
    assert second["loss"] == "2.2500"
    assert float(second["img/s"]) > 0
    assert not list(tmp_path.glob("events.*"))


def test_runlog_rejects_zero_interval(tmp_path):
    with pytest.raises(ValueError, match="log_every_steps"):
        RunLog(tmp_path, log_every_steps=0)


def test_plot_writes_png(tmp_path):
    write_run(tmp_path / "a", losses=[5, 4, 3, 2], knn=[0.3, 0.5])
    write_run(tmp_path / "b", losses=[6, 5, 4.5, 4], knn=[0.2, 0.25])

    status = main(
        [
            "plot",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--out",
            str(tmp_path / "curves.png"),
        ]
    )
    with Image.open(tmp_path / "curves.png") as image:
        pixels = np.asarray(image.convert("RGB"))

    assert status == 0
    assert image.size[0] > 600
    # Curves and text: many distinct colours, not a blank canvas.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert (pixels < 128).any()


def test_plot_rejects_folder_without_metrics(tmp_path):
    with pytest.raises(ValueError, match="metrics.jsonl"):
        plot_runs([tmp_path], tmp_path / "x.png")


def test_plot_rejects_label_count(tmp_path):
    write_run(tmp_path / "a", losses=[1, 2], knn=[0.1])

    with pytest.raises(ValueError, match="one per run"):
        plot_runs([tmp_path / "a"], tmp_path / "x.png", labels=["a", "b"])


def test_train_writes_steps_and_events(digits_run):
    run_dir = digits_run.checkpoint.parent

    assert (run_dir / "steps.jsonl").is_file()
    assert "epoch/knn_top1" in event_tags(run_dir)


def test_train_on_unlabelled_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"")
    config = TrainConfig(
        data=str(images),
        image_size=8,
        batch_size=9,
        epochs=1,
        warmup_epochs=0,
        num_workers=0,
        proj_hidden_dim=16,
        proj_dim=8,
        device="cpu",
        log_every_steps=1,
        out_dir=tmp_path / "run",
    )

    result = train(config)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())

    assert result.knn_top1 is None
    assert record["knn_top1"] is None
    assert record["skipped_images"] == 1
    assert result.steps == 1
