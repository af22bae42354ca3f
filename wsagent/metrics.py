"""Prometheus metrics in the text exposition format, without a dependency.

Counters are plain integers bumped where things happen; gauges are read from
the server's state when ``/metrics`` is scraped, so the relay's hot path pays
for nothing but the relay-latency histogram (one observation per written
batch, not per token).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import WsAgentServer

__all__ = ["Histogram", "Metrics", "render"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> Iterable[str]:
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            yield f'{name}_bucket{{le="{bound}"}} {running}'
        yield f'{name}_bucket{{le="+Inf"}} {self.count}'
        yield f"{name}_sum {self.sum}"
        yield f"{name}_count {self.count}"


class Metrics:
    """What the server counts as it goes."""

    def __init__(self) -> None:
        self.upstream_requests: Counter[str] = Counter()
        self.upstream_ttft = Histogram(TTFT_BUCKETS)
        self.relay_latency = Histogram(LATENCY_BUCKETS)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(server: WsAgentServer) -> str:
    m = server.metrics
    active = server.runs.active()
    out: list[str] = []

    def family(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")

    def single(name: str, kind: str, text: str, value: float) -> None:
        family(name, kind, text)
        out.append(f"{name} {value}")

    def labelled(name: str, kind: str, text: str, label: str, counts: Mapping[str, int]) -> None:
        family(name, kind, text)
        out.extend(f'{name}{{{label}="{_escape(key)}"}} {count}' for key, count in sorted(counts.items()))

    def histogram(name: str, text: str, values: Histogram) -> None:
        family(name, "histogram", text)
        out.extend(values.lines(name))

    labelled("wsagent_connections_open", "gauge", "Open WebSocket connections by route.", "route",
             server.manager.open_by_route())
    labelled("wsagent_connections_total", "counter", "WebSocket connections accepted by route.", "route",
             server.manager.total_by_route)
    single("wsagent_runs_active", "gauge", "Runs streaming now.", len(active))
    labelled("wsagent_runs_total", "counter", "Finished runs by outcome.", "outcome", server.runs.total)
    single("wsagent_tokens_relayed_total", "counter", "Text deltas relayed from the model.",
           server.runs.tokens + sum(run.streamed for run in active))
    labelled("wsagent_upstream_requests_total", "counter", "Requests to the model server by HTTP status.", "status",
             m.upstream_requests)
    histogram("wsagent_upstream_ttft_seconds", "Time from request to the model's first event.", m.upstream_ttft)
    histogram("wsagent_relay_latency_seconds", "Time from a delta's arrival to its frame in the socket.",
              m.relay_latency)
    labelled("wsagent_cancellations_total", "counter", "Cancelled runs by reason.", "reason",
             server.runs.cancellations)
    single("wsagent_slow_client_closes_total", "counter", "Clients closed with 4008.", server.manager.slow_closes)
    single("wsagent_bytes_buffered", "gauge", "Bytes produced but not yet written to client sockets.",
           sum(run.undelivered for run in active) + sum(c.outbox.queued_bytes for c in server.manager))
    return "\n".join(out) + "\n"
