"""Prometheus metrics of one app: requests, latencies, index sizes and encoding time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The app's own registry (not the global one), so several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cmh_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "cmh_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.index_size = Gauge(
            "cmh_index_items", "items in the served index", ["modality"], registry=self.registry
        )
        self.encode = Histogram(
            "cmh_encode_seconds",
            "time to encode a query into a code",
            ["modality"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.image_batch = Histogram(
            "cmh_image_batch_size",
            "images per backbone batch (micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )

    def set_index_size(self, image: int, text: int) -> None:
        """Record the served index sizes."""
        self.index_size.labels("image").set(image)
        self.index_size.labels("text").set(text)
