"""The serve-cpu dependency set, installed exactly as the Dockerfile installs it.

The slow tests copy the files that the Docker build context admits (the `!` lines of
.dockerignore) into a temporary folder and run `deploy/install.sh serve-cpu VENV`
there. They check that torch is absent from the new environment. Then they start
`VENV/bin/dcl serve` on 127.0.0.1 with a tiny real bundle and call the API."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.deploy.conftest import DEPLOY_DIR, REPO_ROOT

INSTALL_SCRIPT = DEPLOY_DIR / "install.sh"
INSTALL_TIMEOUT_SECONDS = 600
READY_TIMEOUT_SECONDS = 90
DIM = 32


def clean_env(**extra: str) -> dict[str, str]:
    """Return this process's environment without DCL_* settings or an active venv."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("DCL_") and key not in {"VIRTUAL_ENV", "PYTHONPATH"}
    }
    env.update(extra)
    return env


def build_context_paths() -> list[str]:
    """Return the paths that .dockerignore lets into the Docker build context."""
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line[1:].rstrip("/") for line in lines if line.startswith("!")]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unit_vector(seed: int) -> list[float]:
    vector = np.random.default_rng(seed).standard_normal(DIM)
    return (vector / np.linalg.norm(vector)).tolist()


def test_install_rejects_unknown_target(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), "serve", str(tmp_path / "venv")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid TARGET 'serve'" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_install_rejects_existing_venv(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), "serve-cpu", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "already exists" in result.stderr


@pytest.fixture(scope="module")
def serve_cpu_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install the serve-cpu set into a new venv from a copy of the build context."""
    workdir = tmp_path_factory.mktemp("serve-cpu")
    context = workdir / "context"
    for relative in build_context_paths():
        source = REPO_ROOT / relative
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(
                source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        elif source.is_file():
            shutil.copy2(source, target)
        else:
            pytest.fail(f"{relative} is in the build context but missing from the repo")

    venv = workdir / "venv"
    # The same script and arguments as the Dockerfile's build-serve-cpu stage. PYTHON
    # names this interpreter because python3.11 need not be on PATH here.
    result = subprocess.run(
        ["bash", str(context / "deploy" / "install.sh"), "serve-cpu", str(venv)],
        cwd=context,
        env=clean_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return venv


@pytest.fixture(scope="module")
def server(
    serve_cpu_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Start `dcl serve` from the installed venv and yield its base URL when ready."""
    from tests.tiny_bundle import make_tiny_bundle

    workdir = tmp_path_factory.mktemp("served")
    bundle_dir = make_tiny_bundle(workdir / "bundle", dim=DIM, image_size=32)
    data_dir = workdir / "data"
    port = free_port()
    env = clean_env(
        DCL_BUNDLE_DIR=str(bundle_dir),
        DCL_DATA_DIR=str(data_dir),
        DCL_HOST="127.0.0.1",
        DCL_PORT=str(port),
        DCL_LOG_LEVEL="INFO",
    )
    log_path = workdir / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(serve_cpu_venv / "bin" / "dcl"), "serve"],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"dcl serve exited with {process.returncode}:\n"
                    + log_path.read_text()[-4000:]
                )
            try:
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"/readyz not 200 after {READY_TIMEOUT_SECONDS} s:\n"
                    + log_path.read_text()[-4000:]
                )
            time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["torch", "torchvision"])
def test_serve_cpu_venv_lacks_training_side(serve_cpu_venv: Path, module: str) -> None:
    # The module must be absent from the venv, not merely unimported.
    probe = (
        "import importlib.util, sys; "
        f"sys.exit(0 if importlib.util.find_spec({module!r}) is None else 1)"
    )
    result = subprocess.run(
        [str(serve_cpu_venv / "bin" / "python"), "-c", probe],
        cwd=serve_cpu_venv,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, f"{module} is importable in the serve-cpu venv"


@pytest.mark.slow
def test_serve_cpu_venv_has_serving_side(serve_cpu_venv: Path) -> None:
    probe = "import faiss, fastapi, onnxruntime, uvicorn, service.api"
    result = subprocess.run(
        [str(serve_cpu_venv / "bin" / "python"), "-c", probe],
        cwd=serve_cpu_venv,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    pip_show = subprocess.run(
        [str(serve_cpu_venv / "bin" / "python"), "-m", "pip", "show", "torch"],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert pip_show.returncode != 0, pip_show.stdout


@pytest.mark.slow
def test_serve_cpu_answers_vector_search(server: str) -> None:
    assert httpx.get(f"{server}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{server}/readyz", timeout=5).status_code == 200

    items = [
        {"id": "a", "vector": unit_vector(1), "metadata": {"label": "first"}},
        {"id": "b", "vector": unit_vector(2), "metadata": {"label": "second"}},
    ]
    added = httpx.post(f"{server}/v1/items", json={"items": items}, timeout=30)
    assert added.status_code in (200, 201), added.text

    for item in items:
        found = httpx.post(
            f"{server}/v1/search", json={"vector": item["vector"], "k": 1}, timeout=30
        )
        assert found.status_code == 200, found.text
        results = found.json()["results"]
        assert len(results) == 1
        assert results[0]["id"] == item["id"]
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert results[0]["metadata"] == item["metadata"]


@pytest.mark.slow
def test_healthcheck_script_in_venv(serve_cpu_venv: Path, server: str) -> None:
    # The images run deploy/healthcheck.py as their HEALTHCHECK.
    port = server.rsplit(":", 1)[1]
    python = str(serve_cpu_venv / "bin" / "python")
    script = str(DEPLOY_DIR / "healthcheck.py")
    healthy = subprocess.run(
        [python, script], env=clean_env(DCL_PORT=port), capture_output=True, check=False
    )
    assert healthy.returncode == 0, healthy.stderr
    closed = subprocess.run(
        [python, script],
        env=clean_env(DCL_PORT=str(free_port())),
        capture_output=True,
        text=True,
        check=False,
    )
    assert closed.returncode == 1
    assert "health check failed" in closed.stderr
