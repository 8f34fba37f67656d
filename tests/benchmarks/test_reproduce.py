"""The batch-size grid runner: resumable cells and the report, on digits."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "reproduce.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


reproduce = _load_script()

# Small enough for a few seconds per cell on 2 CPU cores. The linear probe holds
# out 10 % of the training images, which must cover all 10 classes.
TINY = reproduce.Budget(
    name="tiny",
    image_size=8,
    train_images=120,
    test_images=40,
    epochs=1,
    warmup_epochs=0,
    num_workers=0,
    probe_max_iter=5,
    max_steps=2,
)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished grid of 2 cells: InfoNCE and DCL at batch 16, seed 0."""
    out = tmp_path_factory.mktemp("grid")
    cells = reproduce.plan_cells(["infonce", "dcl"], [16], [0])
    reproduce.run_grid(TINY, cells, out, "digits")
    return out


def test_cells_written_as_json(grid: Path) -> None:
    names = sorted(p.name for p in grid.glob("*.json"))
    assert names == ["dcl-b16-s0.json", "infonce-b16-s0.json"]

    record = json.loads((grid / "dcl-b16-s0.json").read_text())
    assert record["cell"] == {"loss": "dcl", "batch_size": 16, "seed": 0}
    assert record["config"]["loss"] == "dcl"
    assert record["config"]["batch_size"] == 16
    assert record["budget"]["name"] == "tiny"
    assert record["data"]["train_images"] == 120
    assert record["data"]["test_images"] == 40
    assert record["metrics"]["steps"] == 2
    assert record["metrics"]["images_seen"] == 32
    assert 0.0 <= record["metrics"]["knn_top1"] <= 1.0
    assert 0.0 <= record["metrics"]["linear_top1"] <= 1.0
    assert record["hardware"]["device"] in ("cpu", "cuda")
    assert record["wall_seconds"] > 0


def test_rerun_skips_finished_cells(grid: Path) -> None:
    before = {p.name: p.read_bytes() for p in grid.glob("*.json")}
    cells = reproduce.plan_cells(["infonce", "dcl", "dclw"], [16], [0])

    records = reproduce.run_grid(TINY, cells, grid, "digits")

    assert len(records) == 3
    for name, content in before.items():
        assert (grid / name).read_bytes() == content, f"{name} was rewritten"
    assert (grid / "dclw-b16-s0.json").is_file()


def test_rerun_rejects_other_budget(grid: Path) -> None:
    other = replace(TINY, epochs=2)
    cells = reproduce.plan_cells(["infonce"], [16], [0])
    with pytest.raises(ValueError, match="another --out"):
        reproduce.run_grid(other, cells, grid, "digits")


def test_report_table_and_plot(grid: Path, tmp_path: Path) -> None:
    table = tmp_path / "table.md"
    plot = tmp_path / "plot.png"

    text = reproduce.report(grid, table, plot)

    assert table.read_text() == text
    assert "| kNN top-1 % | infonce |" in text
    assert "| linear top-1 % | dcl |" in text
    assert "batch 16" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cli_writes_defaults(grid: Path) -> None:
    reproduce.main(["--report", "--out", str(grid)])

    assert "| kNN top-1 % | dcl |" in (grid / "report.md").read_text()
    assert (grid / "batch-size.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_requires_data(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--data is required"):
        reproduce.main(["--out", str(tmp_path)])


def test_untrained_floor_in_report(grid: Path, tmp_path: Path) -> None:
    record = reproduce.run_untrained(TINY, [0], grid, "digits")

    (result,) = record["untrained"]
    assert result["seed"] == 0
    assert 0.0 <= result["knn_top1"] <= 1.0
    assert (grid / "untrained.json").is_file()
    text = reproduce.report(grid, tmp_path / "table.md", tmp_path / "plot.png")
    assert "Untrained encoder" in text
    assert "untrained.json" not in {p.name for p in grid.glob("*-b*-s*.json")}


def test_report_empty_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no finished cells"):
        reproduce.report(tmp_path, None, None)


def test_summary_mean_and_range() -> None:
    records = [
        {
            "cell": {"loss": "dcl", "batch_size": 32, "seed": seed},
            "metrics": {"knn_top1": knn, "linear_top1": 0.5},
        }
        for seed, knn in enumerate((0.30, 0.40, 0.50))
    ]
    (summary,) = reproduce.summarise(records)
    assert summary.seeds == [0, 1, 2]
    assert reproduce.format_accuracy(summary.knn) == "40.0 (30.0–50.0, n=3)"
    assert reproduce.format_accuracy([0.5]) == "50.0"


def test_plan_cells_order_and_seeds() -> None:
    cells = reproduce.plan_cells(["infonce", "dcl"], [32, 64, 256], [0, 1], [32, 256])
    keys = [cell.key for cell in cells]
    assert keys[:6] == [
        "infonce-b32-s0",
        "dcl-b32-s0",
        "infonce-b64-s0",
        "dcl-b64-s0",
        "infonce-b256-s0",
        "dcl-b256-s0",
    ]
    assert keys[6:] == [
        "infonce-b32-s1",
        "dcl-b32-s1",
        "infonce-b256-s1",
        "dcl-b256-s1",
    ]


def test_plan_cells_unknown_loss() -> None:
    with pytest.raises(ValueError, match="unknown losses"):
        reproduce.plan_cells(["ntxent"], [32], [0])


def test_balanced_indices_per_class() -> None:
    labels = np.repeat(np.arange(4), [10, 10, 10, 2])
    picked = reproduce.balanced_indices(labels, 11, seed=0)

    assert len(picked) == 11
    assert len(set(picked.tolist())) == 11
    counts = np.bincount(labels[picked], minlength=4)
    assert counts.tolist() == [3, 3, 3, 2]
    assert np.array_equal(picked, reproduce.balanced_indices(labels, 11, seed=0))
    assert len(reproduce.balanced_indices(labels, None, seed=0)) == len(labels)
