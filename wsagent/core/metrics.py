"""What the server counts: plain counters and histograms, no I/O.

``/metrics`` renders them (:mod:`wsagent.handlers.status`).

Counters are plain integers bumped where things happen; gauges are read from
the server's state when ``/metrics`` is scraped, so the relay's hot path pays
for nothing but the relay-latency histogram (one observation per written
batch, not per token).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence

__all__ = ["Histogram", "Metrics"]

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


class Metrics:
    """What the server counts as it goes."""

    def __init__(self) -> None:
        self.upstream_requests: Counter[str] = Counter()
        self.upstream_ttft = Histogram(TTFT_BUCKETS)
        self.relay_latency = Histogram(LATENCY_BUCKETS)
        self.runs: Counter[str] = Counter()  # finished runs by outcome
        self.cancellations: Counter[str] = Counter()  # cancelled runs by reason
        self.tokens = 0  # text deltas streamed by finished runs

    def run_finished(self, outcome: str | None, streamed: int, cancel_reason: str | None) -> None:
        self.runs[outcome or "unknown"] += 1
        self.tokens += streamed
        if cancel_reason is not None:
            self.cancellations[cancel_reason] += 1
