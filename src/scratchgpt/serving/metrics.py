"""Prometheus metrics for `scratchgpt serve`, at GET /metrics: what a dashboard or an alert needs.

    scratchgpt_requests_total{status}        responses to /v1/* by HTTP status (401s, 413s and 429s included)
    scratchgpt_tokens_generated_total        completion tokens streamed or returned
    scratchgpt_requests_running              requests holding slots now
    scratchgpt_requests_waiting              requests waiting for a slot now
    scratchgpt_step_seconds                  how long the engine's steps take (a histogram)

Each app has its own registry, so several servers in one process (the tests) do not share counts.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # seconds: a CPU step is ms


class ServerMetrics:
    """The server's counters, gauges and step-time histogram, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._load: Callable[[], dict[str, int]] = lambda: {"running": 0, "waiting": 0}
        self.requests = Counter("scratchgpt_requests", "Responses to /v1/* requests, by HTTP status", ["status"],
                                registry=self.registry)
        self.tokens = Counter("scratchgpt_tokens_generated", "Completion tokens generated", registry=self.registry)
        self.step_seconds = Histogram("scratchgpt_step_seconds", "Seconds per engine step (all running requests)",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        running = Gauge("scratchgpt_requests_running", "Requests holding slots", registry=self.registry)
        waiting = Gauge("scratchgpt_requests_waiting", "Requests waiting for a slot", registry=self.registry)
        running.set_function(lambda: self._load()["running"])
        waiting.set_function(lambda: self._load()["waiting"])

    def follow(self, load: Callable[[], dict[str, int]]) -> None:
        """Read the running and waiting gauges from `load()` (the scheduler's) when scraped."""
        self._load = load

    def count_response(self, path: str, status: int) -> None:
        if path.startswith("/v1/"):
            self.requests.labels(str(status)).inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus's text format."""
        return generate_latest(self.registry)
