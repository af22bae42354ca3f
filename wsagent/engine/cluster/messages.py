"""The control messages nodes send each other on ``wsagent:node:{node}``, typed; no I/O.

A *notice* asks for nothing back (a follower passing its watcher's cancel on,
a client arriving or leaving, an eviction). A *question* (:class:`Question`)
carries a number and the asking node, and is answered with one
:class:`Answer` on the asker's channel; the asker waits COMMAND_TIMEOUT for it.
A notice and a question are different types even where they share an ``op``
on the wire (``cancel``: the wire tells them apart by the question's ``ask``),
so that no handler can take one for the other.

The wire format is JSON, ``{"op": ..., fields}``, unchanged from earlier
versions, so nodes of two versions keep talking during a rolling upgrade. A
message that is not one of these (another version's, or garbage published on
the channel) decodes to None and is ignored.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

__all__ = ["Cancel", "Forget", "Follow", "Unfollow", "Gone", "Hello", "Adopt", "Leave", "Evict", "Send",
           "Question", "AskCancel", "AskSnapshot", "AskCancelAgent", "Answer", "Notice", "Message",
           "encode", "decode"]

# -- notices -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    """A watcher of ``key`` on another node cancelled it: stop the run (nothing to answer)."""

    key: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Forget:
    """A newer run took the id of the finished run ``key`` on another node: stop keeping it."""

    key: str


@dataclasses.dataclass(frozen=True, slots=True)
class Follow:
    """``node`` follows run ``key``: write its entries at once (FLUSH_EVERY), not lazily."""

    key: str
    node: str


@dataclasses.dataclass(frozen=True, slots=True)
class Unfollow:
    """``node`` follows run ``key`` no more."""

    key: str
    node: str


@dataclasses.dataclass(frozen=True, slots=True)
class Gone:
    """The node asked to produce ``key`` does not (it started again under its id): the run is lost
    unless its history holds its end."""

    key: str


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """A process started as ``node``: what an earlier process of that id produced or held is gone."""

    node: str


@dataclasses.dataclass(frozen=True, slots=True)
class Adopt:
    """A client on another node (its subscription ``holder``) resumed run ``key``: it is the run's own."""

    key: str
    holder: str


@dataclasses.dataclass(frozen=True, slots=True)
class Leave:
    """The run's own client on another node (``holder``) went away: the run's grace starts."""

    key: str
    holder: str


@dataclasses.dataclass(frozen=True, slots=True)
class Evict:
    """A newer connection on another node took ``client`` from ``holder``: close it (4009)."""

    client: str
    holder: str


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    """A personal message for ``client``, a client of this node."""

    client: str
    frame: str


Notice = Cancel | Forget | Follow | Unfollow | Gone | Hello | Adopt | Leave | Evict | Send


# -- questions and answers ---------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Question:
    """What every question carries: its number (``ask``) and the node that waits for the answer."""

    ask: str
    asker: str


@dataclasses.dataclass(frozen=True, slots=True)
class AskCancel(Question):
    """Cancel run ``key``: answered True if it was running here."""

    key: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class AskSnapshot(Question):
    """Each agent's status and answer so far, for workflow run ``key``: answered with a list, or None."""

    key: str


@dataclasses.dataclass(frozen=True, slots=True)
class AskCancelAgent(Question):
    """Stop agent ``agent`` of workflow run ``key``: answered True if it was running."""

    key: str
    agent: str


@dataclasses.dataclass(frozen=True, slots=True)
class AskApprove(Question):
    """A person's answer to approval request ``call_id`` of run ``key`` (``approved``: "1" or "0"; ``reason``:
    "" for none; ``holder``: the answering socket's subscription on the asking node, "" if it does not watch
    the run, which takes it for its own client if its own has gone): answered "ok" once taken, or [code,
    message] if the run cannot take it."""

    key: str
    call_id: str
    approved: str
    reason: str
    holder: str


@dataclasses.dataclass(frozen=True, slots=True)
class AskSteer(Question):
    """A person's message for agent run ``key``'s next step: answered as :class:`AskApprove` is."""

    key: str
    content: str


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """The answer to question ``ask`` (any JSON value)."""

    ask: str
    answer: Any


Message = Notice | AskCancel | AskSnapshot | AskCancelAgent | AskApprove | AskSteer | Answer

#: Each message type's ``op`` on the wire, and its fields there (a question's ``asker`` is ``from``).
_OPS: dict[type[Message], str] = {
    Cancel: "cancel", Forget: "forget", Follow: "follow", Unfollow: "unfollow", Gone: "gone", Hello: "hello",
    Adopt: "adopt", Leave: "leave", Evict: "evict", Send: "send",
    AskCancel: "cancel", AskSnapshot: "snapshot", AskCancelAgent: "cancel_agent", AskApprove: "approve",
    AskSteer: "steer", Answer: "answer",
}
_WIRE_NAME = {"asker": "from"}
#: (op, whether it carries ``ask``) -> type: a ``cancel`` with ``ask`` is a question, without one a notice.
_TYPES: dict[tuple[str, bool], type[Message]] = {
    (op, issubclass(kind, Question) or kind is Answer): kind for kind, op in _OPS.items()}
_FIELDS: dict[type[Message], tuple[tuple[str, str], ...]] = {
    kind: tuple((field.name, _WIRE_NAME.get(field.name, field.name)) for field in dataclasses.fields(kind))
    for kind in _OPS}


def encode(message: Message) -> str:
    kind = type(message)
    return json.dumps({"op": _OPS[kind], **{wire: getattr(message, field) for field, wire in _FIELDS[kind]}})


def decode(data: str) -> Message | None:
    """The message ``data`` carries, or None if it is none of ours (each field but an answer's must be text)."""
    try:
        fields = json.loads(data)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    op = fields.get("op")
    kind = _TYPES.get((op, "ask" in fields)) if isinstance(op, str) else None
    if kind is None:
        return None
    values: dict[str, Any] = {}
    for field, wire in _FIELDS[kind]:
        value = fields.get(wire)
        if not isinstance(value, str) and not (kind is Answer and field == "answer"):
            return None
        values[field] = value
    return kind(**values)
