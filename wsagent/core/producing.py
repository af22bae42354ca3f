"""Whether the task producing a run still produces it, for what it does upstream on the run's behalf.

In a cluster with ``--takeover``, a node taken for dead (paused, cut off) may come
back and find its run taken over by another node, which reads the same stored
response upstream. Cancelling that response (a client of the stale node left, or
cancelled) would end the run for everyone. The engine sets, in the producer's own
task, a check of whether this node still produces the run (the cluster's fence,
asked of Redis); the upstream client asks it before it cancels anything. No I/O
here, and none for a run nobody else can take over (no check set: it does).
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable

__all__ = ["guard", "still_producing"]

_check: contextvars.ContextVar[Callable[[], Awaitable[bool]] | None] = contextvars.ContextVar(
    "wsagent_producing", default=None)


def guard(check: Callable[[], Awaitable[bool]] | None) -> None:
    """Set, for the current task (and the tasks it starts), how to ask whether it still produces its run."""
    _check.set(check)


async def still_producing() -> bool:
    """True unless the run's producer was taken over (or that cannot be known: the cluster is out of reach)."""
    check = _check.get()
    return True if check is None else await check()
