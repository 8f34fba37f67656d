"""The dynamic batcher returns the same embeddings as direct encoder calls."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.batching import BatcherClosed, EmbeddingBatcher
from service.encoder import Encoder


def test_concurrent_requests_share_batches(bundle_dir: Path):
    encoder = Encoder(bundle_dir)
    rng = np.random.default_rng(0)
    requests = [
        rng.normal(size=(n, 3, 32, 32)).astype(np.float32) for n in (1, 3, 2, 5, 1, 4)
    ]

    async def run() -> tuple[list[np.ndarray], int]:
        batcher = EmbeddingBatcher(encoder, max_batch_size=8, max_wait_s=0.05)
        batcher.start()
        try:
            outputs = await asyncio.gather(*(batcher.embed(r) for r in requests))
        finally:
            await batcher.stop()
        return list(outputs), batcher.batches_run

    outputs, batches_run = asyncio.run(run())
    for request, output in zip(requests, outputs, strict=True):
        np.testing.assert_allclose(output, encoder.embed(request), atol=1e-5)
    # 16 images with at most 8 per call need at least 2 calls, and gathering
    # must merge some of the 6 requests.
    assert 2 <= batches_run < len(requests)


def test_oversized_request_runs_alone(bundle_dir: Path):
    encoder = Encoder(bundle_dir)
    batch = np.zeros((10, 3, 32, 32), dtype=np.float32)

    async def run() -> np.ndarray:
        batcher = EmbeddingBatcher(encoder, max_batch_size=4, max_wait_s=0.0)
        batcher.start()
        try:
            return await batcher.embed(batch)
        finally:
            await batcher.stop()

    assert asyncio.run(run()).shape == (10, encoder.dim)


def test_stopped_batcher_rejects(bundle_dir: Path):
    encoder = Encoder(bundle_dir)

    async def run() -> None:
        batcher = EmbeddingBatcher(encoder)
        batcher.start()
        await batcher.stop()
        await batcher.embed(np.zeros((1, 3, 32, 32), dtype=np.float32))

    with pytest.raises(BatcherClosed):
        asyncio.run(run())


def _two_requests_apart(
    encoder: Encoder, announce: bool, max_fill_wait_s: float
) -> tuple[int, list[np.ndarray]]:
    """Send one image, then, 50 ms later, two more; return calls and outputs.

    With ``announce`` the two images are announced with ``incoming`` before
    the first request is sent, as the API does while it decodes an upload.
    Three images in the service make a fill target of two.
    """
    images = [
        np.zeros((1, 3, 32, 32), dtype=np.float32),
        np.full((2, 3, 32, 32), 0.5, dtype=np.float32),
    ]

    async def run() -> tuple[int, list[np.ndarray]]:
        batcher = EmbeddingBatcher(
            encoder, max_batch_size=8, max_wait_s=0.0, max_fill_wait_s=max_fill_wait_s
        )
        batcher.start()

        async def late() -> np.ndarray:
            if not announce:
                await asyncio.sleep(0.05)
                return await batcher.embed(images[1])
            with batcher.incoming(2):
                await asyncio.sleep(0.05)
            return await batcher.embed(images[1])

        try:
            late_task = asyncio.create_task(late())
            await asyncio.sleep(0)
            outputs = [await batcher.embed(images[0]), await late_task]
        finally:
            await batcher.stop()
        return batcher.batches_run, outputs

    return asyncio.run(run())


def test_fill_wait_joins_announced_images(bundle_dir: Path):
    encoder = Encoder(bundle_dir)

    batches_run, outputs = _two_requests_apart(encoder, True, max_fill_wait_s=30.0)

    assert batches_run == 1
    np.testing.assert_allclose(
        outputs[1], encoder.embed(np.full((2, 3, 32, 32), 0.5, np.float32)), atol=1e-5
    )


def test_unannounced_late_request_runs_alone(bundle_dir: Path):
    encoder = Encoder(bundle_dir)

    batches_run, _ = _two_requests_apart(encoder, False, max_fill_wait_s=30.0)

    assert batches_run == 2


def test_abandoned_announcement_ends_wait(bundle_dir: Path):
    # An announced upload that fails to decode never reaches embed; the first
    # request still runs once max_fill_wait_s has passed.
    encoder = Encoder(bundle_dir)

    async def run() -> np.ndarray:
        batcher = EmbeddingBatcher(
            encoder, max_batch_size=8, max_wait_s=0.0, max_fill_wait_s=0.2
        )
        batcher.start()
        try:
            with batcher.incoming(2):
                first = asyncio.create_task(
                    batcher.embed(np.zeros((1, 3, 32, 32), dtype=np.float32))
                )
                await asyncio.sleep(0)
            assert batcher.incoming_images == 0
            return await asyncio.wait_for(first, timeout=30)
        finally:
            await batcher.stop()

    assert asyncio.run(run()).shape == (1, encoder.dim)


def test_negative_fill_wait_rejected(bundle_dir: Path):
    with pytest.raises(ValueError, match="max_fill_wait_s"):
        EmbeddingBatcher(Encoder(bundle_dir), max_fill_wait_s=-1.0)
