"""One wire encoding: the relay's fast path for text deltas writes exactly what ``encode`` writes."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from wsagent.core import events
from wsagent.core.events import (
    Answer,
    Refusal,
    TextEvent,
    Thinking,
    Token,
    encode,
    encode_text,
    json_bytes,
)
from wsagent.core.render import TextMode

TEXT_EVENTS = [Token, Thinking, Refusal, Answer]
names = st.none() | st.text(max_size=12)


@given(st.sampled_from(TEXT_EVENTS), st.text(max_size=40), st.text(min_size=1, max_size=12),
       st.integers(min_value=1, max_value=2**40), names, names)
def test_a_text_delta_encodes_as_its_event_does(cls: type[TextEvent], content: str, run_id: str, seq: int,
                                                agent: str | None, workflow: str | None) -> None:
    event = cls(content, agent=agent, workflow=workflow)
    frame = encode_text(cls, content, run_id, seq, agent, workflow)
    assert frame == encode(event, run_id, seq)
    assert json.loads(frame)["content"] == content


JSON = st.recursive(st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@given(JSON)
def test_a_frame_is_the_same_text_whichever_encoder_writes_it(value: object) -> None:
    """orjson (the ``fast`` extra) and the standard library write what frames hold to the same text."""
    frame = {"type": "usage", "id": "r", "seq": 1, "value": value}
    assert events._dumps(frame) == events._std_dumps(frame)
    assert json.loads(json_bytes(frame)) == frame


def test_what_orjson_refuses_the_standard_library_writes() -> None:
    for value in ("half \ud83d of an emoji", 2**70):
        frame = {"type": "tool_result", "value": value}
        assert events._dumps(frame) == events._std_dumps(frame)
        assert json.loads(json_bytes(frame)) == frame


def test_text_mode_shows_answer_tokens_only() -> None:
    shown: list[str] = []
    for cls in TEXT_EVENTS:
        TextMode().render(cls.kind, cls.type, shown, (None, None))
    assert shown == ["token"]
