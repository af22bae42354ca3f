"""One completion from the model server as a run's producer: the plain model path (no agent, no tools run).

:func:`model_batches` turns what each upstream read brought (:meth:`~wsagent.upstream.model.UpstreamClient.batches`)
into one batch of run events (:mod:`wsagent.core.events`) for :func:`~wsagent.engine.pump.pump`; agents
(:mod:`wsagent.upstream.agents.builtin`) call the model through it too. This is the hot path: per read, one
list of events.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from ..core.chunks import Finish, ModelEvent, Position, TextDelta, ToolCall, Usage
from ..core.events import Checkpoint, Done, Event, Refusal, Thinking, Token, ToolCallEvent, UsageEvent
from .model import Resume, UpstreamClient

__all__ = ["estimate_tokens", "model_batches", "tokens_for"]

#: The run event for each kind of text delta.
_DELTAS: dict[str, type[Token] | type[Thinking] | type[Refusal]] = {
    "content": Token, "reasoning": Thinking, "refusal": Refusal}


def estimate_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """A rough prompt size (4 characters a token) for usage the upstream did not report."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
    return tokens_for(chars, len(messages))


def tokens_for(chars: int, messages: int) -> int:
    """:func:`estimate_tokens` for ``messages`` of ``chars`` characters in all (a chat history keeps its size)."""
    return chars // 4 + 4 * messages


def model_batches(
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
    checkpoints: bool = False,
    resume: Resume | None = None,
) -> AsyncGenerator[list[Event], None]:
    """One completion as batches of events: what each read brought, the last read's ending with ``done``.

    With ``collect``, the answer's text is appended to it too, until it holds
    more than ``collect_chars`` characters: a caller that keeps answers (a chat
    history) keeps no more than that, and an answer that runs for an hour must
    not grow the server's memory with it.

    With ``checkpoints`` (another node may go on with it), each batch ends with a
    :class:`~wsagent.core.events.Checkpoint`; with ``resume``, the completion is
    the rest of an answer another node began (``messages`` are not sent).

    The model client's own generator yields the run's events (:class:`_RunEvents` converts each read's in
    its step): one generator between the model server and the run, not two (each generator a run makes is
    a step per read, and asyncio's hooks add it to a weak set and take it out).
    """
    convert = _RunEvents(agent, workflow, collect, collect_chars)
    if resume is not None:
        return upstream.resume(convert, resume)
    return upstream.batches(convert, messages, model=model, tools=tools, params=params, checkpoints=checkpoints)


class _RunEvents:
    """One completion's reads, as a run's events (:func:`model_batches`)."""

    __slots__ = ("agent", "workflow", "collect", "collect_chars", "collected", "finish_reason")

    def __init__(self, agent: str | None, workflow: str | None, collect: list[str] | None,
                 collect_chars: float) -> None:
        self.agent = agent
        self.workflow = workflow
        self.collect = collect
        self.collect_chars = collect_chars
        self.collected = 0
        self.finish_reason = "stop"

    def __call__(self, read: list[ModelEvent]) -> list[Event]:
        agent, workflow, collect = self.agent, self.workflow, self.collect
        batch: list[Event] = []
        for event in read:
            if isinstance(event, TextDelta):
                if event.choice:
                    continue
                text = event.text
                batch.append(_DELTAS[event.kind](text, agent=agent, workflow=workflow))
                if collect is not None and event.kind == "content" and self.collected <= self.collect_chars:
                    collect.append(text)
                    self.collected += len(text)
            elif isinstance(event, ToolCall):
                if not event.choice:
                    batch.append(ToolCallEvent(event.id, event.name, event.arguments, agent=agent, workflow=workflow))
            elif isinstance(event, Finish):
                if not event.choice:
                    self.finish_reason = event.reason
            elif isinstance(event, Usage):
                batch.append(UsageEvent(event.prompt_tokens, event.completion_tokens, event.total_tokens,
                                        agent=agent, workflow=workflow))
            elif isinstance(event, Position):
                batch.append(Checkpoint(event.state))
            else:  # END: the stream is complete, and ``done`` leaves with the last read's events
                batch.append(Done(self.finish_reason, agent=agent, workflow=workflow))
        return batch
