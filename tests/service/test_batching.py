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
