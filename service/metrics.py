"""Prometheus metrics of one app instance, in a registry of its own."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """Stage latencies, embedded image counts and the index size."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self.index_size = Gauge(
            "dcl_index_vectors",
            "Vectors in the FAISS index.",
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
