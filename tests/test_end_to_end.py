"""Pretrain, export, serve and query on real CIFAR-10 images through the `dcl` CLI.

Every step runs the installed command in a subprocess, as a user would, and the
server is the real one on 127.0.0.1.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.data_paths import extract_cifar10_subset

pytestmark = pytest.mark.slow

DCL = str(Path(sys.executable).with_name("dcl"))
TRAIN_PER_CLASS = 20
GALLERY_PER_CLASS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_dcl(*args: str | Path, timeout: float = 600) -> None:
    completed = subprocess.run(
        [DCL, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    if completed.returncode != 0:
        pytest.fail(
            f"dcl {' '.join(map(str, args))} exited {completed.returncode}:\n"
            f"{completed.stderr[-4000:]}"
        )


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    extract_cifar10_subset(root, "train", TRAIN_PER_CLASS)
    extract_cifar10_subset(root, "test", GALLERY_PER_CLASS)
    return root


@pytest.fixture(scope="module")
def bundle(cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("run")
    run_dcl(
        "train",
        "--data", cifar_root,
        "--out", work / "run",
        "--epochs", "1",
        "--max-steps", "3",
        "--batch-size", "64",
        "--num-workers", "0",
    )  # fmt: skip
    run_dcl(
        "export", "--checkpoint", work / "run" / "checkpoint.pt", "--out", work / "b"
    )
    return work / "b"


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    data_dir = tmp_path_factory.mktemp("index")
    process = subprocess.Popen(
        [DCL, "serve", "--bundle", str(bundle), "--data-dir", str(data_dir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            pytest.fail(f"dcl serve exited early:\n{process.stderr.read()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("dcl serve was not ready within 60 s")
        time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=30)


def gallery_files(cifar_root: Path) -> list[Path]:
    return sorted((cifar_root / "test").rglob("*.jpg"))


@pytest.fixture(scope="module")
def indexed(server: str, cifar_root: Path) -> list[str]:
    ids = []
    for path in gallery_files(cifar_root):
        item_id = path.relative_to(cifar_root).as_posix()
        response = httpx.post(
            f"{server}/v1/items",
            data={"id": item_id, "metadata": f'{{"label": "{path.parent.name}"}}'},
            files={"image": (path.name, path.read_bytes(), "image/jpeg")},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        ids.append(item_id)
    return ids


def search_image(server: str, path: Path, k: int) -> list[dict]:
    response = httpx.post(
        f"{server}/v1/search",
        data={"k": str(k)},
        files={"image": (path.name, path.read_bytes(), "image/jpeg")},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_indexed_image_finds_itself(
    server: str, cifar_root: Path, indexed: list[str]
) -> None:
    for path in gallery_files(cifar_root)[::7]:
        results = search_image(server, path, k=5)
        assert results[0]["id"] == path.relative_to(cifar_root).as_posix()
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert results[0]["metadata"] == {"label": path.parent.name}


def test_search_scores_sorted_and_k_honoured(
    server: str, cifar_root: Path, indexed: list[str]
) -> None:
    query = gallery_files(cifar_root)[3]
    for k in (1, 7, 25):
        results = search_image(server, query, k=k)
        scores = [hit["score"] for hit in results]
        assert len(results) == k
        assert scores == sorted(scores, reverse=True)
        assert len({hit["id"] for hit in results}) == k

    everything = search_image(server, query, k=len(indexed) + 50)
    assert len(everything) == len(indexed)


def test_deleted_items_never_return(
    server: str, cifar_root: Path, indexed: list[str]
) -> None:
    files = gallery_files(cifar_root)
    doomed = files[10:14]
    doomed_ids = {path.relative_to(cifar_root).as_posix() for path in doomed}
    for item_id in doomed_ids:
        response = httpx.delete(f"{server}/v1/items/{item_id}", timeout=10)
        assert response.status_code == 200, response.text

    for item_id in doomed_ids:
        assert httpx.get(f"{server}/v1/items/{item_id}").status_code == 404
    for path in doomed:
        hits = search_image(server, path, k=len(indexed))
        assert doomed_ids.isdisjoint(hit["id"] for hit in hits)
        assert len(hits) == len(indexed) - len(doomed_ids)


def test_service_embedding_equals_torch(bundle: Path, cifar_root: Path) -> None:
    """The served ONNX model with Pillow preprocessing matches torch end to end."""
    import torch

    from service.bundle import load_metadata
    from service.encoder import Encoder
    from service.preprocess import preprocess_batch
    from training.augment import eval_transform
    from training.models import EmbeddingModel
    from training.trainer import load_checkpoint, model_from_checkpoint

    metadata = load_metadata(bundle)
    images = [Image.open(path) for path in gallery_files(cifar_root)[:8]]
    # An odd-sized, non-RGB image exercises resizing and cropping as well.
    images.append(images[0].convert("L").resize((45, 37)))

    encoder = Encoder(bundle)
    served = encoder.embed(preprocess_batch(images, metadata.preprocessing))

    checkpoint = load_checkpoint(bundle.parent / "run" / "checkpoint.pt")
    model = EmbeddingModel(model_from_checkpoint(checkpoint).encoder).eval()
    transform = eval_transform(metadata.preprocessing)
    batch = torch.stack([transform(image.convert("RGB")) for image in images])
    with torch.no_grad():
        expected = model(batch).numpy()

    assert served.shape == (len(images), metadata.embedding_dim)
    np.testing.assert_allclose(served, expected, atol=1e-4)
