"""Paths shared by the deployment tests."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
K8S_DIR = DEPLOY_DIR / "k8s"


def find_tool(name: str) -> str | None:
    """Return the path of a command from this interpreter's environment or PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    return shutil.which(name)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
