"""The sans-I/O HTTP/1.1 response decoder against RFC 9112's framing, and any split of the input."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsagent.core.http1 import (
    MAX_HEAD,
    Head,
    ProtocolError,
    ResponseDecoder,
    Truncated,
    _end_of_head,
    _fields,
    _parse_head,
    request_head,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def decode(*reads: bytes, eof: bool = True) -> tuple[Head | None, bytes, ResponseDecoder]:
    decoder = ResponseDecoder()
    body = b"".join(decoder.feed(read) for read in reads)
    if eof:
        decoder.end()
    return decoder.head, body, decoder


@settings(max_examples=500, deadline=None)
@given(st.binary().map(lambda raw: bytes(b"\r\nA"[byte % 3] for byte in raw)))
def test_the_end_of_a_head_is_where_the_grammar_puts_it(buffer: bytes) -> None:
    """Two searches in C find the first blank line as ``\\r?\\n\\r?\\n`` does (its leftmost match)."""
    found = re.search(rb"\r?\n\r?\n", buffer)
    assert _end_of_head(buffer) == ((found.start(), found.end()) if found else (-1, -1))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(alphabet="aA:- \t\r,(", max_size=8), max_size=5))
def test_the_usual_heads_quick_reading_agrees_with_the_careful_one(lines: list[str]) -> None:
    """Header lines read all at once (each field once, every name a token) or line by line (folded lines,
    repeated fields, errors): the same fields, or the same refusal."""
    raw = "\r\n".join(["HTTP/1.1 200 OK", *lines]).encode("latin-1")
    try:
        expected = _fields(raw.decode("latin-1").split("\n")[1:])
    except ProtocolError:
        with pytest.raises(ProtocolError):
            _parse_head(raw)
        return
    assert _parse_head(raw).headers == expected


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n" + trailer + b"\r\n"


def test_a_chunked_event_stream() -> None:
    head, body, decoder = decode(OK + chunked(b"data: 1\n\n", b"data: [DONE]\n\n"), eof=False)
    assert head == Head(200, "OK", {"content-type": "text/event-stream", "transfer-encoding": "chunked"}, True)
    assert body == b"data: 1\n\ndata: [DONE]\n\n" and decoder.done and not decoder.extra


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
       extension=st.sampled_from([b"", b";name=value", b" ; x"]),
       trailer=st.sampled_from([b"", b"X-Usage: 3\r\n", b"A: 1\r\nB: 2\r\n"]),
       newline=st.sampled_from([b"\r\n", b"\n"]),
       cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_any_split_of_a_chunked_body_gives_the_same_body(pieces: list[bytes], extension: bytes, trailer: bytes,
                                                          newline: bytes, cuts: list[int]) -> None:
    raw = (b"HTTP/1.1 200 OK" + newline + b"Transfer-Encoding: chunked" + newline + newline
           + b"".join(b"%x%s%s%s%s" % (len(p), extension, newline, p, newline) for p in pieces)
           + b"0" + newline + trailer.replace(b"\r\n", newline) + newline)
    points = sorted({cut % (len(raw) + 1) for cut in cuts})
    reads = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    head, body, decoder = decode(*reads, eof=False)
    assert head is not None and head.status == 200
    assert body == b"".join(pieces) and decoder.done and not decoder.extra


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_any_split_of_a_sized_body_and_of_one_that_ends_with_the_connection(body: bytes, cuts: list[int]) -> None:
    for raw, eof in ((b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), False),
                     (b"HTTP/1.0 200 OK\r\n\r\n" + body, True)):
        points = sorted({cut % (len(raw) + 1) for cut in cuts})
        reads = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
        _, got, decoder = decode(*reads, eof=eof)
        assert got == body and decoder.done


def test_interim_heads_are_skipped() -> None:
    head, body, _ = decode(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert head is not None and head.status == 200 and "link" not in head.headers and body == b"ok"


@pytest.mark.parametrize("raw", [b"HTTP/1.1 204 No Content\r\n\r\n",
                                 b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"])
def test_responses_without_a_body(raw: bytes) -> None:
    _, body, decoder = decode(raw, eof=False)
    assert body == b"" and decoder.done


def test_headers_lower_case_repeated_joined_folded_continued() -> None:
    head, _, _ = decode(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nVia: a\r\nvia: b\r\n"
                        b"X-Long: one\r\n  two\r\nContent-Length: 0\r\n\r\n", eof=False)
    assert head == Head(429, "Too Many Requests", {"retry-after": "3", "via": "a, b", "x-long": "one two",
                                                   "content-length": "0"}, True)


@pytest.mark.parametrize("raw, keep", [(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
                                       (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
                                       (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True)])
def test_keep_alive(raw: bytes, keep: bool) -> None:
    head, _, _ = decode(raw, eof=False)
    assert head is not None and head.keep_alive is keep


def test_bytes_after_the_end_are_told() -> None:
    _, body, decoder = decode(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200", eof=False)
    assert body == b"ok" and decoder.done and decoder.extra
    _, _, decoder = decode(OK + chunked(b"x") + b"more", eof=False)
    assert decoder.extra


@pytest.mark.parametrize("reads", [
    [OK + b"5\r\nab"],  # mid-chunk
    [OK + chunked(b"x")[:-2]],  # before the last chunk's end
    [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"],
    [b"HTTP/1.1 200 OK\r\nContent-"],  # mid-head
    [],
])
def test_the_connection_ending_early_is_truncation(reads: list[bytes]) -> None:
    with pytest.raises(Truncated):
        decode(*reads)


@pytest.mark.parametrize("raw, says", [
    (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.x status line"),
    (b"ICY 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 \xb200 OK\r\n\r\n", "not an HTTP/1.x status line"),  # (a superscript two: a traceback once)
    (b"HTTP/1.1 000 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 099 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 600 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "a transfer coding other than chunked"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "a transfer coding other than chunked"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 4000, "a response head \\(with any interim answers\\) over"),
    (OK + b"0\r\nX: " + b"t" * 200_000 + b"\r\n\r\n", "trailers over"),
    (OK + b"0\r\n" + b"X: 1\r\n" * 20_000 + b"\r\n", "trailers over"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "not a header line"),
    (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "not a header line"),
    (b"HTTP/1.1 200 OK\r\n folded first\r\n\r\n", "folded header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n", "not one number"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "not one number"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
    (OK + b"zz\r\n", "not hexadecimal"),
    (OK + b"2\r\nabX\r\n", "did not end where its size said"),
    (OK + b"f" * 5000, "chunk-size line over"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD, "a response head"),
])
def test_broken_framing_is_a_protocol_error(raw: bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        decode(raw, eof=False)


def test_a_break_in_the_framing_carries_the_body_decoded_before_it() -> None:
    """A framing error lost the chunks decoded in the same read: the outcome hung on how TCP cut the bytes."""
    with pytest.raises(ProtocolError) as info:
        decode(OK + b"1\r\nA\r\n1\r\nB\r\nzz\r\n", eof=False)
    assert info.value.body == b"AB"


@settings(max_examples=500, deadline=None)
@given(noise=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=400))
def test_any_bytes_are_a_response_or_a_protocol_error(noise: bytes, cut: int) -> None:
    """Whatever follows a status line's start (or replaces part of a valid answer), nothing but
    :class:`ProtocolError` or :class:`Truncated` comes out (``int("²00")`` was a ``ValueError`` of its own)."""
    raw = OK + chunked(b"data: x\n\n")
    for stream in (b"HTTP/1.1 " + noise, raw[:cut % len(raw)] + noise, noise):
        with contextlib.suppress(ProtocolError, Truncated):
            decode(stream)


def test_equal_repeated_lengths_are_one_length() -> None:
    _, body, _ = decode(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", eof=False)
    assert body == b"ok"


def test_a_request_head_refuses_a_header_split_in_two() -> None:
    assert request_head("POST", "/v1/chat/completions", "h:1", {"Accept": "text/event-stream"}) == (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: h:1\r\nAccept: text/event-stream\r\nContent-Length: ")
    for fields in ({"Authorization": "Bearer k\r\nX-Evil: 1"}, {"Bad Name": "x"}, {"X": "nul\x00"}):
        with pytest.raises(ValueError, match="cannot be sent as it is"):
            request_head("POST", "/", "h", fields)
