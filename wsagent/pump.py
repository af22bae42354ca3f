"""Producers into runs: every stream wsagent makes, model, agent, workflow or anything else, goes through :func:`pump`.

A producer is an async iterator of *batches*: the events that arrived
together (one upstream read). :func:`pump` pushes a batch into the run, wakes
the watchers once, and waits for room when the run's own client is behind, so
merging and backpressure are the same for every producer. It ends the run
with exactly one terminal event, whatever happens: the producer's own, ``done``
when it just stops, the interruption (a cancel, a budget) when it was stopped,
``error`` when it fails.

:func:`model_batches` is the producer for a plain completion. This is the hot
path: per upstream read, one list of events, no logging, no encoding, no task.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import Any

from .agent import estimate_tokens
from .chunks import Finish, TextDelta, ToolCall
from .errors import UpstreamError
from .events import Done, ErrorEvent, Event, Producer, Refusal, Thinking, Token, ToolCallEvent, UsageEvent
from .run import Run
from .upstream import UpstreamClient

__all__ = ["Producer", "pump", "model_batches", "stream_model"]

log = logging.getLogger("wsagent.pump")

_DELTAS: dict[str, type[Token] | type[Thinking] | type[Refusal]] = {
    "content": Token, "reasoning": Thinking, "refusal": Refusal}


async def pump(run: Run, make: Callable[[], Producer], after: Run | None = None) -> None:
    """Push the batches of ``make()`` into ``run`` and end it with exactly one terminal event.

    With ``after``, the producer is made once that run has ended: a client's prompts are answered in
    order, and each is asked with what the previous answers left (a chat history).
    """
    try:
        if after is not None:
            await after.wait()
        async with aclosing(make()) as stream:
            async for batch in stream:
                for event in batch:
                    if event.terminal:
                        run.end(event)
                        return
                    run.push(event)
                    if run.full:
                        run.wake()
                        await run.room()
                run.wake()
        run.end(Done("stop", agent=run.agent, workflow=run.workflow))
    except asyncio.CancelledError:
        run.end(run.interruption())
    except UpstreamError as exc:
        run.end(ErrorEvent(exc.code, exc.message, exc.retryable, agent=run.agent, workflow=run.workflow))
    except Exception:
        log.exception("run %s failed", run.id)
        run.end(ErrorEvent("internal_error", "internal error (see server log)", False,
                           agent=run.agent, workflow=run.workflow))


async def model_batches(
    upstream: UpstreamClient,
    messages: Sequence[dict[str, Any]],
    *,
    model: str | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    params: dict[str, Any] | None = None,
    agent: str | None = None,
    workflow: str | None = None,
    collect: list[str] | None = None,
    collect_chars: float = math.inf,
) -> AsyncGenerator[list[Event], None]:
    """One completion as batches of events: what each read brought, then ``done``.

    With ``collect``, the answer's text is appended to it too, until it holds
    more than ``collect_chars`` characters: a caller that keeps answers (a chat
    history) keeps no more than that, and an answer that runs for an hour must
    not grow the server's memory with it.
    """
    collected = 0
    finish_reason = "stop"
    async with aclosing(upstream.batches(messages, model=model, tools=tools, params=params)) as reads:
        async for read in reads:
            batch: list[Event] = []
            for event in read:
                if isinstance(event, TextDelta):
                    if event.choice:
                        continue
                    text = event.text
                    batch.append(_DELTAS[event.kind](text, agent=agent, workflow=workflow))
                    if collect is not None and event.kind == "content" and collected <= collect_chars:
                        collect.append(text)
                        collected += len(text)
                elif isinstance(event, ToolCall):
                    if not event.choice:
                        batch.append(ToolCallEvent(event.id, event.name, event.arguments, agent=agent,
                                                   workflow=workflow))
                elif isinstance(event, Finish):
                    if not event.choice:
                        finish_reason = event.reason
                else:
                    batch.append(UsageEvent(event.prompt_tokens, event.completion_tokens, event.total_tokens,
                                            agent=agent, workflow=workflow))
            yield batch
    yield [Done(finish_reason, agent=agent, workflow=workflow)]


async def stream_model(run: Run, upstream: UpstreamClient, messages: Sequence[dict[str, Any]], *,
                       model: str | None = None, tools: Sequence[dict[str, Any]] | None = None,
                       params: dict[str, Any] | None = None, collect: list[str] | None = None,
                       collect_chars: float = math.inf) -> None:
    """Relay one completion into ``run`` (see :func:`model_batches`) and end it."""
    run.prompt_estimate = estimate_tokens(messages)
    await pump(run, lambda: model_batches(upstream, messages, model=model, tools=tools, params=params,
                                          agent=run.agent, workflow=run.workflow, collect=collect,
                                          collect_chars=collect_chars))
