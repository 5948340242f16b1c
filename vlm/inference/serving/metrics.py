"""The Prometheus metrics of ``vlm serve`` (GET /metrics): requests, latency, queue, tokens.

Each app has its own registry (several apps in one process do not collide). The request counter
and the latency histogram are kept by the app; the engine's numbers are read at scrape time.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vlm.inference.serving.engine import GenerationEngine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector(Collector):
    """The engine's queue, tokens and time, read when /metrics is scraped."""

    def __init__(self, engine: GenerationEngine):
        self.engine = engine

    def collect(self) -> Iterator:
        stats = self.engine.stats
        yield GaugeMetricFamily("vlm_queue_depth", "Requests queued for the worker, not started",
                                value=self.engine.waiting())
        yield GaugeMetricFamily("vlm_requests_generating", "Requests in the batch the worker is generating",
                                value=stats.running)
        yield CounterMetricFamily("vlm_generated_tokens", "Tokens generated (completion tokens)",
                                  value=stats.generated_tokens)
        yield CounterMetricFamily("vlm_generation_seconds", "Seconds the worker spent generating "
                                  "(tokens/s = vlm_generated_tokens_total / this)", value=stats.generation_seconds)
        cancelled = CounterMetricFamily("vlm_requests_cancelled", "Requests given up (timeout, client gone): "
                                        "dropped from the queue, or stopped while generating", labels=["when"])
        cancelled.add_metric(["queued"], stats.cancelled_queued)
        cancelled.add_metric(["generating"], stats.cancelled_generating)
        yield cancelled


class ServeMetrics:
    """The registry behind /metrics: ``observe`` records one answered chat request."""

    def __init__(self, engine: GenerationEngine, in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("vlm_requests", "Chat completion requests answered, by HTTP status code",
                                ["code"], registry=self.registry)
        self.latency = Histogram("vlm_request_latency_seconds", "Chat completion request latency, arrival to "
                                 "last byte", buckets=LATENCY_BUCKETS, registry=self.registry)
        Gauge("vlm_requests_in_flight", "Chat completion requests being answered (queued, generating or "
              "streaming)", registry=self.registry).set_function(in_flight)
        self.registry.register(_EngineCollector(engine))

    def observe(self, status: int, seconds: float) -> None:
        """Count a request answered with ``status`` after ``seconds``."""
        self.requests.labels(code=str(status)).inc()
        self.latency.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    content_type = CONTENT_TYPE_LATEST
