"""User errors that the `dcl` training commands report in one line with exit 2."""

import argparse
import json
import logging
import re

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import training.trainer
from training.checkpoint import load_checkpoint
from training.cli import (
    add_eval_parser,
    add_export_parser,
    add_plot_parser,
    add_train_parser,
)
from training.data import build_datasets, detect_source
from training.datasets import SkipUnreadable, load_rgb
from training.plot import load_run

from .files import write_image_folder


@pytest.fixture()
def parser():
    parser = argparse.ArgumentParser(prog="dcl")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_export_parser(subparsers)
    add_eval_parser(subparsers)
    add_plot_parser(subparsers)
    return parser


def _fail_if_called(*args, **kwargs):
    raise AssertionError("train() ran, so the earlier run would be overwritten")


def _error_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_train_existing_run_returns_2(parser, tmp_path, caplog, monkeypatch):
    (tmp_path / "checkpoint.pt").write_bytes(b"earlier run")
    monkeypatch.setattr(training.trainer, "train", _fail_if_called)
    args = parser.parse_args(["train", "--data", "digits", "--out", str(tmp_path)])

    status = args.func(args)

    assert status == 2
    assert f"--resume {tmp_path}" in caplog.text
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"earlier run"


def test_train_new_out_dir_runs(parser, tmp_path, monkeypatch):
    calls = []

    def record_call(config):
        calls.append(config)
        raise ValueError("stop here")

    monkeypatch.setattr(training.trainer, "train", record_call)
    args = parser.parse_args(["train", "--data", "digits", "--out", str(tmp_path)])

    assert args.func(args) == 2
    assert len(calls) == 1


def test_load_truncated_checkpoint(digits_run, tmp_path):
    truncated = tmp_path / "checkpoint.pt"
    data = digits_run.checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(ValueError, match="checkpoint.pt that `dcl train` wrote"):
        load_checkpoint(truncated)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint\n", b"\x80\x04K\x01.", b"PK\x03\x04junk"]
)
def test_load_non_checkpoint_file(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)

    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_load_checkpoint_of_other_type(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), path)

    with pytest.raises(ValueError, match="not a checkpoint dict"):
        load_checkpoint(path)


def test_export_garbage_checkpoint_returns_2(parser, tmp_path, caplog):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"garbage")
    args = parser.parse_args(
        ["export", "--checkpoint", str(path), "--out", str(tmp_path / "b")]
    )

    assert args.func(args) == 2
    assert len(_error_lines(caplog)) == 1
    assert "\n" not in _error_lines(caplog)[0]


def test_train_nan_loss_returns_2(parser, tmp_path, caplog):
    args = parser.parse_args(
        [
            "train",
            "--data",
            "digits",
            "--image-size",
            "16",
            "--batch-size",
            "32",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--num-workers",
            "0",
            "--proj-hidden-dim",
            "64",
            "--device",
            "cpu",
            "--lr",
            "1e30",
            "--out",
            str(tmp_path / "run"),
        ]
    )

    status = args.func(args)

    assert status == 2
    errors = _error_lines(caplog)
    assert len(errors) == 1
    assert "at step " in errors[0]
    assert "--lr" in errors[0]
    assert "--temperature" in errors[0]


def test_all_unreadable_raises_value_error(tmp_path):
    (tmp_path / "cat").mkdir()
    for i in range(3):
        (tmp_path / "cat" / f"{i}.jpg").write_bytes(b"")
    dataset = SkipUnreadable(ImageFolder(tmp_path, loader=load_rgb), max_attempts=5)

    with pytest.raises(ValueError, match="3 consecutive images.*replace or delete"):
        dataset[0]


def test_all_unreadable_in_worker_raises_value_error(tmp_path):
    (tmp_path / "cat").mkdir()
    for i in range(3):
        (tmp_path / "cat" / f"{i}.jpg").write_bytes(b"")
    dataset = SkipUnreadable(ImageFolder(tmp_path, loader=load_rgb))
    loader = DataLoader(dataset, batch_size=2, num_workers=1)

    with pytest.raises(ValueError, match="unreadable") as caught:
        next(iter(loader))
    assert "\n" not in str(caught.value)


def _write_metrics(run_dir, lines):
    run_dir.mkdir()
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    (run_dir / "metrics.jsonl").write_text(text)


def test_plot_skips_records_without_step(tmp_path, caplog):
    _write_metrics(
        tmp_path / "run",
        [{"epoch": 1, "loss": 5.0}, {"epoch": 2, "step": 20, "loss": 4.0}],
    )

    epochs, _ = load_run(tmp_path / "run")

    assert epochs == [{"epoch": 2, "step": 20, "loss": 4.0}]
    assert "skipping 1 of 2 records" in caplog.text


def test_plot_without_complete_records_returns_2(parser, tmp_path, caplog):
    _write_metrics(tmp_path / "run", [{"epoch": 1, "loss": 5.0}, [1, 2]])
    args = parser.parse_args(
        ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")]
    )

    assert args.func(args) == 2
    assert "metrics.jsonl" in caplog.text
    assert not (tmp_path / "c.png").exists()


def test_split_one_image_per_class(tmp_path):
    write_image_folder(tmp_path / "data", per_class=1)

    with pytest.raises(ValueError) as caught:
        build_datasets(tmp_path / "data", image_size=8)
    message = str(caught.value)
    assert str(tmp_path / "data") in message
    assert "cat: 1, dog: 1" in message
    assert "at least 2 images" in message
    assert "train/ and test/" in message


def test_split_uneven_classes(tmp_path):
    write_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=1)
    write_image_folder(tmp_path / "more", classes=("cat",), per_class=5)
    for image in (tmp_path / "more" / "cat").iterdir():
        image.rename(tmp_path / "data" / "cat" / f"extra-{image.name}")

    with pytest.raises(ValueError, match="cat: 6, dog: 1"):
        build_datasets(tmp_path / "data", image_size=8)


def test_detect_source_on_file(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"png")

    with pytest.raises(ValueError, match="is a file, not a folder"):
        detect_source(path)
