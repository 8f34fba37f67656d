"""Fixtures for the service tests: a tiny real bundle, images and a live server."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from service.api import create_app
from service.settings import Settings
from tests.tiny_bundle import make_tiny_bundle

DIM = 32


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"), dim=DIM, image_size=32)


def random_image(seed: int, size: tuple[int, int] = (40, 32), mode: str = "RGB"):
    """A PIL image of smooth random colour blobs, distinct for each seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
    return image.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class LiveServer:
    """A uvicorn server running the app in a background thread."""

    url: str
    settings: Settings
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            raise RuntimeError("the test server did not stop within 30 s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(settings: Settings, wait_ready: bool = True) -> LiveServer:
    """Start uvicorn on 127.0.0.1 and wait until /readyz (or /healthz) responds."""
    port = _free_port()
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", settings, server, thread)

    probe = "/readyz" if wait_ready else "/healthz"
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=live.url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if not thread.is_alive():
                raise RuntimeError("the test server exited during start-up")
            try:
                if client.get(probe).status_code == 200:
                    return live
                if not wait_ready:
                    return live
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    live.stop()
    raise RuntimeError(f"the test server did not answer {probe} within 60 s")


@pytest.fixture
def server_factory(
    bundle_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., LiveServer]]:
    """Start servers with settings overrides; all are stopped after the test."""
    started: list[LiveServer] = []

    def factory(wait_ready: bool = True, **overrides) -> LiveServer:
        values = {"bundle_dir": bundle_dir, "data_dir": tmp_path / "data"}
        values.update(overrides)
        live = start_server(Settings(**values), wait_ready=wait_ready)
        started.append(live)
        return live

    yield factory
    for live in started:
        if live.thread.is_alive():
            live.stop()


@pytest.fixture
def live_server(server_factory: Callable[..., LiveServer]) -> LiveServer:
    return server_factory()
