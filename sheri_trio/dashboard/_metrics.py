"""``/metrics``: the model read at scrape time, in the Prometheus text format
(``prometheus_client``, a registry of the dashboard's own)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from prometheus_client.core import Metric

    from ._model import SwarmModel

__all__ = ["LATENCY_BUCKETS", "Metrics"]

#: claim-to-start latency buckets, seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """A collector over one :class:`SwarmModel` (and the broker link's state)."""

    def __init__(self, model: SwarmModel, connected: Callable[[], bool]) -> None:
        self.model = model
        self.connected = connected
        self._buckets = [0] * len(LATENCY_BUCKETS)
        self._count = 0
        self._sum = 0.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def _drain_latencies(self) -> None:
        for seconds in self.model.claim_to_start:
            self._count += 1
            self._sum += seconds
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self._buckets[i] += 1
        self.model.claim_to_start.clear()

    def collect(self) -> Iterator[Metric]:
        m = self.model
        swarm = m.topics.swarm
        online = GaugeMetricFamily(
            "sheri_agents_online", "Agents online, per role.", labels=["swarm", "role"]
        )
        for role, count in m.online_by_role().items():
            online.add_metric([swarm, role], count)
        yield online
        pending = GaugeMetricFamily(
            "sheri_tasks_pending",
            "Tasks nobody holds yet, per role that may take them (the dispatcher's queue "
            "depth in dispatcher mode).",
            labels=["swarm", "role"],
        )
        for role, count in m.pending_by_role().items():
            pending.add_metric([swarm, role], count)
        yield pending
        outcomes = CounterMetricFamily(
            "sheri_tasks_finished",
            "Final outcomes seen, by outcome (completed, failed, cancelled, expired) and type.",
            labels=["swarm", "outcome", "type"],
        )
        for (outcome, kind), count in sorted(m.outcomes.items()):
            outcomes.add_metric([swarm, outcome, kind], count)
        yield outcomes
        self._drain_latencies()
        cumulative: list[tuple[str, float]] = []
        for bound, count in zip(LATENCY_BUCKETS, self._buckets, strict=True):
            cumulative.append((str(bound), count))
        cumulative.append(("+Inf", self._count))
        latency = HistogramMetricFamily(
            "sheri_claim_to_start_seconds",
            "From the winning claim to the holder's 'running' event.",
            labels=["swarm"],
        )
        latency.add_metric([swarm], cumulative, sum_value=self._sum)
        yield latency
        yield self._counter("sheri_takeovers", "Claims of an attempt after the first.", m.takeovers)
        yield self._counter("sheri_swarm_errors", "Reports on {swarm}/errors.", m.errors)
        yield self._counter(
            "sheri_dashboard_messages", "Messages the dashboard has read.", m.messages
        )
        broker = GaugeMetricFamily(
            "sheri_dashboard_broker_connected",
            "1 while the dashboard is connected to the broker.",
            labels=["swarm"],
        )
        broker.add_metric([swarm], 1 if self.connected() else 0)
        yield broker

    def _counter(self, name: str, text: str, value: Any) -> CounterMetricFamily:
        family = CounterMetricFamily(name, text, labels=["swarm"])
        family.add_metric([self.model.topics.swarm], value)
        return family

    def render(self) -> bytes:
        return generate_latest(self.registry)
