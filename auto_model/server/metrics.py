"""The server's Prometheus metrics (``prometheus_client``, one registry per app): what ``GET /metrics``
shows. No key, query or answer appears there."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: the buckets of the stream latency histograms (seconds)
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """The counters, gauges and histograms of one app, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("auto_model_requests", "Requests answered, by endpoint and HTTP status.",
                                ["endpoint", "status"], registry=registry)  # fmt: skip
        self.latency = Histogram("auto_model_request_seconds", "Seconds until the response starts, by endpoint.",
                                 ["endpoint"], registry=registry)  # fmt: skip
        self.tokens = Counter("auto_model_tokens", "Tokens of answered requests (streams from an upstream: not "
                              "counted).", ["kind"], registry=registry)  # fmt: skip
        self.in_progress = Gauge("auto_model_requests_in_progress", "Requests being answered now.", registry=registry)
        self.queue_depth = Gauge("auto_model_queue_depth", "Requests waiting for or in an engine batch, or for an "
                                 "upstream slot.", registry=registry)  # fmt: skip
        self.checks_run = Counter("auto_model_answer_checks", "Answers the answer check scored, by route.", ["route"],
                                  registry=registry)  # fmt: skip
        self.replaced = Counter("auto_model_answers_replaced", "Answers the answer check replaced with the refusal, "
                                "by route.", ["route"], registry=registry)  # fmt: skip
        self.first_token = Histogram("auto_model_time_to_first_token_seconds", "In-process streams: seconds from "
                                     "the request to the first text sent (a window of it where the answer check "
                                     "holds text back).", registry=registry, buckets=_SECONDS)  # fmt: skip
        self.between_tokens = Histogram("auto_model_inter_token_latency_seconds", "In-process streams: seconds "
                                        "between two pieces of text sent.", registry=registry,
                                        buckets=_SECONDS)  # fmt: skip
        self.queue_wait = Histogram("auto_model_queue_wait_seconds", "In-process: seconds a request waited before "
                                    "the engine got it (for its micro-batch to start, or for a thread to hand it to "
                                    "an engine that batches continuously).", registry=registry,
                                    buckets=_SECONDS)  # fmt: skip
        self.batch_sizes = Histogram("auto_model_batch_size", "Requests per in-process engine call.",
                                     registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))  # fmt: skip

    def count_tokens(self, prompt: int, completion: int) -> None:
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("completion").inc(completion)

    def text(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)
