"""Prometheus metrics of steered traffic: counted in the API front end at request admission,
served on vLLM's own /metrics."""

from __future__ import annotations


class SteerMetrics:
    """Prometheus metrics, counted in the API front end at request admission and served on
    vLLM's own /metrics."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter("vllm_steer_requests", "Admitted requests that use a steer, by steer", ["steer"])
        self.values = Histogram("vllm_steer_value", "Primary-dim value of admitted steered requests", ["steer"],
                                buckets=(-20, -10, -5, -2, -1, -0.5, 0, 0.5, 1, 2, 5, 10, 20))
        self.rejected = Counter("vllm_steer_rejected", "Requests refused for their steer values, by reason",
                                ["reason"])
        self.preset_requests = Counter("vllm_steer_preset_requests", "Admitted requests for a steer preset, by preset",
                                       ["preset"])


METRICS = SteerMetrics()
