"""Measure embedding throughput and latency over HTTP against bare ONNX Runtime.

Starts ``dcl serve``'s app (uvicorn, one process) on 127.0.0.1 in a subprocess and
sends single-image ``POST /v1/embed`` requests from an asyncio aiohttp client in a
third process, at several concurrency levels. The client sends pre-built multipart
bodies, so that its own CPU use stays small. For each level it reports images per
second, p50 and p99 latency, the mean ONNX Runtime batch (from ``/metrics``), and
the ratio of the HTTP throughput to bare ONNX Runtime on the same bundle in the
same run.

The peer, bare ONNX Runtime, is ``Encoder.embed`` in a loop on already
preprocessed arrays, with the server's session options. It runs at each of
``--bare-batch-sizes``, and the best batch size counts. It is measured before
and after the HTTP levels, and the ratio uses the higher of the two, because
other jobs on a shared machine change the CPU time available. The HTTP path also
parses the multipart body and decodes and preprocesses each JPEG, which the peer
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
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.queues import Queue
from pathlib import Path

import aiohttp
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


def measure_bare(
    encoder: Encoder, jpegs: list[bytes], batch: int, seconds: float
) -> float:
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


def multipart_body(data: bytes) -> tuple[bytes, str]:
    """Return a one-file ``images`` multipart body and its content type."""
    request = httpx.Request(
        "POST", "http://127.0.0.1/", files={"images": ("a.jpg", data, "image/jpeg")}
    )
    return request.read(), request.headers["content-type"]


async def run_clients(
    url: str, jpegs: list[bytes], concurrency: int, seconds: float
) -> dict:
    """Send single-image embeds from ``concurrency`` clients for ``seconds``.

    Uses aiohttp, which takes less CPU time per request than httpx, so more of
    the shared cores go to the server.
    """
    bodies = [multipart_body(data) for data in jpegs]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)

    async with aiohttp.ClientSession(
        base_url=url, connector=connector, timeout=timeout
    ) as session:

        async def worker(index: int) -> None:
            nonlocal errors
            i = index
            while time.perf_counter() < deadline:
                body, content_type = bodies[i % len(bodies)]
                i += concurrency
                start = time.perf_counter()
                try:
                    async with session.post(
                        "/v1/embed", data=body, headers={"content-type": content_type}
                    ) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    continue
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
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


def _client_process(
    url: str, jpegs: list[bytes], concurrency: int, seconds: float, out: Queue
) -> None:
    out.put(asyncio.run(run_clients(url, jpegs, concurrency, seconds)))


def run_clients_in_process(
    url: str, jpegs: list[bytes], concurrency: int, seconds: float
) -> dict:
    """Run ``run_clients`` in a separate process, so it holds no server GIL."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(
        target=_client_process, args=(url, jpegs, concurrency, seconds, out)
    )
    process.start()
    result = out.get(timeout=seconds + 300)
    process.join()
    return result


def batch_counters(url: str) -> tuple[float, float]:
    """Return the server's (images, ONNX Runtime calls) counted by the batcher."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("dcl_batch_size_sum", "dcl_batch_size_count"):
            values[name] = float(value)
    return values["dcl_batch_size_sum"], values["dcl_batch_size_count"]


def measure_level(url: str, jpegs: list[bytes], concurrency: int, seconds: float):
    """Run one concurrency level and add the mean batch size over it."""
    images_before, calls_before = batch_counters(url)
    result = run_clients_in_process(url, jpegs, concurrency, seconds)
    images_after, calls_after = batch_counters(url)
    calls = calls_after - calls_before
    result["mean_batch"] = (images_after - images_before) / calls if calls else 0.0
    return result


def measure_bare_sizes(
    encoder: Encoder, jpegs: list[bytes], sizes: list[int], seconds: float
) -> dict[int, float]:
    """Return images per second of bare ONNX Runtime at each batch size."""
    rates = {size: measure_bare(encoder, jpegs, size, seconds) for size in sizes}
    logger.info(
        "bare ONNX Runtime, images/s by batch size: %s",
        ", ".join(f"{size}: {rate:.1f}" for size, rate in rates.items()),
    )
    return rates


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
        "DCL_MAX_BATCH_FILL_WAIT_MS": str(args.max_batch_fill_wait_ms),
        "DCL_INTRA_OP_THREADS": str(args.intra_op_threads),
        "DCL_DECODE_THREADS": str(args.decode_threads),
        "DCL_PROVIDERS": "cpu",
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
    parser.add_argument(
        "--seconds", type=float, default=10, help="Seconds per level and batch size."
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 8, 32],
        help="Concurrent clients of each measured level.",
    )
    parser.add_argument(
        "--bare-batch-sizes",
        type=int,
        nargs="+",
        default=[1, 8, 16, 32, 64],
        help="Batch sizes of the bare ONNX Runtime peer; the fastest one counts.",
    )
    parser.add_argument("--load-concurrency", type=int, default=64)
    parser.add_argument("--load-seconds", type=float, default=60)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-wait-ms", type=float, default=2.0)
    parser.add_argument(
        "--max-batch-fill-wait-ms",
        type=float,
        default=25.0,
        help="Server's DCL_MAX_BATCH_FILL_WAIT_MS, milliseconds.",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads, for the server and the peer; 0 lets "
        "ONNX Runtime choose.",
    )
    parser.add_argument(
        "--decode-threads", type=int, default=4, help="Server's DCL_DECODE_THREADS."
    )
    parser.add_argument("--max-queue-size", type=int, default=256)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if args.make_resnet18 is not None:
            bundle = make_resnet18_bundle(args.make_resnet18)
        if bundle is None:
            # The tiny test bundle lives in the repository's tests package.
            sys.path.insert(0, str(REPO_ROOT))
            from tests.tiny_bundle import make_tiny_bundle

            bundle = make_tiny_bundle(Path(tmp) / "tiny", dim=32, image_size=32)
        encoder = Encoder(
            bundle,
            providers=["CPUExecutionProvider"],
            intra_op_threads=args.intra_op_threads,
        )
        size = encoder.metadata.preprocessing.resize_size
        architecture = encoder.metadata.architecture
        jpegs = sample_jpegs(256, size)
        sizes = args.bare_batch_sizes
        bare_before = measure_bare_sizes(encoder, jpegs, sizes, args.seconds)

        port = free_port()
        server = start_server(bundle, Path(tmp) / "data", port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            levels = []
            for concurrency in args.concurrency:
                result = measure_level(url, jpegs, concurrency, args.seconds)
                levels.append(result)
                logger.info("%s", json.dumps(result))

            # The peer runs while the server idles, so they do not compete.
            bare_after = measure_bare_sizes(encoder, jpegs, sizes, args.seconds)

            rss_start = rss_mib(server.pid)
            load = measure_level(url, jpegs, args.load_concurrency, args.load_seconds)
            load["rss_start_mib"] = rss_start
            load["rss_end_mib"] = rss_mib(server.pid)
            logger.info("load: %s", json.dumps(load))
        finally:
            server.terminate()
            server.wait(timeout=60)

    best = {size: max(bare_before[size], bare_after[size]) for size in sizes}
    best_size = max(best, key=best.__getitem__)
    for result in levels:
        result["ratio_to_bare_best"] = result["images_per_s"] / best[best_size]
        result["ratio_to_bare_1"] = (
            result["images_per_s"] / best[1] if 1 in best else None
        )
    logger.info(
        "peer: bare ONNX Runtime at batch %d, %.1f images/s; ratios %s",
        best_size,
        best[best_size],
        ", ".join(f"c{r['concurrency']}={r['ratio_to_bare_best']:.2f}" for r in levels),
    )
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "bundle": str(bundle),
        "architecture": architecture,
        "bare_images_per_s_before": bare_before,
        "bare_images_per_s_after": bare_after,
        "bare_best_batch_size": best_size,
        "http": levels,
        "load": load,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
