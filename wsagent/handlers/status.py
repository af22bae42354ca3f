"""``GET /healthz`` and ``GET /metrics`` (Prometheus text format, without a dependency)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from websockets.http11 import Request, Response

from ..core.metrics import Histogram
from ..engine.run import Phase
from ..transport.http_answers import http_response
from .app import App

__all__ = ["healthz", "metrics", "health", "render"]


def health(app: App) -> dict[str, Any]:
    """The server's state, and the model server's as its recent requests found it (never probed here)."""
    upstream = app.upstream
    now = time.monotonic()
    last_failure = upstream.last_failure
    cluster = app.broker.cluster_status()
    degraded = cluster is not None and cluster["redis"] != "up"
    return {
        "status": "draining" if app.draining else "degraded" if degraded else "ok",
        "connections": len(app.manager),
        "runs_active": len(app.broker.active_runs()),
        "uptime_s": round(now - app.started, 3),
        "worker": os.getpid(),
        "upstream": {
            "url": upstream.url,
            "last_success_s_ago": None if upstream.last_success is None else round(now - upstream.last_success, 3),
            "last_failure": None if last_failure is None else {"code": last_failure[1], "message": last_failure[2],
                                                               "s_ago": round(now - last_failure[0], 3)},
        },
        **({"cluster": cluster} if cluster is not None else {}),
    }


def healthz(app: App, request: Request) -> Response:
    """200 while the server takes new connections (``degraded`` included: a node without Redis serves on
    alone), 503 while it drains: a load balancer's check takes it out of rotation then."""
    return http_response(503 if app.draining else 200, json.dumps(health(app)), "application/json")


async def metrics(app: App, request: Request) -> Response:
    """The whole server's metrics: with ``--workers``, every worker's added up (see :mod:`wsagent.wiring.workers`)."""
    families = snapshot(app)
    if app.peers is not None:
        families = merge([families, *await app.peers.snapshots()])
    return http_response(200, render(families), "text/plain; version=0.0.4; charset=utf-8")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


#: One metric family: its name, type, help text, label name ("" for none), and value by label value.
#: Histograms carry ``{"bounds": [...], "counts": [...], "sum": x, "count": n}`` under the label "".
Family = dict[str, Any]


def snapshot(app: App) -> list[Family]:
    """This process's metrics, as plain data: rendered here, or merged with the other workers'."""
    m = app.metrics
    active = app.broker.active_runs()
    families: list[Family] = []

    def add(name: str, kind: str, text: str, values: Mapping[str, float], label: str = "") -> None:
        families.append({"name": name, "type": kind, "help": text, "label": label, "values": dict(values)})

    def histogram(name: str, text: str, values: Histogram) -> None:
        add(name, "histogram", text, {})
        families[-1]["histogram"] = {"bounds": list(values.bounds), "counts": list(values.counts),
                                     "sum": values.sum, "count": values.count}

    add("wsagent_connections_open", "gauge", "Open WebSocket connections by route.", app.manager.open_by_route(),
        "route")
    add("wsagent_connections_total", "counter", "WebSocket connections accepted by route.",
        app.manager.total_by_route, "route")
    add("wsagent_runs_active", "gauge", "Runs streaming now.", {"": len(active)})
    add("wsagent_runs_waiting", "gauge", "Runs waiting for a person to answer an approval request.",
        {"": sum(1 for run in active if run.phase is Phase.WAITING)})
    add("wsagent_runs_total", "counter", "Finished runs by outcome.", app.metrics.runs, "outcome")
    add("wsagent_tokens_relayed_total", "counter", "Text deltas relayed from the model.",
        {"": app.metrics.tokens + sum(run.streamed for run in active)})
    add("wsagent_upstream_requests_total", "counter", "Requests to the model server by HTTP status.",
        m.upstream_requests, "status")
    histogram("wsagent_upstream_ttft_seconds", "Time from request to the model's first event.", m.upstream_ttft)
    histogram("wsagent_relay_latency_seconds", "Time from a delta's arrival to its frame in the socket.",
              m.relay_latency)
    add("wsagent_cancellations_total", "counter", "Cancelled runs by reason.", app.metrics.cancellations, "reason")
    add("wsagent_replay_kept_bytes", "gauge",
        "What finished runs kept for resume count against --replay-budget-bytes: their logs and their own cost.",
        {"": app.broker.kept_bytes})
    add("wsagent_replay_evictions_total", "counter", "Finished runs forgotten early to stay in the replay budget.",
        {"": app.broker.evictions})
    add("wsagent_slow_client_closes_total", "counter", "Clients closed with 4008.", {"": app.manager.slow_closes})
    cluster = app.broker.cluster_status()
    if cluster is not None:
        add("wsagent_cluster_redis_up", "gauge", "1 while this node reaches the cluster's Redis.",
            {"": 1.0 if cluster["redis"] == "up" else 0.0})
        add("wsagent_cluster_redis_failures_total", "counter", "Times this node lost its link to Redis.",
            {"": cluster["failures"]})
        add("wsagent_cluster_followed_runs", "gauge", "Runs of other nodes watched here.",
            {"": cluster["followed_runs"]})
        add("wsagent_cluster_batches_total", "counter", "Pipelines of run entries written to Redis.",
            {"": cluster["batches"]})
        add("wsagent_cluster_resubscribes_total", "counter",
            "Times Redis cut this node's subscriber off (too far behind) and it subscribed again.",
            {"": cluster["resubscribes"]})
        add("wsagent_cluster_runs_taken_over_total", "counter",
            "Runs of nodes that died that this node went on with (--takeover).", {"": cluster["taken_over"]})
    add("wsagent_bytes_buffered", "gauge", "Bytes produced but not yet written to client sockets.",
        {"": sum(run.undelivered for run in active) + sum(c.outbox.queued_bytes for c in app.manager)})
    return families


def merge(snapshots: list[list[Family]]) -> list[Family]:
    """The whole server's metrics from each worker's: counters and gauges add up, histograms bucket by bucket."""
    merged: dict[str, Family] = {}
    for families in snapshots:
        for family in families:
            mine = merged.get(family["name"])
            if mine is None:
                merged[family["name"]] = {**family, "values": dict(family["values"]),
                                          **({"histogram": dict(family["histogram"])} if "histogram" in family else {})}
                continue
            for key, value in family["values"].items():
                mine["values"][key] = mine["values"].get(key, 0) + value
            if "histogram" in family:
                ours, theirs = mine["histogram"], family["histogram"]
                ours["counts"] = [a + b for a, b in zip(ours["counts"], theirs["counts"], strict=True)]
                ours["sum"] += theirs["sum"]
                ours["count"] += theirs["count"]
    return list(merged.values())


def render(families: list[Family]) -> str:
    """The Prometheus text exposition format."""
    out: list[str] = []
    for family in families:
        name = family["name"]
        out.append(f"# HELP {name} {family['help']}")
        out.append(f"# TYPE {name} {family['type']}")
        if "histogram" in family:
            h = family["histogram"]
            running = 0
            for bound, count in zip(h["bounds"], h["counts"], strict=False):
                running += count
                out.append(f'{name}_bucket{{le="{bound}"}} {running}')
            out.append(f'{name}_bucket{{le="+Inf"}} {h["count"]}')
            out.append(f"{name}_sum {h['sum']}")
            out.append(f"{name}_count {h['count']}")
        elif family["label"]:
            out.extend(f'{name}{{{family["label"]}="{_escape(key)}"}} {value}'
                       for key, value in sorted(family["values"].items()))
        else:
            out.append(f"{name} {family['values'].get('', 0)}")
    return "\n".join(out) + "\n"
