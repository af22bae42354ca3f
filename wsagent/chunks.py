"""Interpret OpenAI-compatible ``chat.completion.chunk`` events.

Sans-I/O like :mod:`wsagent.sse`: SSE events in, typed model events out. It
absorbs the differences between real servers (OpenAI, Azure, vLLM, llama.cpp,
Ollama, LiteLLM, OpenRouter, DeepSeek), so nothing after it needs to know which
server it is talking to. ``tests/transcripts/`` holds one recorded shape for
each of them.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .errors import UpstreamError
from .sse import SSEEvent

__all__ = [
    "ChunkInterpreter",
    "TextDelta",
    "ToolCall",
    "Finish",
    "Usage",
    "ModelEvent",
    "End",
    "END",
    "completion_to_events",
    "stream_error",
    "feed_tail",
    "StreamInterpreter",
]

DeltaKind = Literal["content", "reasoning", "refusal"]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of text: the answer (``content``), reasoning, or a refusal."""

    kind: DeltaKind
    text: str
    choice: int = 0


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A whole tool call, emitted once its arguments are complete."""

    id: str
    name: str
    arguments: str
    index: int = 0
    choice: int = 0


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str
    choice: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class End:
    """The stream is complete: :meth:`~wsagent.upstream.UpstreamClient.batches` ends the batch of
    its last read with it, so that whoever relays the answer can send its own end together with
    that read's last deltas (one write to the client, not two)."""


#: The one :class:`End`.
END = End()

ModelEvent = TextDelta | ToolCall | Finish | Usage | End

#: The chunk decoder: orjson's when it is installed (``pip install "wsagent[fast]"``), else the standard
#: library's; both raise a ``ValueError`` for what is not JSON.
loads: Callable[[str], Any] = json.loads
with suppress(ImportError):
    loads = importlib.import_module("orjson").loads


@dataclass(slots=True)
class _PendingCall:
    index: int
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def complete_json(self) -> bool:
        try:
            json.loads("".join(self.arguments) or "null")
        except ValueError:
            return False
        return True


class StreamInterpreter(Protocol):
    """What the transport needs of a dialect's interpreter (chat completions or Responses)."""

    done: bool
    finish_reason: str | None

    def feed(self, sse: SSEEvent) -> list[ModelEvent]: ...

    def end(self, tail: list[SSEEvent] | None = None) -> list[ModelEvent]: ...


def feed_tail(interpreter: StreamInterpreter, tail: list[SSEEvent] | None) -> list[ModelEvent]:
    """Feed what the decoder held when the body ended. An event cut in half is ``upstream_truncated``
    before the model finished, and ignored after it (a finish reason was all that mattered)."""
    out: list[ModelEvent] = []
    for sse in tail or ():
        if interpreter.done:
            break
        try:
            out.extend(interpreter.feed(sse))
        except UpstreamError as exc:
            if exc.code != "upstream_protocol":
                raise
            if interpreter.finish_reason is None:
                raise UpstreamError("upstream closed the stream in the middle of an event",
                                    code="upstream_truncated", retryable=True) from None
    return out


def stream_error(obj: Any, default: str) -> UpstreamError:
    """Build a typed error from an upstream error object (a dict or a string)."""
    if isinstance(obj, dict):
        message = str(obj.get("message") or obj.get("error") or default)
        code = obj.get("code")
        if code is None:
            code = obj.get("type")
        if not isinstance(code, (str, int)):
            code = None
        return UpstreamError(message, code="upstream_stream_error", retryable=True, upstream_code=code)
    if isinstance(obj, str) and obj:
        return UpstreamError(obj, code="upstream_stream_error", retryable=True)
    return UpstreamError(default, code="upstream_stream_error", retryable=True)


class ChunkInterpreter:
    """Turn the SSE events of one streamed completion into :data:`ModelEvent` s."""

    def __init__(self) -> None:
        self._calls: dict[int, list[_PendingCall]] = {}
        self._current: dict[tuple[int, int], _PendingCall] = {}
        self.finish_reason: str | None = None
        self.done = False
        self.usage_seen = False

    def feed(self, sse: SSEEvent) -> list[ModelEvent]:
        """Interpret one SSE event. Raises :class:`UpstreamError` for an error in the stream."""
        if self.done:
            return []
        data = sse.data
        if sse.event == "error":
            try:
                payload: Any = json.loads(data)
            except ValueError:
                payload = data
            if isinstance(payload, dict) and "error" in payload:
                payload = payload["error"]
            raise stream_error(payload, "upstream sent an error event")
        if data == "[DONE]":
            self.done = True
            return self._flush_all()
        try:
            chunk = loads(data)
        except (ValueError, RecursionError):
            raise UpstreamError(
                f"upstream sent data that is not JSON: {data[:200]!r}",
                code="upstream_protocol",
                retryable=True,
            ) from None
        if not isinstance(chunk, dict):
            raise UpstreamError("upstream sent a chunk that is not a JSON object", code="upstream_protocol",
                                retryable=True)
        return self._chunk(chunk)

    def end(self, tail: list[SSEEvent] | None = None) -> list[ModelEvent]:
        """The body ended. ``tail`` is what :meth:`SSEDecoder.close` returned.

        A stream is complete after ``[DONE]``, or after a finish reason without
        ``[DONE]``; anything else raises ``upstream_truncated``.
        """
        out = feed_tail(self, tail)
        if self.done:
            return out
        if self.finish_reason is None:
            raise UpstreamError(
                "upstream closed the stream before the model finished",
                code="upstream_truncated",
                retryable=True,
            )
        self.done = True
        out.extend(self._flush_all())
        return out

    def _chunk(self, chunk: dict[str, Any]) -> list[ModelEvent]:
        error = chunk.get("error")
        choices = chunk.get("choices")
        if error is not None and not choices:
            raise stream_error(error, "upstream reported an error")
        out: list[ModelEvent] = []
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._choice(choice, chunk, out)
        usage = chunk.get("usage")
        if isinstance(usage, dict) and not self.usage_seen:
            self.usage_seen = True
            prompt = _int(usage.get("prompt_tokens"))
            completion = _int(usage.get("completion_tokens"))
            total = _int(usage.get("total_tokens")) or prompt + completion
            out.append(Usage(prompt, completion, total))
        return out

    def _choice(self, choice: dict[str, Any], chunk: dict[str, Any], out: list[ModelEvent]) -> None:
        index = choice.get("index", 0)
        if not isinstance(index, int):
            index = 0
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            message = choice.get("message")
            delta = message if isinstance(message, dict) else {}
        reasoning = delta.get("reasoning_content")
        if reasoning is None:
            reasoning = delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            out.append(TextDelta("reasoning", reasoning, index))
        content = delta.get("content")
        if isinstance(content, str) and content:
            out.append(TextDelta("content", content, index))
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            out.append(TextDelta("refusal", refusal, index))
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list):
            for position, call in enumerate(tool_calls):
                if isinstance(call, dict):
                    self._tool_delta(index, position, call)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            if reason == "error":
                raise stream_error(chunk.get("error") or choice.get("error"), "upstream finished with an error")
            if index == 0:
                self.finish_reason = reason
            out.extend(self._flush(index))
            out.append(Finish(reason, index))

    def _tool_delta(self, choice: int, position: int, call: dict[str, Any]) -> None:
        calls = self._calls.setdefault(choice, [])
        function = call.get("function")
        fn: dict[str, Any] = function if isinstance(function, dict) else {}
        call_id = call.get("id") if isinstance(call.get("id"), str) else ""
        name = fn.get("name") if isinstance(fn.get("name"), str) else ""
        args = fn.get("arguments")
        if isinstance(args, (dict, list)):
            args = json.dumps(args)
        elif not isinstance(args, str):
            args = ""
        index = call.get("index")
        if not isinstance(index, int):
            pending = next((c for c in reversed(calls) if call_id and c.id == call_id), None)
            if pending is None and not call_id and calls:
                pending = calls[-1]
            index = pending.index if pending is not None else position
        else:
            pending = self._current.get((choice, index))
            if pending is not None and (
                (call_id and pending.id and call_id != pending.id)
                or (name and pending.name and not call_id and pending.complete_json() and args)
            ):
                pending = None
        if pending is None:
            pending = _PendingCall(index)
            calls.append(pending)
        self._current[(choice, index)] = pending
        if call_id and not pending.id:
            pending.id = call_id
        if name and not pending.name:
            pending.name = name
        if args:
            pending.arguments.append(args)

    def _flush(self, choice: int) -> list[ModelEvent]:
        calls = self._calls.pop(choice, [])
        for key in [k for k in self._current if k[0] == choice]:
            del self._current[key]
        return [
            ToolCall(c.id or f"call_{choice}_{n}", c.name, "".join(c.arguments), c.index, choice)
            for n, c in enumerate(calls)
        ]

    def _flush_all(self) -> list[ModelEvent]:
        out: list[ModelEvent] = []
        for choice in sorted(self._calls):
            out.extend(self._flush(choice))
        return out


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def completion_to_events(body: dict[str, Any]) -> list[ModelEvent]:
    """Events for a non-streamed ``chat.completion`` (a server that ignored ``stream``)."""
    interpreter = ChunkInterpreter()
    out = interpreter._chunk(body)
    out.extend(interpreter._flush_all())
    return out
