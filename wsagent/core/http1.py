"""Sans-I/O HTTP/1.1 for the model server's side: a request's head out, a response's bytes in.

Feed :class:`ResponseDecoder` a response's bytes as they arrive, in any split; it returns the body's bytes those
completed, the chunked framing taken off, and sets :attr:`~ResponseDecoder.head` once the status line and headers
are in. It never reads a socket, so every split of a response can be tested (``tests/test_http1.py``), as
:mod:`wsagent.core.sse` is; :mod:`wsagent.upstream.http` moves the bytes.

What it follows (RFC 9112): interim (1xx) heads are skipped, and count towards the head's limit (an endless
stream of them is a head over its limit, not a loop); a body ends where ``Transfer-Encoding: chunked`` ends it
(extensions read and dropped, trailers too, within the head's limit), after ``Content-Length`` bytes, or at the
connection's end; a 204 and a 304 have none. A line may end in LF alone. Anything else (a
status line that is not ``HTTP/1.x`` and a status from 100 to 599, a header without a colon, a transfer coding
other than chunked, since none other is asked for, a chunk size that is not hex, a head or chunk line over its
limit, two different lengths) is a :class:`ProtocolError`, which carries the body bytes decoded before it: the
connection cannot be trusted past it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Head", "ProtocolError", "ResponseDecoder", "Truncated", "request_head"]

#: The most a response's head (or a chunked body's trailers) may take.
MAX_HEAD = 65536
#: The most a chunk-size line may take (the size and any extensions).
MAX_CHUNK_LINE = 4096

_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(?:;[^\r\n]*)?\r?\n")
_UNSAFE = re.compile(r"[\x00\r\n]")

# The decoder's states: where the next byte belongs.
_HEAD, _SIZE, _DATA, _DATA_END, _TRAILERS, _LENGTH, _CLOSE, _DONE = range(8)


class ProtocolError(ValueError):
    """The response broke HTTP/1.1's framing, or a limit: decoding cannot go on. ``body``: what the same bytes
    completed of the body before the break, to be delivered before it (as the SSE decoder's events are)."""

    body = b""


class Truncated(Exception):
    """The connection ended before the body did."""


@dataclass(slots=True)
class Head:
    """A response's status line and headers; names in lower case, repeated fields joined with ``", "``. (Not
    frozen: see :class:`~wsagent.core.chunks.TextDelta`.)"""

    status: int
    reason: str
    headers: dict[str, str]
    keep_alive: bool


def request_head(method: str, target: str, host: str, fields: dict[str, str]) -> bytes:
    """A request's head up to (not including) its ``Content-Length`` value: ``fields`` follow ``Host``. A value
    with CR, LF or NUL (a header split in two) is a ``ValueError``."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in fields.items():
        if not name or name.strip(_TOKEN_CHARS) or _UNSAFE.search(value):
            raise ValueError(f"header {name!r} cannot be sent as it is (a line break, NUL or not a token)")
        lines.append(f"{name}: {value}")
    lines.append("Content-Length: ")
    return "\r\n".join(lines).encode("latin-1")


class ResponseDecoder:
    """One response's bytes in, its body's bytes out (the response to a ``GET`` or a ``POST``: wsagent sends no
    ``HEAD``)."""

    __slots__ = ("head", "_state", "_buffer", "_remaining", "_seen", "extra")

    def __init__(self) -> None:
        self.head: Head | None = None
        self._state = _HEAD
        self._buffer = b""
        self._remaining = 0
        self._seen = 0  # the bytes of the interim heads, then of the trailers, so far
        #: Bytes that came after the response's end: the connection cannot carry another request.
        self.extra = False

    @property
    def done(self) -> bool:
        """The body is complete (so far as framing says: a body that ends with the connection is not, yet)."""
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        """The body bytes ``data`` completed (``b""`` for none); :class:`ProtocolError` for a broken framing."""
        state = self._state
        if state == _LENGTH:  # the common case of a sized body: no copy of what fits
            if len(data) < self._remaining:
                self._remaining -= len(data)
                return data
            body, rest, self._remaining = data[:self._remaining], data[self._remaining:], 0
            self._finish(rest)
            return body
        if state == _CLOSE:
            return data
        if state == _DONE:
            self.extra = self.extra or bool(data)
            return b""
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        if state == _HEAD:
            after = self._read_head(buffer)
            if after is None:
                return b""
            buffer = after
            if self._state != _SIZE:  # a sized body, one to the connection's end, or none
                return self.feed(buffer) if buffer else b""
        return self._chunks(buffer)

    def end(self) -> None:
        """The connection ended: the body is complete if it ran to the end, else :class:`Truncated`."""
        if self._state == _CLOSE:
            self._state = _DONE
        elif self._state != _DONE:
            raise Truncated("the connection ended before the response did")

    def _finish(self, rest: bytes) -> None:
        self._state = _DONE
        self.extra = bool(rest)

    def _read_head(self, buffer: bytes) -> bytes | None:
        """What follows the final head in ``buffer`` once it is read (None: more bytes needed)."""
        while True:
            start, end = _end_of_head(buffer)
            if (len(buffer) if end < 0 else start) + self._seen > MAX_HEAD:
                raise ProtocolError(f"a response head (with any interim answers) over {MAX_HEAD} bytes")
            if end < 0:
                self._buffer = buffer
                return None
            head = _parse_head(buffer[:start])
            if head.status < 200:
                if head.status == 101:
                    raise ProtocolError("the model server switched protocols")
                self._seen += end  # an interim answer (100 Continue, 103 Early Hints): the real one follows
                buffer = buffer[end:]
                continue
            self._seen = 0
            self.head = head
            self._state = self._framing(head)
            return buffer[end:]

    def _framing(self, head: Head) -> int:
        if head.status in (204, 304):
            return _DONE
        coding = head.headers.get("transfer-encoding")
        if coding is not None:
            if coding.strip().lower() != "chunked":  # (asked for with Accept-Encoding: identity: no other coding)
                raise ProtocolError(f"a transfer coding other than chunked: {coding[:40]!r}")
            return _SIZE
        length = head.headers.get("content-length")
        if length is None:
            return _CLOSE
        values = {value.strip() for value in length.split(",")}
        value = values.pop()
        if values or not value.isdigit() or not value.isascii():
            raise ProtocolError(f"a Content-Length that is not one number: {length[:40]!r}")
        self._remaining = int(value)
        return _LENGTH if self._remaining else _DONE

    def _chunks(self, buffer: bytes) -> bytes:
        """The chunked body's data in ``buffer``; what does not complete a piece of framing waits for more."""
        parts: list[bytes] = []
        try:
            at = self._chunks_into(parts, buffer)
        except ProtocolError as exc:
            exc.body = b"".join(parts)
            raise
        if at < len(buffer) and self._state != _DONE:
            self._buffer = buffer[at:]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _chunks_into(self, parts: list[bytes], buffer: bytes) -> int:
        """Decode ``buffer`` into ``parts``; where decoding stopped (its end, the response's, or a piece of framing
        that needs more bytes)."""
        at, size = 0, len(buffer)
        state, remaining = self._state, self._remaining
        size_line = _SIZE_LINE.match
        while at < size:
            if state == _SIZE:
                line = size_line(buffer, at)
                if line is None or line.end() - at > MAX_CHUNK_LINE:
                    line_end = buffer.find(b"\n", at, at + MAX_CHUNK_LINE + 1)
                    if line_end >= 0:
                        raise ProtocolError(f"a chunk size that is not hexadecimal: {buffer[at:line_end][:40]!r}")
                    if size - at > MAX_CHUNK_LINE:
                        raise ProtocolError(f"a chunk-size line over {MAX_CHUNK_LINE} bytes")
                    break
                remaining = int(line[1], 16)
                at = line.end()
                if not remaining:
                    state = _TRAILERS
                    continue
                end = at + remaining
                if buffer[end:end + 2] == b"\r\n":  # the whole chunk is here (the common case)
                    parts.append(buffer[at:end])
                    at, remaining = end + 2, 0
                    continue
                state = _DATA
            elif state == _DATA:
                take = min(remaining, size - at)
                parts.append(buffer[at:at + take])
                at += take
                remaining -= take
                if not remaining:
                    state = _DATA_END
            elif state == _DATA_END:
                if buffer[at:at + 1] == b"\n":
                    at += 1
                elif buffer[at:at + 2] == b"\r\n":
                    at += 2
                elif size - at < 2 and buffer[at:at + 1] == b"\r":
                    break
                else:
                    raise ProtocolError("a chunk's data did not end where its size said")
                state = _SIZE
            else:  # the trailers, after the last chunk
                line_end = buffer.find(b"\n", at)
                if (size if line_end < 0 else line_end) - at + self._seen > MAX_HEAD:
                    raise ProtocolError(f"trailers over {MAX_HEAD} bytes")
                if line_end < 0:
                    break
                trailer, at = buffer[at:line_end], line_end + 1
                self._seen += len(trailer) + 1
                if trailer in (b"", b"\r"):
                    self._state = _DONE
                    self.extra = at < size
                    return at
        self._state, self._remaining = state, remaining
        return at


def _end_of_head(buffer: bytes) -> tuple[int, int]:
    """Where the blank line that ends a head begins and ends in ``buffer`` (CRLF or a bare LF each); -1, -1 if
    not there yet. Two searches in C: a regular expression for it (``\\r?\\n\\r?\\n``) cannot skip ahead to a
    literal and tried a match at every byte of the head: 30,000 instructions per answer, 3 % of a run's start
    (counted with ``scripts/instructions.py``)."""
    crlf, lf = buffer.find(b"\n\r\n"), buffer.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        at, end = crlf, crlf + 3
    elif lf >= 0:
        at, end = lf, lf + 2
    else:
        return -1, -1
    return (at - 1 if buffer[at - 1:at] == b"\r" else at), end


def _parse_head(raw: bytes) -> Head:
    lines = raw.decode("latin-1").split("\n")
    version, _, rest = lines[0].rstrip("\r").partition(" ")
    code, _, reason = rest.partition(" ")
    if (version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isascii() or not code.isdigit()
            or not "100" <= code <= "599"):
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    del lines[0]
    headers: dict[str, str] = {}
    names: list[str] = []
    for line in lines:  # each field once, every name a token (checked below, all at once): the usual head
        field, colon, value = line.partition(":")
        if not colon:
            break
        headers[field.lower()] = value.strip(" \t\r")
        names.append(field)
    else:
        if len(headers) == len(names) and "" not in names and not "".join(names).strip(_TOKEN_CHARS):
            return _head(version, code, reason, headers)
    return _head(version, code, reason, _fields(lines))


def _fields(lines: list[str]) -> dict[str, str]:
    """Header lines with folded lines, repeated fields or an error among them."""
    headers: dict[str, str] = {}
    name = ""
    for line in lines:
        if line[:1] in (" ", "\t"):  # an obsolete folded line: part of the field before it
            if not name:
                raise ProtocolError("a folded header line with no header before it")
            headers[name] += " " + line.strip()
            continue
        field, colon, value = line.partition(":")
        if not colon or not field or field.strip(_TOKEN_CHARS):
            raise ProtocolError(f"not a header line: {line.rstrip()[:80]!r}")
        name = field.lower()
        value = value.strip(" \t\r")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _head(version: str, code: str, reason: str, headers: dict[str, str]) -> Head:
    keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    return Head(int(code), reason.rstrip("\r"), headers, keep_alive)
