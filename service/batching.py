"""Dynamic batching: concurrent embedding requests share one ONNX Runtime call.

Requests put their preprocessed images on a bounded asyncio queue. One worker
task takes the first waiting request, waits up to ``max_wait_s`` for more to
arrive while the batch has room, runs the encoder once in a worker thread, and
hands each request its rows of the output.

Under load the worker waits longer, up to ``max_fill_wait_s``, for a fill
target: half the images in the service (queued, announced with ``incoming``
while being decoded, or in the batch), now or when the previous batch
finished, whichever is more. Two groups of clients then alternate: one group's
batch runs in ONNX Runtime while the other group's requests are sent, parsed and
decoded, so the encoder is not left idle while one batch of every client does
HTTP work.

When the queue is full, ``embed`` raises :class:`QueueFull` at once, so overload
gives fast rejections (HTTP 429) and never an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import anyio.to_thread
import numpy as np

from service.encoder import Encoder
from service.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    images: np.ndarray
    future: asyncio.Future[np.ndarray]


class BatcherClosed(RuntimeError):
    """The batcher was stopped, so it takes no more requests."""


class QueueFull(RuntimeError):
    """The batcher's queue contains ``max_queue_size`` requests already."""

    def __init__(self, max_queue_size: int) -> None:
        super().__init__(
            f"the embedding queue is full ({max_queue_size} requests waiting)"
        )
        self.max_queue_size = max_queue_size


class EmbeddingBatcher:
    """Gathers concurrent ``embed`` calls into batches of at most ``max_batch_size``.

    A request larger than ``max_batch_size`` runs alone, in one call. Create and
    use the batcher inside one running event loop; call ``start`` before the
    first request and ``stop`` at shutdown.

    Args:
        encoder: the ONNX Runtime encoder.
        max_batch_size: maximum number of images in one encoder call, summed over
            requests.
        max_wait_s: how long the first request of a batch waits for others.
        max_fill_wait_s: how long the first request of a batch waits, in all,
            for the fill target under load (see the module docstring). Values
            below ``max_wait_s`` are raised to it.
        max_queue_size: maximum number of requests waiting; ``embed`` raises
            :class:`QueueFull` beyond it.
        metrics: where to record batch sizes and inference time, if given.
    """

    def __init__(
        self,
        encoder: Encoder,
        max_batch_size: int = 64,
        max_wait_s: float = 0.002,
        max_queue_size: int = 256,
        metrics: Metrics | None = None,
        max_fill_wait_s: float = 0.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size is {max_batch_size}; use 1 or more")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s is {max_wait_s}; use 0 or more")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size is {max_queue_size}; use 1 or more")
        if max_fill_wait_s < 0:
            raise ValueError(f"max_fill_wait_s is {max_fill_wait_s}; use 0 or more")
        self.encoder = encoder
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_fill_wait_s = max(max_fill_wait_s, max_wait_s)
        self._incoming = 0
        self._fill_target = 1
        self._queued_images = 0
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=max_queue_size)
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self.batches_run = 0

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._run(), name="embedding-batcher"
            )

    async def stop(self) -> None:
        """Stop the worker and fail the requests still waiting."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while not self._queue.empty():
            request = self._queue.get_nowait()
            if not request.future.done():
                request.future.set_exception(BatcherClosed("the service is stopping"))

    @property
    def queue_depth(self) -> int:
        """Number of requests waiting for the worker."""
        return self._queue.qsize()

    @property
    def incoming_images(self) -> int:
        """Number of images announced with ``incoming`` and not yet queued."""
        return self._incoming

    @contextlib.contextmanager
    def incoming(self, images: int) -> Iterator[None]:
        """Announce ``images`` that will reach ``embed`` when the block ends.

        Wrap the decoding step in it and call ``embed`` right after the block,
        with no ``await`` in between, so that the images are always counted as
        announced or as queued while the worker decides how long to wait.
        """
        self._incoming += images
        try:
            yield
        finally:
            self._incoming -= images

    async def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed a preprocessed [N, 3, H, W] batch; return [N, D] float32.

        Raises:
            QueueFull: ``max_queue_size`` requests are waiting already.
            BatcherClosed: the batcher is not running.
        """
        if self._closed or self._worker is None:
            raise BatcherClosed("the embedding batcher is not running")
        if len(images) == 0:
            return np.empty((0, self.encoder.dim), dtype=np.float32)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Request(images=images, future=future))
            self._queued_images += len(images)
        except asyncio.QueueFull:
            if self.metrics is not None:
                self.metrics.queue_rejections.inc()
            raise QueueFull(self.max_queue_size) from None
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            self._queued_images -= len(batch[0].images)
            size = len(batch[0].images)
            started = time.monotonic()
            while size < self.max_batch_size:
                # Take what is already queued, then wait for the rest of the window.
                if self._queue.empty():
                    timeout = self._wait_left(started, size)
                    if timeout <= 0:
                        break
                    try:
                        request = await asyncio.wait_for(self._queue.get(), timeout)
                    except TimeoutError:
                        continue
                else:
                    request = self._queue.get_nowait()
                self._queued_images -= len(request.images)
                if size + len(request.images) > self.max_batch_size:
                    # Too big to join: it starts the next batch.
                    await self._run_batch(batch)
                    batch, size = [request], len(request.images)
                    started = time.monotonic()
                    continue
                batch.append(request)
                size += len(request.images)
            await self._run_batch(batch)

    def _wait_left(self, started: float, size: int) -> float:
        """Return how long to wait for the next request, 0 to run the batch now."""
        elapsed = time.monotonic() - started
        fill_left = self.max_fill_wait_s - elapsed
        in_service = size + self._queued_images + self._incoming
        target = min(self.max_batch_size, max(self._fill_target, (in_service + 1) // 2))
        if size < target and fill_left > 0:
            if self._incoming == 0:
                return fill_left
            # Re-check every max_wait_s (at least 1 ms) in case an announced
            # request fails to decode and never arrives.
            return min(fill_left, max(self.max_wait_s, 0.001))
        return max(0.0, self.max_wait_s - elapsed)

    async def _run_batch(self, batch: list[_Request]) -> None:
        live = [r for r in batch if not r.future.done()]
        if not live:
            return
        images = np.concatenate([r.images for r in live], axis=0)
        started = time.perf_counter()
        try:
            embeddings = await anyio.to_thread.run_sync(self.encoder.embed, images)
        except Exception as exc:
            logger.exception("Embedding a batch of %d images failed", len(images))
            for request in live:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        self.batches_run += 1
        # The clients of this batch are likely to send again soon; the next
        # batch waits for half of the images in the service just now.
        in_service = len(images) + self._incoming + self._queued_images
        self._fill_target = min(self.max_batch_size, (in_service + 1) // 2)
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(images))
            self.metrics.stage_seconds.labels(stage="inference").observe(
                time.perf_counter() - started
            )
        start = 0
        for request in live:
            end = start + len(request.images)
            if not request.future.done():
                request.future.set_result(embeddings[start:end])
            start = end
