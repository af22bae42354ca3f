"""The SSE decoder against the WHATWG rules, and any split of the input."""

from __future__ import annotations

from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsagent.core.sse import SSEDecoder, SSEError, SSEEvent


def decode(*chunks: bytes, max_event_size: int = 1 << 20) -> list[SSEEvent]:
    decoder = SSEDecoder(max_event_size)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def test_basic_event_and_done() -> None:
    events = decode(b'data: {"a":1}\n\ndata: [DONE]\n\n')
    assert [e.data for e in events] == ['{"a":1}', "[DONE]"]
    assert all(e.event == "message" and e.complete for e in events)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(newline: bytes) -> None:
    raw = b"data: one" + newline + newline + b"data: two" + newline + newline
    assert [e.data for e in decode(raw)] == ["one", "two"]


def test_mixed_line_endings_and_cr_lf_split_across_reads() -> None:
    events = decode(b"data: a\r", b"\n\r", b"\ndata: b\n\r", b"data: c\r\n\r\n")
    assert [e.data for e in events] == ["a", "b", "c"]


def test_lone_cr_at_end_of_read_then_other_line() -> None:
    assert [e.data for e in decode(b"data: x\r", b"\rdata: y\n\n")] == ["x", "y"]


def test_bom_stripped_once_and_split_utf8() -> None:
    raw = "\ufeffdata: héllo ✓\n\n".encode()
    assert [e.data for e in decode(*(raw[i:i + 1] for i in range(len(raw))))] == ["héllo ✓"]
    assert decode("\ufeff\ufeffdata: x\n\n".encode()) == []  # second BOM makes an unknown field


def test_comments_ignored() -> None:
    raw = b": ping\n: OPENROUTER PROCESSING\ndata: x\n: keep-alive\n\n"
    assert [e.data for e in decode(raw)] == ["x"]


def test_field_parsing_rules() -> None:
    raw = b"data:nospace\ndata:  two spaces\ndata\n\n"
    assert decode(raw)[0].data == "nospace\n two spaces\n"


def test_event_id_retry() -> None:
    raw = b"event: error\nid: 7\nretry: 1500\ndata: {}\n\nid: a\x00b\nretry: 15x\ndata: 2\n\n"
    first, second = decode(raw)
    assert (first.event, first.id, first.retry) == ("error", "7", 1500)
    assert (second.event, second.id, second.retry) == ("message", "7", 1500)


def test_unknown_fields_ignored_and_event_without_data_not_dispatched() -> None:
    assert decode(b"foo: bar\nevent: x\n\ndata: y\n\n") == [SSEEvent("y")]


def test_unterminated_final_event_is_reported_truncated() -> None:
    events = decode(b"data: a\n\ndata: partial")
    assert [(e.data, e.complete) for e in events] == [("a", True), ("partial", False)]


def test_long_line_without_limit_but_event_cap() -> None:
    big = b"data: " + b"x" * 3_000_000 + b"\n\n"
    assert len(decode(big, max_event_size=4_000_000)[0].data) == 3_000_000
    decoder = SSEDecoder(1000)
    with pytest.raises(SSEError, match="larger than 1000"):
        for start in range(0, len(big), 100):
            decoder.feed(big[start:start + 100])


# A valid stream: events made of fields, written with any line endings.
_SURROGATES: list[Literal["Cs"]] = ["Cs"]
_value = st.text(st.characters(exclude_categories=_SURROGATES, exclude_characters="\r\n\x00"), max_size=20)
_field = st.one_of(
    st.tuples(st.just("data"), _value),
    st.tuples(st.just("event"), _value),
    st.tuples(st.just("id"), _value),
    st.tuples(st.just("retry"), st.integers(0, 10**6).map(str)),
    st.tuples(st.just(""), _value),  # a comment
)
_event = st.lists(_field, min_size=1, max_size=5)
_newline = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    out = ["\ufeff"] if draw(st.booleans()) else []
    for fields in draw(st.lists(_event, max_size=6)):
        for name, value in fields:
            line = f":{value}" if name == "" else f"{name}: {value}" if draw(st.booleans()) else f"{name}:{value}"
            out.append(line + draw(_newline))
        out.append(draw(_newline))
    return "".join(out).encode()


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_gives_the_same_events(raw: bytes, cuts: list[int]) -> None:
    whole = decode(raw)
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    assert decode(*pieces) == whole
    assert decode(*(raw[i:i + 1] for i in range(len(raw)))) == whole
