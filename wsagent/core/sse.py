"""Sans-I/O decoder for Server-Sent Events (the WHATWG ``text/event-stream`` format).

Feed it bytes as they arrive, in any split, and it returns the events that
those bytes completed. It never reads a socket, so the same code serves the
aiohttp transport, the tests and the fuzzers, and every split of the input can
be tested (see ``tests/test_sse.py``).

Rules followed (https://html.spec.whatwg.org/multipage/server-sent-events.html):

* lines end at CRLF, LF or a lone CR, in any mixture; a CR at the end of one
  read and the LF at the start of the next are one line break;
* one leading UTF-8 byte order mark is dropped; a multi-byte character may be
  split across reads;
* a line that starts with ``:`` is a comment;
* a field line splits at the first colon and loses one leading space;
* ``data`` lines join with ``\\n``; ``event``, ``id`` (ignored if it holds NUL)
  and ``retry`` (ASCII digits only) are kept; other fields are ignored;
* a blank line dispatches the event; an event without data is not dispatched.

There is no limit on a line's length, only on the size of one event
(``max_event_size`` characters), because a single ``data:`` line of a tool
call's arguments can be megabytes long and still be legitimate.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent", "SSEError", "DEFAULT_MAX_EVENT_SIZE"]

DEFAULT_MAX_EVENT_SIZE = 4 * 1024 * 1024

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event. ``complete`` is False for an unterminated final event. (Not frozen: see
    :class:`~wsagent.core.chunks.TextDelta`.)"""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None
    complete: bool = True


class SSEError(ValueError):
    """The stream broke a limit; decoding cannot go on."""


class SSEDecoder:
    """Turn ``text/event-stream`` bytes into :class:`SSEEvent` objects."""

    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self.max_event_size = max_event_size
        self._utf8: codecs.IncrementalDecoder | None = None  # made at the first read that is not whole UTF-8
        self._utf8_clean = True  # the incremental decoder holds no partial character
        self._partial = ""
        self._skip_lf = False
        self._started = False
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None
        self._closed = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Decode ``chunk`` and return the events it completed, in order."""
        if self._closed:
            raise SSEError("decoder is closed")
        if self._utf8_clean:
            try:
                text = chunk.decode()  # the usual case: whole characters, valid UTF-8
            except UnicodeDecodeError:
                text = self._decode(chunk)
        else:
            text = self._decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        if self._skip_lf:
            self._skip_lf = False
            if text[:1] == "\n":
                text = text[1:]
        if self._partial:
            text = self._partial + text
        lines = _LINE_BREAK.split(text) if "\r" in text else text.split("\n")
        self._partial = lines.pop()
        if not self._partial and text[-1:] == "\r":
            self._skip_lf = True
        events: list[SSEEvent] = []
        for line in lines:  # a data line and a blank line (almost every line there is) here; others in _line
            if line[:6] == "data: ":
                value = line[6:]
                self._data.append(value)
                self._data_size += len(value) + 1
                if self._data_size > self.max_event_size:
                    self._closed = True
                    raise SSEError(f"event larger than {self.max_event_size} characters")
            elif not line and self._data:
                events.append(self._build(complete=True))
            else:
                self._line(line, events)
        if len(self._partial) + self._data_size > self.max_event_size:
            self._closed = True
            raise SSEError(f"event larger than {self.max_event_size} characters")
        return events

    def _decode(self, chunk: bytes) -> str:
        """A character split across reads, or invalid bytes (replaced): the incremental decoder."""
        utf8 = self._utf8
        if utf8 is None:
            utf8 = self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = utf8.decode(chunk)
        self._utf8_clean = not utf8.getstate()[0]
        return text

    def close(self) -> list[SSEEvent]:
        """End of input. An event that was not ended by a blank line comes back
        with ``complete=False`` so the caller can report it as truncated."""
        if self._closed:
            return []
        tail = self._utf8.decode(b"", final=True) if self._utf8 is not None else ""
        self._closed = True
        events: list[SSEEvent] = []
        if tail:
            self._partial += tail
        if self._partial:
            self._line(self._partial, events)
            self._partial = ""
        if self._data:
            events.append(self._build(complete=False))
        return events

    def _line(self, line: str, out: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                out.append(self._build(complete=True))
            else:
                self._event = ""
            return
        if line[0] == ":":
            return
        field, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self.max_event_size:
                self._closed = True
                raise SSEError(f"event larger than {self.max_event_size} characters")
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\x00" not in value:
                self._last_id = value
        elif field == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)

    def _build(self, complete: bool) -> SSEEvent:
        data = self._data
        event = SSEEvent(data[0] if len(data) == 1 else "\n".join(data), self._event or "message", self._last_id,
                         self._retry, complete)
        self._data = []
        self._data_size = 0
        self._event = ""
        return event
