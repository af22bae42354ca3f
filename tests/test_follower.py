"""Cluster mode's parts without Redis: the follower's transition table, its copy of a run's log, and the
control messages' codec (the parts over real Redis and real nodes: tests/test_cluster*.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from wsagent.core.events import Answer, Done, Start, Thinking, Token, ToolCallEvent
from wsagent.engine.cluster import messages
from wsagent.engine.cluster.follower import Follow, Mirror
from wsagent.engine.run import Run, RunStateError

from .helpers import Sink


class Node:
    """What a mirror asks of the node that follows it, recorded: the messages it sends its producer."""

    node = "b"

    def __init__(self) -> None:
        self.told: list[tuple[str, messages.Message]] = []
        self.unfollowed: list[Mirror] = []

    def tell(self, node: str, message: messages.Message) -> None:
        self.told.append((node, message))

    def unfollow(self, mirror: Mirror) -> None:
        self.unfollowed.append(mirror)


def mirror_of(producer: Run, node: Node) -> Mirror:
    meta = {"id": producer.id, "user": producer.user, "scope": producer.scope, "node": "a", "agent": None,
            "workflow": None, "grace": 0, "buffer": producer.buffer_bytes, "replay": producer.replay_bytes}
    return Mirror(node, producer.key, meta, producer.authors())


class Outlet:
    """What the cluster's replication does with a run's new entries, without Redis: hands them to a follower,
    in batches, lost ones included (the follower must notice the gap)."""

    def __init__(self, follower: Mirror, lose: set[int]) -> None:
        self.follower = follower
        self.lose = lose
        self.calls = 0
        self.seq = 0

    def dirty(self, run: Run) -> None:
        self.calls += 1
        first, codes, payloads = run.entries(self.seq)
        self.seq = first + len(codes) - 1
        if self.calls not in self.lose:
            self.follower.replicate(first, codes, payloads, run.authors() if run.author_count > 1 else None)


@settings(max_examples=200, deadline=None)
@given(
    script=st.lists(st.tuples(st.sampled_from(["token", "thinking", "answer", "tool"]),
                              st.text(min_size=1, max_size=6), st.sampled_from([None, "planner", "writer"])),
                    min_size=1, max_size=40),
    lose=st.sets(st.integers(2, 40), max_size=2),
)
@example(script=[("token", "a", None), ("token", "b", "planner"), ("token", "c", "planner")], lose={3})
async def test_a_follower_fed_the_producers_entries_gives_the_producers_frames(
        script: list[tuple[str, str, str | None]], lose: set[int]) -> None:
    """Another node's copy of a run (fed :meth:`Run.entries` batches, one per upstream read) renders the
    producer's frames byte for byte; past a lost batch it starts again where the next one begins, and a watcher
    behind that point is told it lags, never given a wrong frame."""
    producer = Run("r", key="k", buffer_bytes=10**9)
    follower = mirror_of(producer, Node())
    follower.history_read()
    outlet = Outlet(follower, lose)
    producer.outlet = outlet
    own, copy = Sink(), Sink()
    producer.subscribe(own, primary=True)
    follower.subscribe(copy)
    classes = {"token": Token, "thinking": Thinking, "answer": Answer}
    producer.push(Start("m", "k"))
    producer.wake()
    for kind, text, agent in script:
        if kind == "tool":
            producer.push(ToolCallEvent("c1", "lookup", text, agent=agent))
        else:
            producer.push(classes[kind](text, agent=agent))
        producer.wake()
    producer.end(Done("stop"))
    if outlet.calls in lose:  # nothing comes after the lost last batch: the follower reads the history
        follower.replicate(*producer.entries(producer.oldest_kept - 1), producer.authors())
    assert follower.finished and follower.outcome == "done" and follower.follow_state is Follow.ENDED
    if not outlet.lose & set(range(1, outlet.calls + 1)):
        assert copy.frames == own.frames
    else:
        last = json.loads(copy.frames[-1])
        assert last["type"] == "done" or last["code"] == "lagging"
        assert all(frame in own.frames for frame in copy.frames if '"lagging"' not in frame)
    late = Sink()  # attaches to the follower at the oldest entry it has: the producer's last frames
    follower.subscribe(late, follower.oldest_kept - 1)
    assert late.frames == own.frames[len(own.frames) - len(late.frames):]


def started(with_end: bool) -> tuple[Run, Mirror, Sink]:
    """A producer with two events (and its end), a mirror of it and one watcher of the mirror."""
    producer = Run("r", key="k")
    producer.push(Start("m", "k"))
    producer.push(Token("hi"))
    if with_end:
        producer.end(Done("stop"))
    mirror = mirror_of(producer, Node())
    watcher = Sink()
    mirror.subscribe(watcher)
    return producer, mirror, watcher


def history(producer: Run, mirror: Mirror) -> None:
    mirror.replicate(*producer.entries(0), producer.authors())
    mirror.history_read()


@pytest.mark.parametrize("with_end", [False, True])
def test_a_producer_gone_while_the_history_is_read_is_lost_unless_the_history_ends_it(with_end: bool) -> None:
    """A node that started again under the producer's id says it does not produce the run while this node
    reads the run's history: the run is lost (``producer_lost``, once) unless the history holds its end."""
    producer, mirror, watcher = started(with_end)
    mirror.gone()
    gone = mirror.follow_state
    assert gone is Follow.FILLING_GONE and not watcher.frames
    history(producer, mirror)
    events = watcher.events()
    assert [e["type"] for e in events] == ["start", "token", *(["usage", "done"] if with_end else ["error"])]
    if with_end:
        assert mirror.follow_state is Follow.ENDED and mirror.failed is None
    else:
        assert mirror.follow_state is Follow.FAILED and events[-1]["code"] == "producer_lost"
        assert "seq" not in events[-1]  # (its producer never sent it)


def test_a_failed_or_ended_mirror_takes_every_input_and_stays() -> None:
    producer, mirror, watcher = started(False)
    history(producer, mirror)
    mirror.fail("cluster_unavailable", "out of reach")
    for step in (mirror.gone, mirror.missed, mirror.lost_producer, mirror.history_read):
        step()
        assert mirror.follow_state is Follow.FAILED
    assert [e.get("code") for e in watcher.events() if e["type"] == "error"] == ["cluster_unavailable"]
    producer, mirror, watcher = started(True)
    history(producer, mirror)
    for step in (mirror.gone, mirror.missed, mirror.lost_producer, mirror.history_read):
        step()
        assert mirror.follow_state is Follow.ENDED
    assert watcher.events()[-1]["type"] == "done"


def test_the_following_table_refuses_a_history_read_while_live() -> None:
    """A mirror reads its history only while FILLING (a gap or a resubscribe puts it there first)."""
    producer, mirror, _ = started(False)
    history(producer, mirror)
    with pytest.raises(RunStateError):
        mirror.history_read()
    mirror.missed()
    assert mirror.filling
    history(producer, mirror)
    assert mirror.follow_state is Follow.LIVE


def test_the_mirror_passes_its_own_clients_arrival_departure_and_cancel_to_the_producer() -> None:
    producer = Run("r", key="k")
    producer.push(Start("m", "k"))
    node = Node()
    mirror = mirror_of(producer, node)
    history(producer, mirror)
    sub = mirror.subscribe(Sink(), primary=True)
    mirror.cancel("cancelled by client")
    mirror.unsubscribe(sub)
    (_, adopt), (_, cancel), (_, leave) = node.told
    assert isinstance(adopt, messages.Adopt) and isinstance(leave, messages.Leave) and adopt.holder == leave.holder
    assert cancel == messages.Cancel("k", "cancelled by client")
    assert node.unfollowed == [mirror]


text = st.text(alphabet=st.characters(codec=None), max_size=8)  # lone surrogates and ':' included
MESSAGES = st.one_of(
    st.builds(messages.Cancel, text, text), st.builds(messages.Forget, text), st.builds(messages.Follow, text, text),
    st.builds(messages.Unfollow, text, text), st.builds(messages.Gone, text), st.builds(messages.Hello, text),
    st.builds(messages.Adopt, text, text), st.builds(messages.Leave, text, text),
    st.builds(messages.Evict, text, text), st.builds(messages.Send, text, text),
    st.builds(messages.AskCancel, text, text, text, text), st.builds(messages.AskSnapshot, text, text, text),
    st.builds(messages.AskCancelAgent, text, text, text, text),
    st.builds(messages.Answer, text, st.one_of(st.none(), st.booleans(), st.lists(st.dictionaries(text, text)))),
)


@given(MESSAGES)
def test_every_control_message_comes_back_as_it_went(message: messages.Message) -> None:
    data = messages.encode(message)
    data.encode()  # (what Redis carries: UTF-8, whatever the fields hold)
    assert messages.decode(data) == message


def test_a_notice_and_a_question_that_share_an_op_are_different_types() -> None:
    notice = messages.decode('{"op": "cancel", "key": "k", "reason": "r"}')
    question = messages.decode('{"op": "cancel", "key": "k", "reason": "r", "ask": "1", "from": "a"}')
    assert notice == messages.Cancel("k", "r")
    assert question == messages.AskCancel("1", "a", "k", "r")


@pytest.mark.parametrize("data", ["", "nope", "[]", "{}", '{"op": "cancel"}',
                                  '{"op": "cancel", "key": 1, "reason": "r"}',
                                  '{"op": "evict", "client": "c"}', '{"op": 7}', '{"op": "reboot", "node": "a"}'])
def test_a_message_that_is_none_of_ours_is_ignored(data: Any) -> None:
    assert messages.decode(data) is None
