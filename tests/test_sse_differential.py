"""Our SSE decoder against the official openai SDK's, on every captured transcript, at many byte splits.

They must agree on what real servers send. Where they differ on edge cases, ours follows the WHATWG
event-stream rules; the differences, each checked below, and none of them in the corpus:

* a block with fields but no ``data`` (``event: x``, or only ``id: 5``): the SDK dispatches an event
  with empty data; WHATWG (and we) dispatch nothing;
* a byte-order mark before the first field: WHATWG (and we) skip it; the SDK drops that line's field;
* bytes that are not UTF-8: we decode them with replacement characters, as WHATWG does; the SDK raises
  ``UnicodeDecodeError``;
* the SDK names an event with no ``event:`` field ``None``; we name it ``message``, as WHATWG does
  (``theirs`` maps ``None`` to ``message`` for the comparison).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder as SDKDecoder

from wsagent.core.sse import SSEDecoder

TRANSCRIPTS = sorted((Path(__file__).parent / "transcripts").glob("*.sse"))


def ours(pieces: list[bytes]) -> list[tuple[str, str]]:
    decoder = SSEDecoder()
    events = [e for piece in pieces for e in decoder.feed(piece)] + decoder.close()
    return [(e.event, e.data) for e in events if e.complete]


def theirs(pieces: list[bytes]) -> list[tuple[str, str]]:
    def chunks() -> Iterator[bytes]:
        yield from pieces

    return [(e.event or "message", e.data) for e in SDKDecoder().iter_bytes(chunks())]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.stem)
def test_both_decoders_agree_on_real_servers(path: Path) -> None:
    data = path.read_bytes()
    whole = theirs([data])
    assert whole and ours([data]) == whole
    for size in (1, 2, 3, 7, 64, 1000):
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        assert ours(pieces) == theirs(pieces) == whole, size


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(TRANSCRIPTS), st.lists(st.integers(min_value=0, max_value=10**6), max_size=12))
def test_both_decoders_agree_at_any_split(path: Path, cuts: list[int]) -> None:
    data = path.read_bytes()
    pieces = split(data, cuts)
    assert ours(pieces) == theirs(pieces)


@pytest.mark.parametrize(("stream", "expected"), [
    (b"event: x\n\n", []),
    (b"id: 5\n\n", []),
    (b"\xef\xbb\xbfdata: bom\n\n", [("message", "bom")]),
    (b"data: \xff\n\n", [("message", "\ufffd")]),
])
def test_where_they_differ_we_follow_whatwg(stream: bytes, expected: list[tuple[str, str]]) -> None:
    assert ours([stream]) == expected
    try:
        differs = theirs([stream]) != expected
    except UnicodeDecodeError:
        differs = True
    assert differs  # the day the SDK changes, this list is out of date
