import argparse
import subprocess
import sys

import pytest

from training.cli import add_export_parser, add_train_parser, run_train
from training.config import TrainConfig


@pytest.fixture()
def parser():
    parser = argparse.ArgumentParser(prog="dcl")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_export_parser(subparsers)
    return parser


def test_import_does_not_load_torch():
    code = "import sys, training.cli; print('torch' in sys.modules)"

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "False"


def test_train_has_flag_per_field(parser):
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()

    for name in TrainConfig.model_fields:
        flag = "--out" if name == "out_dir" else "--" + name.replace("_", "-")
        assert flag in help_text, flag


def test_train_flags_parse_to_fields(parser):
    args = parser.parse_args(
        [
            "train",
            "--loss",
            "dclw",
            "--sigma",
            "0.3",
            "--batch-size",
            "64",
            "--max-minutes",
            "2.5",
            "--no-cifar-stem",
            "--out",
            "runs/x",
        ]
    )

    assert args.func is run_train
    assert args.loss == "dclw"
    assert args.sigma == pytest.approx(0.3)
    assert args.batch_size == 64
    assert args.max_minutes == pytest.approx(2.5)
    assert args.cifar_stem is False
    assert str(args.out_dir) == "runs/x"
    assert args.epochs is None


def test_train_rejects_unknown_loss(parser, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--loss", "simclr"])

    assert "invalid choice" in capsys.readouterr().err


def test_train_invalid_config_returns_2(parser, tmp_path, caplog):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 3\nwarmup_epochs: 5\n")
    args = parser.parse_args(["train", "--config", str(config)])

    status = args.func(args)

    assert status == 2
    assert "warmup_epochs" in caplog.text


def test_export_runs_on_checkpoint(parser, digits_run, tmp_path):
    out_dir = tmp_path / "bundle"
    args = parser.parse_args(
        ["export", "--checkpoint", str(digits_run.checkpoint), "--out", str(out_dir)]
    )

    status = args.func(args)

    assert status == 0
    assert (out_dir / "model.onnx").is_file()
    assert (out_dir / "bundle.json").is_file()


def test_export_missing_checkpoint_returns_2(parser, tmp_path, caplog):
    args = parser.parse_args(
        ["export", "--checkpoint", str(tmp_path / "absent.pt"), "--out", "b"]
    )

    assert args.func(args) == 2
    assert "not found" in caplog.text


def test_flags_override_config_file(parser, tmp_path):
    from training.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("loss: dclw\nepochs: 50\ntensorboard: true\nknn_k: 10\n")
    args = parser.parse_args(
        [
            "train",
            "--config",
            str(path),
            "--epochs",
            "17",
            "--no-tensorboard",
            "--eval-data",
            "digits",
            "--log-every-steps",
            "5",
        ]
    )

    config = load_config(
        args.config, **{n: getattr(args, n) for n in TrainConfig.model_fields}
    )

    assert config.loss == "dclw"
    assert config.knn_k == 10
    assert config.epochs == 17
    assert config.tensorboard is False
    assert config.eval_data == "digits"
    assert config.log_every_steps == 5


def test_eval_and_plot_parsers():
    from dcl_embed.cli import build_parser

    parser = build_parser()
    evaluation = parser.parse_args(["eval", "--bundle", "b", "--data", "d", "--linear"])
    plot = parser.parse_args(["plot", "r1", "r2", "--out", "c.png"])

    assert evaluation.linear and not evaluation.knn
    assert str(evaluation.bundle) == "b"
    assert [str(p) for p in plot.run_dirs] == ["r1", "r2"]
    assert str(plot.out) == "c.png"


def test_eval_needs_a_model(capsys):
    from dcl_embed.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--data", "digits"])

    assert "--checkpoint" in capsys.readouterr().err
