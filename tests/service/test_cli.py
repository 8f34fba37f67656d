"""The argparse wiring of `dcl index` and `dcl serve`."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.cli import add_index_parser, add_serve_parser
from tests.service.conftest import encode, random_image


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcl")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_index_parser(subparsers)
    add_serve_parser(subparsers)
    return parser


def test_index_command(bundle_dir: Path, tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(encode(random_image(i)))
    args = make_parser().parse_args(
        [
            "index",
            "--bundle",
            str(bundle_dir),
            "--data-dir",
            str(tmp_path / "d"),
            str(images),
        ]
    )
    assert args.func(args) == 0
    assert (tmp_path / "d" / "items.sqlite3").is_file()
    assert (tmp_path / "d" / "index.json").is_file()


def test_index_command_bad_bundle(tmp_path: Path):
    (tmp_path / "images").mkdir()
    args = make_parser().parse_args(
        [
            "index",
            "--bundle",
            str(tmp_path / "none"),
            "--data-dir",
            str(tmp_path),
            str(tmp_path / "images"),
        ]
    )
    assert args.func(args) == 2


def test_serve_flags_parse():
    args = make_parser().parse_args(
        [
            "serve",
            "--bundle",
            "b",
            "--data-dir",
            "d",
            "--host",
            "0.0.0.0",
            "--port",
            "9",
        ]
    )
    assert args.bundle == Path("b")
    assert args.port == 9


def test_serve_without_bundle_fails(monkeypatch):
    monkeypatch.delenv("DCL_BUNDLE_DIR", raising=False)
    monkeypatch.delenv("DCL_DATA_DIR", raising=False)
    args = make_parser().parse_args(["serve"])
    assert args.func(args) == 2


def test_serve_modified_bundle_fails(bundle_dir: Path, tmp_path: Path, caplog):
    import shutil

    changed = tmp_path / "bundle"
    shutil.copytree(bundle_dir, changed)
    with (changed / "model.onnx").open("ab") as model:
        model.write(b"\0")
    args = make_parser().parse_args(
        ["serve", "--bundle", str(changed), "--data-dir", str(tmp_path / "data")]
    )

    assert args.func(args) == 2
    assert "sha256" in caplog.text


def test_serve_unwritable_data_dir_fails(bundle_dir: Path, tmp_path: Path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = make_parser().parse_args(
        ["serve", "--bundle", str(bundle_dir), "--data-dir", str(blocker / "data")]
    )

    assert args.func(args) == 2
    assert "cannot create data dir" in caplog.text
