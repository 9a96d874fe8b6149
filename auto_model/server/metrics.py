"""The server's Prometheus metrics (``prometheus_client``, one registry per app): what ``GET /metrics``
shows. No key, query or answer appears there."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServerMetrics:
    """The counters, gauges and histograms of one app, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("auto_model_requests", "Requests answered, by endpoint and HTTP status.",
                                ["endpoint", "status"], registry=registry)  # fmt: skip
        self.latency = Histogram("auto_model_request_seconds", "Seconds until the response starts, by endpoint.",
                                 ["endpoint"], registry=registry)  # fmt: skip
        self.tokens = Counter("auto_model_tokens", "Tokens of answered requests (streams: not counted).", ["kind"],
                              registry=registry)  # fmt: skip
        self.in_progress = Gauge("auto_model_requests_in_progress", "Requests being answered now.", registry=registry)
        self.queue_depth = Gauge("auto_model_queue_depth", "Requests waiting for or in an engine batch, or for an "
                                 "upstream slot.", registry=registry)  # fmt: skip
        self.checks_run = Counter("auto_model_answer_checks", "Answers the answer check scored, by route.", ["route"],
                                  registry=registry)  # fmt: skip
        self.replaced = Counter("auto_model_answers_replaced", "Answers the answer check replaced with the refusal, "
                                "by route.", ["route"], registry=registry)  # fmt: skip
        self.batch_sizes = Histogram("auto_model_batch_size", "Requests per in-process engine call.",
                                     registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))  # fmt: skip

    def count_tokens(self, prompt: int, completion: int) -> None:
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("completion").inc(completion)

    def text(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)
