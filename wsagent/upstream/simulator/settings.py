"""How the simulated model behaves unless a request's switches say otherwise."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SimulatorSettings"]


@dataclass
class SimulatorSettings:
    rate: float = 50.0
    tokens: int = 24
    reasoning: bool = True
    model: str = "wsagent-sim"
    switches: bool = False  # honour ``sim`` switches (tests, benchmarks); off, a prompt is only a prompt
    background_kept: int = 1000  # background responses kept in memory, at most; the oldest finished go first
