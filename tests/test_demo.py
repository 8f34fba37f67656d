"""`dcl demo`, the README's main job, run as a user runs it.

The first run trains on the bundled digits for a few seconds, exports, indexes and
serves; the second run reuses all of that. Both are real processes answering on
127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_end_to_end import free_port

pytestmark = pytest.mark.slow

DCL = str(Path(sys.executable).with_name("dcl"))


def start_demo(workdir: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [DCL, "demo", "--workdir", str(workdir), "--port", str(port),
         "--minutes", "0.1", "--epochs", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DCL_HOME": str(workdir.parent)},
    )  # fmt: skip


def wait_ready(process: subprocess.Popen[str], url: str, timeout: float) -> float:
    """Wait for /readyz and return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            pytest.fail(f"dcl demo exited early:\n{process.stderr.read()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    pytest.fail(f"dcl demo was not ready within {timeout} s")


def stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return stderr


def test_demo_serves_and_reuses(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    first = start_demo(workdir, port)
    try:
        wait_ready(first, url, timeout=480)
        query = sorted((workdir / "gallery" / "7").glob("*.png"))[0]
        response = httpx.post(
            f"{url}/v1/search",
            data={"k": "5"},
            files={"image": (query.name, query.read_bytes(), "image/png")},
            timeout=30,
        )
        index = httpx.get(f"{url}/v1/index").json()
        model = httpx.get(f"{url}/v1/model").json()
    finally:
        first_log = stop(first)

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["id"] == f"7/{query.name}"
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(results) == 5
    assert index["size"] == 1797
    assert model["bundle"]["training"]["dataset"].endswith("digits")
    assert "example query: curl" in first_log

    second = start_demo(workdir, port)
    try:
        wait_ready(second, url, timeout=120)
    finally:
        second_log = stop(second)
    assert "reusing bundle" in second_log
    assert "reusing index" in second_log
    assert "training resnet18" not in second_log
