"""Interpret OpenAI-compatible ``chat.completion.chunk`` events.

Sans-I/O like :mod:`wsagent.core.sse`: SSE events in, typed model events out. It
absorbs the differences between real servers (OpenAI, Azure, vLLM, llama.cpp,
Ollama, LiteLLM, OpenRouter, DeepSeek), so nothing after it needs to know which
server it is talking to. ``tests/transcripts/`` holds one recorded shape for
each of them.
"""

from __future__ import annotations

import importlib
import io
import json
import re
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .errors import UpstreamError
from .events import well_formed
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
    "Position",
    "completion_to_events",
    "stream_error",
    "feed_tail",
    "StreamInterpreter",
    "ToolCallBounds",
    "Arguments",
    "mend",
    "unmended",
    "MAX_TOOL_CALLS",
    "MAX_TOOL_ARGUMENTS",
    "MAX_ANSWER_ARGUMENTS",
]

DeltaKind = Literal["content", "reasoning", "refusal"]


# The events made for every read (text deltas, a finish, usage) are not frozen: a frozen dataclass sets each field
# with object.__setattr__, a call a field (0.6 µs an event here, 3 % of a one-token run's start with SSEEvent and
# Head). Nothing changes them after they are made.
@dataclass(slots=True)
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


@dataclass(slots=True)
class Finish:
    reason: str
    choice: int = 0


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class End:
    """The stream is complete: :meth:`~wsagent.upstream.model.UpstreamClient.batches` ends the batch of
    its last read with it, so that whoever relays the answer can send its own end together with
    that read's last deltas (one write to the client, not two)."""


#: The one :class:`End`.
END = End()


@dataclass(frozen=True, slots=True)
class Position:
    """Where another process could go on with an answer, after the events of the read it ends and those
    before (``state``, for :meth:`~wsagent.upstream.model.UpstreamClient.resume`): a background response
    and its last event read, or a chat completion that the model server can continue."""

    state: str


ModelEvent = TextDelta | ToolCall | Finish | Usage | End | Position

#: The chunk decoder: orjson's when it is installed (``pip install ".[fast]"``), else the standard
#: library's; both raise a ``ValueError`` for what is not JSON.
loads: Callable[[str], Any] = json.loads
with suppress(ImportError):
    loads = importlib.import_module("orjson").loads


def _decode(data: str) -> Any:
    """``data`` as JSON, or an ``upstream_protocol`` error. What orjson refuses is tried again with the standard
    library, which reads ``"\\ud83d"`` (half of an emoji, as relays that write UTF-16 cut it): both decoders give
    the same events, and :func:`~wsagent.core.events.well_formed` deals with the halves. Only a failure pays for the
    second try."""
    try:
        return loads(data)
    except (ValueError, RecursionError):
        pass
    if loads is not json.loads:
        with suppress(ValueError, RecursionError):
            return json.loads(data)
    raise UpstreamError(f"upstream sent data that is not JSON: {data[:200]!r}", code="upstream_protocol",
                        retryable=True) from None


# -- text that is not valid Unicode ---------------------------------------------------------------------------
#
# JSON may escape a lone UTF-16 surrogate (``"\ud800"``), and relays that write UTF-16 cut an emoji into its two
# halves, one per chunk. A Python string holding one cannot be encoded as UTF-8: it broke the client's socket (the
# frame could not be written, and the client waited for ever) or, with orjson, the chunk. The interpreters (this
# module's and :mod:`wsagent.response_events`) are the one place upstream text is made valid, so no lone surrogate
# reaches a socket, a log or Redis: a high half at the end of a delta waits for the next delta of the same kind,
# a pair is joined, and what is left alone becomes U+FFFD, as a UTF-16 decoder would make it. The test on the hot
# path is ``text.isascii()``: about 15 ns a delta; one that is not ASCII pays about 80 ns more (a call, an ``encode``).

#: Halves held at once: a few choices times three kinds of text. Past it a half is replaced at once, so that a
#: stream of ever new choice numbers cannot grow the dictionary.
_MAX_HELD = 64


def mend(held: dict[tuple[int, DeltaKind], str], kind: DeltaKind, choice: int, text: str) -> str:
    """A text delta made valid; a high surrogate at its end is kept in ``held`` for the next delta of the same kind
    and choice. The caller skips this when ``held`` is empty and ``text.isascii()``: nothing to do then."""
    if held:
        half = held.pop((choice, kind), "")
        if half:
            text = half + text
    try:
        text.encode()  # UTF-8; without the argument, a faster path
    except UnicodeEncodeError:
        if "\ud800" <= text[-1] <= "\udbff" and len(held) < _MAX_HELD:
            held[(choice, kind)] = text[-1]
            text = text[:-1]
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def unmended(held: dict[tuple[int, DeltaKind], str], choice: int | None = None) -> list[ModelEvent]:
    """The halves still held (of ``choice``, or all) as U+FFFD: their text is over, no other half is coming."""
    out: list[ModelEvent] = []
    for key in [k for k in held if choice is None or k[0] == choice]:
        del held[key]
        out.append(TextDelta(key[1], "\ufffd", key[0]))
    return out


# -- tool calls -----------------------------------------------------------------------------------------------

#: Tool calls in one answer (all its choices together). The OpenAI API takes at most 128 tools in a request, and
#: models call a few at a time: a server that streams more is broken or hostile.
MAX_TOOL_CALLS = 128
#: Characters of one tool call's arguments: about 250,000 tokens, twice the longest answer any model writes today
#: (128k output tokens), so no legitimate call reaches it.
MAX_TOOL_ARGUMENTS = 1024 * 1024
#: Characters of all the tool-call arguments of one answer together: what a whole (not streamed) answer may hold,
#: the largest event (:data:`~wsagent.core.sse.DEFAULT_MAX_EVENT_SIZE`). Without it, 128 calls could hold 128 MiB.
MAX_ANSWER_ARGUMENTS = 4 * 1024 * 1024


class ToolCallBounds:
    """What the tool calls of one answer may hold, counted as their deltas come in.

    Arguments stream in deltas that reach no client until the call is whole, so the run's own
    bounds cannot see them: ``--run-max-tokens`` counts the deltas a client is sent, and
    ``--run-buffer-bytes`` what a client has not taken yet. Counting arguments still streaming
    against the buffer would stall any call larger than it for ever (the client cannot take half a
    call); against the token budget, it would need the run to see them (``wsagent/run.py``). A whole
    call counts against the buffer as any event does, by its frame's size, and ``--run-max-seconds``
    bounds the time. Until then these bounds hold, and breaking one ends the answer with
    ``upstream_protocol``: 8 s of argument deltas once took the server from 54 MiB to 2.5 GiB.
    """

    __slots__ = ("calls", "chars")

    def __init__(self) -> None:
        self.calls = 0
        self.chars = 0

    def call(self) -> None:
        """One more call begins."""
        self.calls += 1
        if self.calls > MAX_TOOL_CALLS:
            raise UpstreamError(f"upstream sent over {MAX_TOOL_CALLS} tool calls in one answer",
                                code="upstream_protocol", retryable=False)

    def grow(self, arguments: int, added: int) -> None:
        """``added`` characters more for a call that holds ``arguments``."""
        self.chars += added
        if arguments + added > MAX_TOOL_ARGUMENTS:
            raise UpstreamError(f"upstream sent tool call arguments over {MAX_TOOL_ARGUMENTS} characters",
                                code="upstream_protocol", retryable=False)
        if self.chars > MAX_ANSWER_ARGUMENTS:
            raise UpstreamError(f"upstream sent tool call arguments over {MAX_ANSWER_ARGUMENTS} characters in one "
                                "answer", code="upstream_protocol", retryable=False)


_STRUCTURE = re.compile(r'["{}\[\]]')
_STRING_END = re.compile(r'["\\]')
_NOT_SPACE = re.compile(r"[^ \t\n\r]")
_SPACE = re.compile(r"[ \t\n\r]")
# What Arguments has seen: nothing but whitespace, a container or string not closed yet, a bare value (a number,
# true, ...) not followed by whitespace yet, a value and whitespace after it, or anything else (never one value).
_EMPTY, _OPEN, _BARE, _ENDED, _NOT_ONE = range(5)
#: A bare value longer than this is not taken for one (tool arguments are objects; see ``Arguments.whole``).
_MAX_BARE = 64


class Arguments:
    """One tool call's arguments as they stream in, in time linear in their length.

    Appending a delta costs what the delta is long: the text goes to a :class:`io.StringIO` (a list
    of the deltas cost 60 bytes for a delta of one character). :meth:`whole` (is the text so far one
    JSON value?) scans each character once, the first time it is asked and from then on as deltas
    come, and parses the text at most once, when its brackets close: a stream that repeated the name
    in every delta had everything so far joined and parsed again for each (100k deltas: 56 s).
    """

    __slots__ = ("_text", "size", "_scanning", "_state", "_depth", "_string", "_escape", "_bare", "_parsed")

    def __init__(self) -> None:
        self._text = io.StringIO()
        self.size = 0
        self._scanning = False
        self._state = _EMPTY
        self._depth = 0
        self._string = False
        self._escape = False
        self._bare = ""
        self._parsed: bool | None = None

    def append(self, piece: str) -> None:
        self._text.write(piece)
        self.size += len(piece)
        if self._scanning:
            self._scan(piece)

    @property
    def text(self) -> str:
        return self._text.getvalue()

    def whole(self) -> bool:
        """Whether the arguments so far are one JSON value (as ``json.loads(text or "null")`` says, except that a
        bare number or literal over 64 characters is not taken for one)."""
        if not self._scanning:
            self._scanning = True
            self._scan(self._text.getvalue())
        state = self._state
        if state == _EMPTY:
            return self.size == 0
        if state == _OPEN or state == _NOT_ONE:
            return False
        if self._bare:
            return _parses(self._bare)
        if self._parsed is None:  # once: only whitespace may come after, which changes nothing
            self._parsed = _parses(self._text.getvalue())
        return self._parsed

    def _scan(self, piece: str) -> None:
        pos, end = 0, len(piece)
        while pos < end:
            state = self._state
            if state == _NOT_ONE:
                return
            if self._string:
                if self._escape:
                    self._escape = False
                    pos += 1
                    continue
                found = _STRING_END.search(piece, pos)
                if found is None:
                    return
                pos = found.end()
                if found.group() == "\\":
                    self._escape = True
                else:
                    self._string = False
                    if self._depth == 0:
                        self._state = _ENDED
            elif state == _OPEN:
                found = _STRUCTURE.search(piece, pos)
                if found is None:
                    return
                pos = found.end()
                char = found.group()
                if char == '"':
                    self._string = True
                elif char in "{[":
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        self._state = _ENDED
            elif state == _BARE:
                found = _SPACE.search(piece, pos)
                stop = end if found is None else found.start()
                self._bare += piece[pos:stop]
                pos = stop
                if len(self._bare) > _MAX_BARE:
                    self._state = _NOT_ONE
                elif found is not None:
                    self._state = _ENDED
            else:  # _EMPTY or _ENDED
                found = _NOT_SPACE.search(piece, pos)
                if found is None:
                    return
                if state == _ENDED:
                    self._state = _NOT_ONE
                    return
                char = found.group()
                pos = found.end()
                if char in "{[":
                    self._depth = 1
                    self._state = _OPEN
                elif char == '"':
                    self._string = True
                    self._state = _OPEN
                else:
                    self._bare = char
                    self._state = _BARE


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


@dataclass(slots=True)
class _PendingCall:
    index: int
    id: str = ""
    name: str = ""
    arguments: Arguments = field(default_factory=Arguments)


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


#: Characters of an upstream error's message that reach a client (the HTTP errors' bound too).
ERROR_TEXT = 500


def stream_error(obj: Any, default: str) -> UpstreamError:
    """Build a typed error from an upstream error object (a dict or a string)."""
    if isinstance(obj, dict):
        text = obj.get("message") or obj.get("error") or default
        try:  # (a message that is JSON nested a thousand deep is no message: str() of it recurses too far)
            message = well_formed(text if isinstance(text, str) else str(text))[:ERROR_TEXT]
        except RecursionError:
            message = default
        code = obj.get("code")
        if code is None:
            code = obj.get("type")
        if isinstance(code, str):
            code = well_formed(code)
        elif not isinstance(code, int):
            code = None
        return UpstreamError(message, code="upstream_stream_error", retryable=True, upstream_code=code)
    if isinstance(obj, str) and obj:
        return UpstreamError(well_formed(obj[:ERROR_TEXT]), code="upstream_stream_error", retryable=True)
    return UpstreamError(default, code="upstream_stream_error", retryable=True)


class ChunkInterpreter:
    """Turn the SSE events of one streamed completion into :data:`ModelEvent` s."""

    def __init__(self) -> None:
        self._calls: dict[int, list[_PendingCall]] = {}
        self._current: dict[tuple[int, int], _PendingCall] = {}
        self._bounds = ToolCallBounds()
        self._held: dict[tuple[int, DeltaKind], str] = {}  # surrogate halves waiting for the next delta (mend)
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
            except (ValueError, RecursionError):
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
            chunk = _decode(data)
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
        held = self._held
        texts: tuple[tuple[DeltaKind, Any], ...]
        if delta.keys() <= _PLAIN:  # the answer's text alone (most deltas): no reasoning, refusal or tool call
            texts = (("content", delta.get("content")),)
            tool_calls = None
        else:
            reasoning = delta.get("reasoning_content")
            texts = (("reasoning", delta.get("reasoning") if reasoning is None else reasoning),
                     ("content", delta.get("content")), ("refusal", delta.get("refusal")))
            tool_calls = delta.get("tool_calls")
        for kind, text in texts:
            if isinstance(text, str) and text:
                if held or not text.isascii():
                    text = mend(held, kind, index, text)
                if text:
                    out.append(TextDelta(kind, text, index))
        if isinstance(tool_calls, list):
            for position, call in enumerate(tool_calls):
                if isinstance(call, dict):
                    self._tool_delta(index, position, call)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            if reason == "error":
                raise stream_error(chunk.get("error") or choice.get("error"), "upstream finished with an error")
            reason = well_formed(reason)
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
            try:
                args = json.dumps(args)
            except RecursionError:  # orjson reads 1024 deep, the standard library writes fewer
                raise UpstreamError("upstream sent tool call arguments nested too deeply", code="upstream_protocol",
                                    retryable=False) from None
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
                or (name and pending.name and not call_id and args and pending.arguments.whole())
            ):
                pending = None
        if pending is None:
            self._bounds.call()
            pending = _PendingCall(index)
            calls.append(pending)
        self._current[(choice, index)] = pending
        if call_id and not pending.id:
            pending.id = call_id
        if name and not pending.name:
            pending.name = name
        if args:
            self._bounds.grow(pending.arguments.size, len(args))
            pending.arguments.append(args)

    def _flush(self, choice: int) -> list[ModelEvent]:
        """The choice's text is over: its held surrogate halves, then its tool calls."""
        out = unmended(self._held, choice) if self._held else []
        calls = self._calls.pop(choice, [])
        for key in [k for k in self._current if k[0] == choice]:
            del self._current[key]
        out += [
            ToolCall(well_formed(c.id) or f"call_{choice}_{n}", well_formed(c.name), well_formed(c.arguments.text),
                     c.index, choice)
            for n, c in enumerate(calls)
        ]
        return out

    def _flush_all(self) -> list[ModelEvent]:
        out: list[ModelEvent] = unmended(self._held) if self._held else []
        for choice in sorted(self._calls):
            out.extend(self._flush(choice))
        return out


#: The keys of a delta that carries nothing but the answer's text (most of them).
_PLAIN = frozenset(("role", "content"))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def completion_to_events(body: dict[str, Any]) -> list[ModelEvent]:
    """Events for a non-streamed ``chat.completion`` (a server that ignored ``stream``)."""
    interpreter = ChunkInterpreter()
    out = interpreter._chunk(body)
    out.extend(interpreter._flush_all())
    return out
