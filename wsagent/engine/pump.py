"""Producers into runs: every stream wsagent makes, model, agent, workflow or anything else, goes through :func:`pump`.

A producer is an async iterator of *batches*: the events that arrived
together (one upstream read). :func:`pump` pushes a batch into the run, wakes
the watchers once, and waits for room when the run's own client is behind, so
merging and backpressure are the same for every producer. It ends the run
with exactly one terminal event, whatever happens: the producer's own, ``done``
when it just stops, the interruption (a cancel, a budget) when it was stopped,
``error`` when it fails.

:func:`~wsagent.upstream.completion.model_batches` is the producer for a plain
completion. This is the hot path: per upstream read, one list of events, no
logging, no encoding, no task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..core.errors import WsAgentError
from ..core.events import Done, ErrorEvent, Producer
from ..core.producing import guard
from .run import Run

__all__ = ["Producer", "pump"]

log = logging.getLogger("wsagent.pump")


async def pump(run: Run, make: Callable[[], Producer], after: Run | None = None) -> None:
    """Push the batches of ``make()`` into ``run`` and end it with exactly one terminal event.

    With ``after``, the producer is made once that run has ended: a client's prompts are answered in
    order, and each is asked with what the previous answers left (a chat history).
    """
    guard(run.still_owned)  # (in this task: what it starts upstream asks before it cancels anything)
    try:
        if after is not None:
            await after.wait()
        stream = make()
        try:  # (aclosing's, without its two coroutines a run)
            async for batch in stream:
                for event in batch:
                    if event.terminal:
                        run.end(event)
                        return
                    run.push(event)
                    if run.full and not run.resumable:
                        run.wake()
                        await run.room()
                run.wake()
                if run.full:  # (a resumable run: a batch goes out whole, with its checkpoint)
                    await run.room()
        finally:
            await stream.aclose()
        run.end(Done("stop", agent=run.agent, workflow=run.workflow))
    except asyncio.CancelledError:
        run.end(run.interruption())
    except WsAgentError as exc:  # an upstream's failure, a registered agent's
        run.end(ErrorEvent(exc.code, exc.message, exc.retryable, agent=run.agent, workflow=run.workflow))
    except Exception:
        log.exception("run %s failed", run.id)
        if not run.finished:  # (a failure after its end: the run has its terminal event already)
            run.end(ErrorEvent("internal_error", "internal error (see server log)", False,
                               agent=run.agent, workflow=run.workflow))
    finally:
        run.producer_over()

