"""What the simulator saw, for tests and benchmarks: :class:`SimStats`, and a :class:`BackgroundStat` for each
kept background response."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BackgroundStat", "SimStats", "Streamed"]


@dataclass
class BackgroundStat:
    """One background response (``SimStats.background[id]``, and ``GET /stats``), for as long as it is kept."""

    status: str = "queued"
    #: events generated: each sequence number is generated once, so the last one is ``events - 1``
    events: int = 0
    #: tokens generated (reasoning and text), once, whoever streams them and however often
    tokens: int = 0
    #: the ``starting_after`` of each ``GET /v1/responses/{id}?stream=true``, in order (-1 when not given; the
    #: latest 1000)
    retrievals: list[int] = field(default_factory=list)
    #: ``GET /v1/responses/{id}`` without ``stream``
    polls: int = 0
    #: cancelled by ``POST /v1/responses/{id}/cancel`` (a cancel of a response already over does not count)
    cancelled: bool = False


@dataclass
class Streamed:
    """What :meth:`SimStats.streaming`'s block says of its answer: ``finished`` once it was written whole."""

    finished: bool = False


@dataclass
class SimStats:
    """What the simulated upstream saw; tests and benchmarks read it.

    ``streams``, ``active``, ``completed`` and ``disconnected`` count streamed HTTP answers (a background
    response's streams included: the one that created it, and each retrieval); ``tokens_sent`` counts the
    tokens of streamed answers, a background response's once, as they are generated."""

    requests: int = 0
    streams: int = 0
    active: int = 0
    completed: int = 0
    disconnected: int = 0
    tokens_sent: int = 0
    disconnect_times: list[float] = field(default_factory=list)
    last_body: dict[str, Any] | None = None
    tags: dict[str, dict[str, float]] = field(default_factory=dict)
    background: dict[str, BackgroundStat] = field(default_factory=dict)
    #: the partial answer each ``continue_final_message`` request asked to continue (the latest 100)
    continued: list[str] = field(default_factory=list)
    changed: asyncio.Condition | None = None

    @contextlib.contextmanager
    def streaming(self, tag: dict[str, float] | None) -> Iterator[Streamed]:
        """Count one streamed answer while the block writes it: ``streams`` and ``active`` (and the tag's
        ``streams``) now; at its end ``completed`` if the block said ``finished``, a disconnect if the client
        went (a ``ConnectionError`` ends the block quietly: the caller returns what it has)."""
        self.streams += 1
        self.active += 1
        if tag is not None:
            tag["streams"] += 1
        self._notify()
        streamed = Streamed()
        try:
            yield streamed
        except asyncio.CancelledError:
            self.disconnect(tag)
            raise
        except ConnectionError:
            self.disconnect(tag)
        finally:
            self.active -= 1
            if streamed.finished:
                self.completed += 1
            self._notify()

    def disconnect(self, tag: dict[str, float] | None) -> None:
        now = time.monotonic()
        self.disconnected += 1
        self.disconnect_times.append(now)
        if tag is not None:
            tag["disconnected"] = now

    def _notify(self) -> None:
        cond = self.changed
        if cond is not None:
            asyncio.get_running_loop().create_task(_notify_all(cond))

    async def wait_for(self, predicate: Callable[[SimStats], object], limit: float = 10.0) -> None:
        """Wait until ``predicate(stats)`` holds (event driven, not polled); at most ``limit`` seconds."""
        if self.changed is None:
            self.changed = asyncio.Condition()
        async with asyncio.timeout(limit):
            async with self.changed:
                await self.changed.wait_for(lambda: predicate(self))


async def _notify_all(cond: asyncio.Condition) -> None:
    async with cond:
        cond.notify_all()
