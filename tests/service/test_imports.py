"""The service must run without torch, torchvision or the training package."""

from __future__ import annotations

import subprocess
import sys

SERVICE_MODULES = [
    "service",
    "service.api",
    "service.batching",
    "service.bundle",
    "service.cli",
    "service.collection",
    "service.encoder",
    "service.errors",
    "service.index",
    "service.indexing",
    "service.metrics",
    "service.preprocess",
    "service.schemas",
    "service.server",
    "service.settings",
    "service.store",
]


def test_service_imports_without_torch():
    code = (
        "import importlib, sys\n"
        f"for name in {SERVICE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'training') "
        "if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"service imported {result.stdout.strip()}"


def test_service_cli_import_is_light():
    code = (
        "import sys\n"
        "import service.cli\n"
        "heavy = sorted(m for m in ('onnxruntime', 'faiss', 'fastapi', 'torch') "
        "if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"service.cli imported {result.stdout.strip()}"
