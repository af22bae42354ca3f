"""How a run's sealed events become frames on each wire: one renderer per protocol, no I/O.

A run's log (:mod:`wsagent.engine.run`) keeps each event once, in a form no wire owns:
a text delta as its bare text, any other event as its JSON frame (the JSON
protocol's own bytes, numbered when sealed). A route only chooses how those
entries are rendered for its clients:

* JSON (``/ws/chat``): a text delta is written with :func:`~wsagent.core.events.encode_text`
  as it is taken, any other entry is sent as it was sealed;
* :class:`TextMode` (``/ws/chat`` text prompts): the answer's text, then
  ``\\n[DONE]``, ``[ERROR] ...`` or ``\\n[CANCELLED] ...``;
* :class:`Words` (``/ws/agent``, ``/ws/{client_id}``): the answer regrouped into
  whole words, then ``[DONE]``;
* :class:`Thoughts` (``/ws/agent-thoughts``, ``/ws/robust``): the tutorial's
  ``{"type": "thinking"|"action"|"observation"|"answer", "content": ...}``
  messages, whole sentences of thinking, then ``{"type": "done"}``.
* :class:`~wsagent.core.ui_stream.UIChunks` (``/ws/ai-sdk``): the AI SDK's UI
  message stream chunks.

A renderer may keep state between entries (a word or a sentence not yet
complete): each watching socket has its own.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from .events import KIND_NAMES, TEXT_KINDS, encode_message

__all__ = ["Renderer", "Author", "TextMode", "Words", "Thoughts"]

#: Where a text entry came from: (agent, workflow); (None, None) for the run itself.
Author = tuple[str | None, str | None]

_SENTENCE_END = (".", "!", "?", "\n")
#: What a renderer holds back at most (a sentence or a word that does not end): past it, it goes out as is.
_HELD = 4096
_TOKEN = KIND_NAMES.index("token")
_ANSWER = KIND_NAMES.index("answer")
_THINKING = KIND_NAMES.index("thinking")


class Renderer(Protocol):
    """Turns one sealed log entry into frames for one socket (appended to ``out``). ``author`` names
    the agent and workflow of a text entry (another entry's JSON carries them itself)."""

    def render(self, kind: int, payload: str, out: list[str], author: Author) -> None: ...

    def pause(self, out: list[str]) -> None:
        """The socket's view of the run stops at an approval request waiting for its answer (a subscription
        made with ``pauses``): close what the client expects closed."""
        ...


class _Unpaused:
    """The renderers of routes whose subscriptions never pause (their clients answer in band)."""

    __slots__ = ()

    def pause(self, out: list[str]) -> None:
        """Never called: only an AI SDK response ends at an approval request."""


def _fields(payload: str) -> dict[str, Any]:
    """A non-text entry's fields (its JSON frame); only rare events (tool calls, ends) take this path."""
    value = json.loads(payload)
    assert isinstance(value, dict)
    return value


class TextMode(_Unpaused):
    """The tutorial's text mode: the answer's tokens as they come, then how the run ended."""

    __slots__ = ()

    def render(self, kind: int, payload: str, out: list[str], author: Author) -> None:
        if kind == _TOKEN:
            out.append(payload)
        elif kind >= TEXT_KINDS:
            name = KIND_NAMES[kind]
            if name == "done":
                out.append("\n[DONE]")
            elif name == "error":
                out.append(f"[ERROR] {_fields(payload)['message']}")
            elif name == "cancelled":
                out.append(f"\n[CANCELLED] {_fields(payload)['reason']}")


class Words(_Unpaused):
    """``/ws/agent``: the answer (a model's tokens or an agent's answer) one whole word a frame,
    each with its trailing space; then ``[DONE]``, ``[ERROR] ...`` or ``[CANCELLED] ...``."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = ""

    def render(self, kind: int, payload: str, out: list[str], author: Author) -> None:
        if kind == _TOKEN or kind == _ANSWER:
            *words, self.pending = (self.pending + payload).split(" ")
            out.extend(word + " " for word in words if word)
            if len(self.pending) > _HELD:  # a "word" that never ends is not held back for ever
                out.append(self.pending)
                self.pending = ""
            return
        name = KIND_NAMES[kind]
        if name not in ("done", "error", "cancelled"):
            return
        if self.pending:
            out.append(self.pending + " ")
            self.pending = ""
        if name == "done":
            out.append("[DONE]")
        elif name == "error":
            out.append(f"[ERROR] {_fields(payload)['message']}")
        else:
            out.append(f"[CANCELLED] {_fields(payload)['reason']}")


class Thoughts(_Unpaused):
    """``/ws/agent-thoughts``: thinking in whole sentences, every action and observation, the
    answer as it streams; a failure as ``{"type": "error", "message": ...}``; then ``done``."""

    __slots__ = ("thought",)

    def __init__(self) -> None:
        self.thought = ""

    def render(self, kind: int, payload: str, out: list[str], author: Author) -> None:
        if kind == _THINKING:
            self.thought += payload
            if self.thought.rstrip().endswith(_SENTENCE_END) or len(self.thought) > _HELD:
                self._flush(out)
            return
        if kind < TEXT_KINDS and kind != _ANSWER and kind != _TOKEN:
            return
        self._flush(out)
        if kind == _ANSWER or kind == _TOKEN:
            out.append(encode_message("answer", content=payload))
            return
        name = KIND_NAMES[kind]
        if name in ("action", "observation"):
            out.append(encode_message(name, content=_fields(payload)["content"]))
        elif name == "error":
            out.append(encode_message("error", message=_fields(payload)["message"]))
            out.append('{"type":"done"}')
        elif name == "cancelled":
            out.append(encode_message("cancelled", reason=_fields(payload)["reason"]))
            out.append('{"type":"done"}')
        elif name == "done":
            out.append('{"type":"done"}')

    def _flush(self, out: list[str]) -> None:
        thought = self.thought.strip()
        self.thought = ""
        if thought:
            out.append(encode_message("thinking", content=thought))
