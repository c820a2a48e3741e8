"""Prometheus metrics of one broker (its own registry, so several brokers in one test process
do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .state import BROKEN, DRAINING, FREE, LEASED, WARMING

STATES = (FREE, WARMING, LEASED, DRAINING, BROKEN)


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.slices = Gauge(
            "mig_kernel_slices", "Slices by state", ["state"], registry=self.registry
        )
        self.queue_length = Gauge(
            "mig_kernel_queue_length",
            "Acquire requests waiting for a slice",
            registry=self.registry,
        )
        self.grant_latency = Histogram(
            "mig_kernel_grant_latency_seconds",
            "From an acquire request's arrival to its grant (queue wait included)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600),
            registry=self.registry,
        )
        self.granted = Counter(
            "mig_kernel_leases_granted", "Leases granted", registry=self.registry
        )
        self.reclaimed = Counter(
            "mig_kernel_leases_reclaimed",
            "Leases ended by the broker rather than released by their holder",
            ["reason"],
            registry=self.registry,
        )
        self.released = Counter(
            "mig_kernel_leases_released", "Leases released by their holder", registry=self.registry
        )
        self.rejected = Counter(
            "mig_kernel_rejected_messages",
            "Messages refused before dispatch (malformed, unsigned, replayed)",
            ["reason"],
            registry=self.registry,
        )
        self.executor_starts = Counter(
            "mig_kernel_executor_starts", "Executor processes started", registry=self.registry
        )

    def set_slice_counts(self, counts: dict[str, int], queue_length: int) -> None:
        for state in STATES:
            self.slices.labels(state=state).set(counts.get(state, 0))
        self.queue_length.set(queue_length)

    def text(self) -> str:
        return generate_latest(self.registry).decode()
