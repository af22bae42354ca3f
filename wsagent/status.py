"""``GET /healthz`` and ``GET /metrics`` (Prometheus text format, without a dependency)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from websockets.http11 import Request, Response

from .app import App
from .metrics import Histogram
from .responses import http_response

__all__ = ["healthz", "metrics", "health", "render"]


def health(app: App) -> dict[str, Any]:
    return {
        "status": "draining" if app.draining else "ok",
        "connections": len(app.manager),
        "runs_active": len(app.broker.active_runs()),
        "uptime_s": round(time.monotonic() - app.started, 3),
        "worker": os.getpid(),
    }


def healthz(app: App, request: Request) -> Response:
    return http_response(200, json.dumps(health(app)), "application/json")


def metrics(app: App, request: Request) -> Response:
    return http_response(200, render(app), "text/plain; version=0.0.4; charset=utf-8")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(app: App) -> str:
    m = app.metrics
    active = app.broker.active_runs()
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
             app.manager.open_by_route())
    labelled("wsagent_connections_total", "counter", "WebSocket connections accepted by route.", "route",
             app.manager.total_by_route)
    single("wsagent_runs_active", "gauge", "Runs streaming now.", len(active))
    labelled("wsagent_runs_total", "counter", "Finished runs by outcome.", "outcome", app.broker.total)
    single("wsagent_tokens_relayed_total", "counter", "Text deltas relayed from the model.",
           app.broker.tokens + sum(run.streamed for run in active))
    labelled("wsagent_upstream_requests_total", "counter", "Requests to the model server by HTTP status.", "status",
             m.upstream_requests)
    histogram("wsagent_upstream_ttft_seconds", "Time from request to the model's first event.", m.upstream_ttft)
    histogram("wsagent_relay_latency_seconds", "Time from a delta's arrival to its frame in the socket.",
              m.relay_latency)
    labelled("wsagent_cancellations_total", "counter", "Cancelled runs by reason.", "reason",
             app.broker.cancellations)
    single("wsagent_replay_kept_bytes", "gauge", "Bytes in the logs of finished runs kept for resume.",
           app.broker.kept_bytes)
    single("wsagent_replay_evictions_total", "counter", "Finished runs forgotten early to stay in the replay budget.",
           app.broker.evictions)
    single("wsagent_slow_client_closes_total", "counter", "Clients closed with 4008.", app.manager.slow_closes)
    single("wsagent_bytes_buffered", "gauge", "Bytes produced but not yet written to client sockets.",
           sum(run.undelivered for run in active) + sum(c.outbox.queued_bytes for c in app.manager))
    return "\n".join(out) + "\n"
