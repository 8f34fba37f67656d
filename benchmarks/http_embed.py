"""Measure embedding throughput and latency over HTTP against bare ONNX Runtime.

Starts ``dcl serve``'s app (uvicorn, one process) on 127.0.0.1 in a subprocess and
sends single-image ``POST /v1/embed`` requests from an asyncio httpx client at
several concurrency levels. For each level it reports images per second, p50 and
p99 latency, and the ratio of the HTTP throughput to bare ONNX Runtime on the same
bundle in the same run. Bare ONNX Runtime is measured two ways: batch 1 in a loop,
and batches of ``--max-batch-size`` preprocessed images (the batcher's best case).
The HTTP path also decodes and preprocesses each JPEG, which bare ONNX Runtime
does not, and the client shares the CPU cores with the server.

A load run follows: ``--load-concurrency`` clients for ``--load-seconds``, with the
error count, p99 latency and the server's resident memory at start and end.

Example (about three minutes on 2 CPU cores)::

    python benchmarks/http_embed.py --make-resnet18 /tmp/resnet18-bundle
    python benchmarks/http_embed.py --bundle /tmp/resnet18-bundle --json out.json

Without ``--bundle`` or ``--make-resnet18`` it uses the tiny test encoder.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.encoder import Encoder
from service.preprocess import decode_image, preprocess_batch

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def make_resnet18_bundle(out_dir: Path) -> Path:
    """Export a randomly initialised CIFAR-stem ResNet-18 encoder as a bundle.

    Throughput does not depend on the weights, so no training run is needed.
    """
    import onnx
    import torch

    from service.bundle import (
        MODEL_FILENAME,
        BundleMetadata,
        Preprocessing,
        TrainingProvenance,
        sha256_file,
        write_metadata,
    )
    from training.export import _export_onnx
    from training.models import EmbeddingModel, ResNetEncoder

    torch.manual_seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = EmbeddingModel(ResNetEncoder("resnet18", cifar_stem=True)).eval()
    model_path = out_dir / MODEL_FILENAME
    _export_onnx(model, 32, model_path)
    metadata = BundleMetadata(
        architecture="resnet18",
        cifar_stem=True,
        preprocessing=Preprocessing(
            resize_size=32,
            crop_size=32,
            interpolation="bilinear",
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
        ),
        embedding_dim=512,
        training=TrainingProvenance(
            dataset="none (random weights, for benchmarks)",
            loss="none",
            temperature=0.1,
            batch_size=1,
            epochs=0,
        ),
        versions={"torch": torch.__version__, "onnx": onnx.__version__},
        onnx_sha256=sha256_file(model_path),
    )
    write_metadata(out_dir, metadata)
    return out_dir


def sample_jpegs(count: int, size: int) -> list[bytes]:
    """Encode ``count`` random smooth JPEG images of ``size`` x ``size`` pixels."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def measure_bare(encoder: Encoder, jpegs: list[bytes], batch: int, seconds: float):
    """Return images per second of bare ``encoder.embed`` at ``batch`` images."""
    pixels = preprocess_batch(
        [decode_image(data, 10**8) for data in jpegs[:batch]],
        encoder.metadata.preprocessing,
    )
    encoder.embed(pixels)
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoder.embed(pixels)
        done += len(pixels)
    return done / (time.perf_counter() - start)


async def run_clients(
    url: str, jpegs: list[bytes], concurrency: int, seconds: float
) -> dict:
    """Send single-image embeds from ``concurrency`` clients for ``seconds``."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    limits = httpx.Limits(max_connections=concurrency)
    deadline = time.perf_counter() + seconds

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker(index: int) -> None:
            nonlocal errors
            i = index
            while time.perf_counter() < deadline:
                data = jpegs[i % len(jpegs)]
                i += concurrency
                start = time.perf_counter()
                try:
                    response = await client.post(
                        "/v1/embed", files={"images": ("a.jpg", data, "image/jpeg")}
                    )
                except httpx.HTTPError:
                    errors += 1
                    continue
                statuses[response.status_code] = (
                    statuses.get(response.status_code, 0) + 1
                )
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start

    ordered = np.sort(np.asarray(latencies)) if latencies else np.zeros(1)
    return {
        "concurrency": concurrency,
        "requests_ok": len(latencies),
        "errors": errors,
        "statuses": statuses,
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ordered, 50) * 1000),
        "p99_ms": float(np.percentile(ordered, 99) * 1000),
    }


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE / 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(bundle: Path, data_dir: Path, port: int, args) -> subprocess.Popen:
    env = {
        **os.environ,
        "DCL_BUNDLE_DIR": str(bundle),
        "DCL_DATA_DIR": str(data_dir),
        "DCL_PORT": str(port),
        "DCL_MAX_BATCH_SIZE": str(args.max_batch_size),
        "DCL_MAX_BATCH_WAIT_MS": str(args.max_batch_wait_ms),
        "DCL_MAX_QUEUE_SIZE": str(args.max_queue_size),
        "DCL_LOG_LEVEL": "WARNING",
    }
    code = (
        "from service.server import run; from service.settings import Settings; "
        "run(Settings())"
    )
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO_ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError("the server was not ready within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, help="Model bundle folder.")
    parser.add_argument(
        "--make-resnet18",
        type=Path,
        metavar="DIR",
        help="Export a random-weight ResNet-18 bundle into DIR first (needs torch).",
    )
    parser.add_argument("--seconds", type=float, default=10, help="Per level.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--load-concurrency", type=int, default=64)
    parser.add_argument("--load-seconds", type=float, default=60)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--max-queue-size", type=int, default=256)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if args.make_resnet18 is not None:
            bundle = make_resnet18_bundle(args.make_resnet18)
        if bundle is None:
            from tests.tiny_bundle import make_tiny_bundle

            bundle = make_tiny_bundle(Path(tmp) / "tiny", dim=32, image_size=32)
        encoder = Encoder(bundle)
        size = encoder.metadata.preprocessing.resize_size
        jpegs = sample_jpegs(256, size)

        bare_1 = measure_bare(encoder, jpegs, 1, args.seconds)
        bare_batch = measure_bare(encoder, jpegs, args.max_batch_size, args.seconds)
        logger.info(
            "bare ONNX Runtime: %.0f img/s at batch 1, %.0f at batch %d",
            bare_1,
            bare_batch,
            args.max_batch_size,
        )
        del encoder

        port = free_port()
        server = start_server(bundle, Path(tmp) / "data", port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            levels = []
            for concurrency in args.concurrency:
                result = asyncio.run(run_clients(url, jpegs, concurrency, args.seconds))
                result["ratio_to_bare_batch"] = result["images_per_s"] / bare_batch
                result["ratio_to_bare_1"] = result["images_per_s"] / bare_1
                levels.append(result)
                logger.info("%s", json.dumps(result))

            rss_start = rss_mib(server.pid)
            load = asyncio.run(
                run_clients(url, jpegs, args.load_concurrency, args.load_seconds)
            )
            load["rss_start_mib"] = rss_start
            load["rss_end_mib"] = rss_mib(server.pid)
            logger.info("load: %s", json.dumps(load))
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            server.terminate()
            server.wait(timeout=60)

    calls = [line for line in metrics.splitlines() if line.startswith("dcl_batch_size")]
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "bundle": str(bundle),
        "architecture": json.loads((bundle / "bundle.json").read_text())[
            "architecture"
        ],
        "bare_images_per_s": {
            "batch_1": bare_1,
            f"batch_{args.max_batch_size}": bare_batch,
        },
        "http": levels,
        "load": load,
        "batch_metrics": calls,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
