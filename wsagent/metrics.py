"""Prometheus metrics in the text exposition format, without a dependency.

Counters are plain integers bumped where things happen; gauges are read from
the server's state when ``/metrics`` is scraped, so the relay's hot path pays
for nothing but the relay-latency histogram (one observation per written
batch, not per token).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Sequence
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
    out: list[str] = []

    def family(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")

    family("wsagent_connections_open", "gauge", "Open WebSocket connections by route.")
    for route, count in sorted(server.manager.open_by_route().items()):
        out.append(f'wsagent_connections_open{{route="{_escape(route)}"}} {count}')
    family("wsagent_connections_total", "counter", "WebSocket connections accepted by route.")
    for route, count in sorted(server.manager.total_by_route.items()):
        out.append(f'wsagent_connections_total{{route="{_escape(route)}"}} {count}')
    active = server.runs.active()
    family("wsagent_runs_active", "gauge", "Runs streaming now.")
    out.append(f"wsagent_runs_active {len(active)}")
    family("wsagent_runs_total", "counter", "Finished runs by outcome.")
    for outcome, count in sorted(server.runs.total.items()):
        out.append(f'wsagent_runs_total{{outcome="{_escape(outcome)}"}} {count}')
    family("wsagent_tokens_relayed_total", "counter", "Text deltas relayed from the model.")
    out.append(f"wsagent_tokens_relayed_total {server.runs.tokens + sum(run.streamed for run in active)}")
    family("wsagent_upstream_requests_total", "counter", "Requests to the model server by HTTP status.")
    for status, count in sorted(m.upstream_requests.items()):
        out.append(f'wsagent_upstream_requests_total{{status="{_escape(status)}"}} {count}')
    family("wsagent_upstream_ttft_seconds", "histogram", "Time from request to the model's first event.")
    out.extend(m.upstream_ttft.lines("wsagent_upstream_ttft_seconds"))
    family("wsagent_relay_latency_seconds", "histogram", "Time from a delta's arrival to its frame in the socket.")
    out.extend(m.relay_latency.lines("wsagent_relay_latency_seconds"))
    family("wsagent_cancellations_total", "counter", "Cancelled runs by reason.")
    for reason, count in sorted(server.runs.cancellations.items()):
        out.append(f'wsagent_cancellations_total{{reason="{_escape(reason)}"}} {count}')
    family("wsagent_slow_client_closes_total", "counter", "Clients closed with 4008.")
    out.append(f"wsagent_slow_client_closes_total {server.manager.slow_closes}")
    family("wsagent_bytes_buffered", "gauge", "Bytes produced but not yet written to client sockets.")
    buffered = sum(run.undelivered for run in active) + sum(c.outbox.queued_bytes for c in server.manager)
    out.append(f"wsagent_bytes_buffered {buffered}")
    return "\n".join(out) + "\n"
