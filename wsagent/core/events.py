"""What the server sends: small event types, and their one wire encoding.

Handlers never build JSON by hand; they construct an event and the run
encodes it once, here. A run's events carry the run ``id`` and a per-run
``seq`` (1, 2, 3, ...), given when the event is sealed into the run's log, so
merged text deltas still number without gaps.

Text-bearing events (``token``, ``thinking``, ``answer``, ``refusal``) name
their text ``content``, as the tutorial's clients expect.

Events are plain slotted dataclasses, not frozen ones, and are not changed
once made: a model run makes one event per delta, and a frozen dataclass's
``__init__`` (``object.__setattr__`` per field) cost 0.58 µs a token against
0.16 µs (measured), on a path whose whole engine cost is about 3 µs a token.
Each class knows its number in :data:`KIND_NAMES` as ``kind``, so the run
files an event without a lookup.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Event",
    "TextEvent",
    "Start",
    "Token",
    "Thinking",
    "Refusal",
    "Answer",
    "ToolCallEvent",
    "Action",
    "Observation",
    "UsageEvent",
    "Done",
    "ErrorEvent",
    "Cancelled",
    "Snapshot",
    "AgentEnd",
    "ApprovalRequest",
    "Approval",
    "Steered",
    "Checkpoint",
    "encode",
    "encode_message",
    "encode_text",
    "json_bytes",
    "json_object",
    "well_formed",
    "well_formed_json",
    "KIND_NAMES",
    "TEXT_KINDS",
    "TEXT_CLASSES",
    "Producer",
]

_std_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_quote = json.encoder.encode_basestring  # how that encoder writes a string (it does not escape non-ASCII)
_orjson_dumps: Callable[[Any], bytes] | None = None
with suppress(ImportError):
    _orjson_dumps = importlib.import_module("orjson").dumps


def _dumps(obj: Any) -> str:
    """A frame's JSON, compact, non-ASCII as it is: orjson's when installed (``pip install ".[fast]"``: 0.19 µs
    for a ``usage`` frame against the standard library's 2.1, which builds an encoder per call), the same text for
    what frames hold, strings, integers, booleans and null (``tests/test_events.py`` holds them to it); what
    orjson refuses (a lone surrogate, an integer over 64 bits) the standard library writes."""
    if _orjson_dumps is not None:
        try:
            return _orjson_dumps(obj).decode()
        except TypeError:  # (orjson.JSONEncodeError is one)
            pass
    return _std_dumps(obj)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as UTF-8 JSON (a request's body): orjson's when installed, else (or for what orjson refuses) the
    standard library's, ASCII with escapes (a lone surrogate written as ``\\udXXX``)."""
    if _orjson_dumps is not None:
        try:
            return _orjson_dumps(obj)
        except TypeError:
            pass
    return json.dumps(obj).encode()


@dataclass(slots=True)
class Event:
    """Base of every run event. ``agent`` and ``workflow`` name where it came from."""

    type: ClassVar[str] = "event"
    terminal: ClassVar[bool] = False
    kind: ClassVar[int] = -1
    agent: str | None = dataclasses.field(default=None, kw_only=True)
    workflow: str | None = dataclasses.field(default=None, kw_only=True)


@dataclass(slots=True)
class TextEvent(Event):
    """A text delta. Consecutive deltas of one type and agent may be merged."""

    content: str = ""


@dataclass(slots=True)
class Start(Event):
    """A run began. ``key`` is the run's own secret: present it to resume, attach or cancel elsewhere."""

    type: ClassVar[str] = "start"
    model: str | None = None
    key: str | None = None


@dataclass(slots=True)
class Token(TextEvent):
    type: ClassVar[str] = "token"


@dataclass(slots=True)
class Thinking(TextEvent):
    type: ClassVar[str] = "thinking"


@dataclass(slots=True)
class Refusal(TextEvent):
    type: ClassVar[str] = "refusal"


@dataclass(slots=True)
class Answer(TextEvent):
    type: ClassVar[str] = "answer"


@dataclass(slots=True)
class ToolCallEvent(Event):
    type: ClassVar[str] = "tool_call"
    call_id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class Action(Event):
    """An agent is calling a tool. ``content`` is a line a person can read."""

    type: ClassVar[str] = "action"
    content: str = ""
    call_id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class Observation(Event):
    type: ClassVar[str] = "observation"
    content: str = ""
    call_id: str = ""
    name: str = ""
    is_error: bool = False


@dataclass(slots=True)
class UsageEvent(Event):
    type: ClassVar[str] = "usage"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated: bool = False


@dataclass(slots=True)
class Snapshot(Event):
    """The state of each agent of a workflow, sent to a client that attaches."""

    type: ClassVar[str] = "snapshot"
    agents: tuple[dict[str, Any], ...] = ()


@dataclass(slots=True)
class AgentEnd(Event):
    """One agent of a workflow ended; the run itself goes on until ``done``."""

    type: ClassVar[str] = "agent_end"
    outcome: str = "done"
    finish_reason: str | None = None
    message: str | None = None


@dataclass(slots=True)
class ApprovalRequest(Event):
    """An agent asks a person before it calls a tool: answer with an ``approve`` message naming ``call_id``.

    A producer yields it, then waits for the answer (:func:`wsagent.core.person.approval`); meanwhile
    the run is in its ``WAITING`` phase (:class:`wsagent.engine.run.Phase`)."""

    type: ClassVar[str] = "approval_request"
    call_id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class Approval(Event):
    """How an approval request was answered: approved (the tool runs) or denied (the model is told)."""

    type: ClassVar[str] = "approval"
    call_id: str = ""
    approved: bool = False
    reason: str | None = None


@dataclass(slots=True)
class Steered(Event):
    """A person's message sent to a running agent (``steer``): delivered at the agent's next step, or not,
    and why (``finished``, ``cancelled``, ``error``: the run ended first)."""

    type: ClassVar[str] = "steer"
    content: str = ""
    delivered: bool = True
    reason: str | None = None


@dataclass(slots=True)
class Checkpoint(Event):
    """Where the producer could go on from, on another node, after the events before it (``state``: what
    it needs, as text; with ``--takeover``). Never on the wire: the run keeps the last one with its log.

    A ``step`` checkpoint is an agent's state at a step boundary (its messages, its pending tool calls); the
    others, the model call's position within the step since (a background response's last event read)."""

    type: ClassVar[str] = "checkpoint"
    kind: ClassVar[int] = -2
    state: str = ""
    step: bool = False


@dataclass(slots=True)
class Done(Event):
    type: ClassVar[str] = "done"
    terminal: ClassVar[bool] = True
    finish_reason: str = "stop"


@dataclass(slots=True)
class ErrorEvent(Event):
    type: ClassVar[str] = "error"
    terminal: ClassVar[bool] = True
    code: str = "internal_error"
    message: str = ""
    retryable: bool = False


@dataclass(slots=True)
class Cancelled(Event):
    type: ClassVar[str] = "cancelled"
    terminal: ClassVar[bool] = True
    reason: str = "cancelled"


#: What a run streams: batches of events, each the events that arrived together (one upstream read).
Producer = AsyncGenerator[Sequence[Event], None]

#: Every event type's wire name, by a small number: a run's log keeps the number, not the class.
#: The text deltas come first, so ``kind < TEXT_KINDS`` tells a text delta.
KIND_NAMES: tuple[str, ...] = (
    "token", "thinking", "refusal", "answer",
    "start", "tool_call", "action", "observation", "usage", "snapshot", "agent_end", "done", "error", "cancelled",
    "approval_request", "approval", "steer",
)
TEXT_KINDS = 4
for _cls in (Token, Thinking, Refusal, Answer, Start, ToolCallEvent, Action, Observation, UsageEvent, Snapshot,
             AgentEnd, Done, ErrorEvent, Cancelled, ApprovalRequest, Approval, Steered):
    _cls.kind = KIND_NAMES.index(_cls.type)

#: The text delta classes by their number.
TEXT_CLASSES: tuple[type[TextEvent], ...] = (Token, Thinking, Refusal, Answer)


_FIELDS: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(cls))
        _FIELDS[cls] = names
    return names


def encode(event: Event, run_id: str | None, seq: int | None) -> str:
    """The JSON text frame for ``event``. ``None`` fields are left out."""
    obj: dict[str, Any] = {"type": event.type}
    if run_id is not None:
        obj["id"] = run_id
    if seq is not None:
        obj["seq"] = seq
    for name in _field_names(type(event)):
        value = getattr(event, name)
        if value is not None:
            obj[name] = value
    return _dumps(obj)


def encode_text(cls: type[TextEvent], content: str, run_id: str, seq: int, agent: str | None = None,
                workflow: str | None = None) -> str:
    """``encode(cls(content, agent=agent, workflow=workflow), run_id, seq)``, without making the event.

    The relay seals a text delta for every frame it sends: building the event and a dict for the
    encoder cost 2 µs a frame, this 0.1 µs. A property test holds the two to the same bytes.
    """
    author = ""
    if agent is not None:
        author = f'"agent":{_quote(agent)},'
    if workflow is not None:
        author += f'"workflow":{_quote(workflow)},'
    return f'{{"type":"{cls.type}","id":{_quote(run_id)},"seq":{seq},{author}"content":{_quote(content)}}}'


def encode_message(type_: str, **fields: Any) -> str:
    """A frame that belongs to no run (``pong``, ``broadcast``, refusals of a request)."""
    obj = {"type": type_}
    obj.update((k, v) for k, v in fields.items() if v is not None)
    return _dumps(obj)


def well_formed(text: str) -> str:
    """``text`` with surrogate pairs joined and lone surrogates replaced by U+FFFD.

    A Python ``str`` can hold a lone surrogate (JSON's ``"\\ud800"`` decodes to
    one), which no UTF-8 writer accepts: a frame, a log line or a Redis command
    holding it fails where it is written, far from where it came in. Text is
    made well formed where it enters (client messages here, upstream chunks in
    :mod:`wsagent.core.chunks`); ASCII costs an ``isascii`` (14 ns), other valid text
    an ``encode`` attempt (about 40 ns for a token).
    """
    if text.isascii():
        return text
    try:
        text.encode()  # UTF-8; without the argument, a faster path
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def well_formed_json(value: Any) -> Any:
    """A parsed JSON ``value`` with every string in it :func:`well_formed`."""
    if isinstance(value, str):
        return well_formed(value)
    if isinstance(value, list):
        return [well_formed_json(item) for item in value]
    if isinstance(value, dict):
        return {well_formed(k): well_formed_json(v) for k, v in value.items()}
    return value


def json_object(text: str) -> dict[str, Any] | None:
    """``text`` (a client's message) as a JSON object, or None (not JSON, not an object, or nested too
    deep to parse). Its strings are :func:`well_formed`: a text frame is valid UTF-8, so only a
    ``\\u`` escape can bring a lone surrogate, and a message without one is not walked."""
    if text[:1] != "{":
        return None
    try:
        value = json.loads(text)
        if "\\u" in text:
            value = well_formed_json(value)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
