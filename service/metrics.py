"""Prometheus metrics of one app instance, in a registry of its own."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request, stage, batching, index and model metrics.

    Stages: ``decode`` (decoding and preprocessing uploads), ``queue`` (waiting
    for the batcher), ``inference`` (one ONNX Runtime call), ``embed`` (queue
    plus inference, per request), ``search`` (FAISS) and ``store`` (SQLite).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dcl_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "dcl_http_request_seconds",
            "HTTP request latency by method and route template, seconds.",
            ["method", "route"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "dcl_stage_seconds",
            "Time spent per request stage, seconds.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.images_embedded = Counter(
            "dcl_images_embedded",
            "Images decoded and embedded.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "dcl_batch_size",
            "Images per ONNX Runtime call; the histogram's count is the number "
            "of calls.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "dcl_batch_queue_depth",
            "Embedding requests waiting for the batcher.",
            registry=self.registry,
        )
        self.queue_rejections = Counter(
            "dcl_batch_queue_rejections",
            "Embedding requests rejected with 429 because the queue was full.",
            registry=self.registry,
        )
        self.index_size = Gauge(
            "dcl_index_vectors",
            "Vectors in the FAISS index.",
            registry=self.registry,
        )
        self.model = Info(
            "dcl_model",
            "The loaded bundle and the ONNX Runtime execution provider in use.",
            registry=self.registry,
        )

    @contextlib.contextmanager
    def time(self, stage: str) -> Iterator[None]:
        """Record the duration of the block under ``stage``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(stage=stage).observe(time.perf_counter() - start)

    def track_index_size(self, size: Callable[[], float]) -> None:
        """Read the index size from ``size`` at every scrape."""
        self.index_size.set_function(size)

    def track_queue_depth(self, depth: Callable[[], float]) -> None:
        """Read the batcher's queue depth from ``depth`` at every scrape."""
        self.queue_depth.set_function(depth)

    def set_model(self, sha256: str, architecture: str, provider: str) -> None:
        """Publish the loaded model and its execution provider."""
        self.model.info(
            {"sha256": sha256, "architecture": architecture, "provider": provider}
        )
