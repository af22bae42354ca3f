"""``/ws/ai-sdk`` with the real client: the AI SDK's ``WebSocketChatTransport`` and ``readUIMessageStream``
(npm ``ai``, pinned in package.json, installed by ``npm ci``) driven by ``tests/ai_sdk/drive.mjs`` against
a running wsagent and the simulator; bad input with a plain ``websockets`` client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from wsagent.core.chunks import TextDelta
from wsagent.core.errors import ProtocolViolation
from wsagent.core.ui_stream import approval_responses
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from .helpers import SECRET, ServerFactory, drive_at, local_broker, recv_json, token, upstream_for, ws_connect


async def drive(server: WsAgentServer, *steps: dict[str, Any], **transport: Any) -> list[dict[str, Any]]:
    """Run the steps in Node with the AI SDK's transport; what each step saw."""
    return await drive_at(f"{server.url}/ws/ai-sdk", *steps, **transport)


async def expected(sim: SimulatorServer, prompt: str) -> tuple[str, str]:
    """The simulator's deterministic (reasoning, answer) for ``prompt``."""
    client = upstream_for(sim)
    parts: dict[str, list[str]] = {"reasoning": [], "content": []}
    async for event in client.stream([{"role": "user", "content": prompt}]):
        if isinstance(event, TextDelta) and event.kind in parts:
            parts[event.kind].append(event.text)
    await client.close()
    return "".join(parts["reasoning"]), "".join(parts["content"])


def parts_of(message: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [p for p in message["parts"] if p["type"] == kind]


async def test_a_turn_streams_text_reasoning_and_usage(server: WsAgentServer, sim: SimulatorServer) -> None:
    (seen,) = await drive(server, {"kind": "send", "chatId": "chat-text-0123456789", "text": "tell me about streams"})
    thought, answer = await expected(sim, "tell me about streams")
    message = seen["message"]
    assert seen["error"] is None and message["role"] == "assistant" and message["id"].startswith("msg-")
    assert [p["type"] for p in message["parts"]] == ["step-start", "reasoning", "text"]
    assert parts_of(message, "reasoning")[0]["text"] == thought and parts_of(message, "text")[0]["text"] == answer
    assert all(p.get("state") == "done" for p in message["parts"][1:])
    usage = message["metadata"]["usage"]
    assert message["metadata"]["model"] == "wsagent-sim" and usage["outputTokens"] > 0 and usage["inputTokens"] > 0
    types = seen["types"]
    assert types[:2] == ["start", "start-step"] and types[-2:] == ["finish-step", "finish"]
    # the run merges what its client has not taken: far fewer text deltas than the model's 24 tokens may be
    assert 1 <= types.count("text-delta") <= 24


async def test_agent_tools_and_steps(server: WsAgentServer) -> None:
    (seen,) = await drive(server, {"kind": "send", "chatId": "chat-agent-0123456789", "text": "What is 6 * 7?",
                                   "body": {"agent": "assistant"}})
    message = seen["message"]
    (tool,) = parts_of(message, "dynamic-tool")
    assert tool["toolName"] == "calculator" and tool["state"] == "output-available"
    assert tool["input"] == {"expression": "6 * 7"} and tool["output"] == "6 * 7 = 42"
    assert parts_of(message, "step-start") and len(parts_of(message, "step-start")) == 2
    assert parts_of(message, "text")[-1]["text"] == "Based on the tool results: 6 * 7 = 42."
    assert parts_of(message, "text")[-1]["providerMetadata"] == {"wsagent": {"agent": "assistant"}}


async def test_workflow_agents_are_attributed(server: WsAgentServer) -> None:
    (seen,) = await drive(server, {"kind": "send", "chatId": "chat-flow-0123456789", "text": "Analyze TSLA",
                                   "body": {"workflow": "market-analysis"}})
    message = seen["message"]
    agents = {"market-researcher", "financial-analyst", "technical-analyst"}
    status = {p["data"]["agent"]: p["data"]["status"] for p in parts_of(message, "data-agent")}
    assert status == dict.fromkeys(agents, "done")
    texts = parts_of(message, "text")
    assert {p["providerMetadata"]["wsagent"]["agent"] for p in texts} == agents
    assert all(p["text"] for p in texts) and seen["error"] is None
    assert message["metadata"]["workflow"] == "market-analysis"


async def test_an_upstream_error_is_plain_text(server: WsAgentServer) -> None:
    (seen,) = await drive(server, {"kind": "send", "chatId": "chat-err-0123456789",
                                   "text": "fail sim:error_after=3 sim:reasoning=0"})
    assert seen["error"] == "simulated mid-stream failure"
    assert parts_of(seen["message"], "text")[0]["text"] == "here is a"
    assert "error" in seen["types"] and "finish" not in seen["types"]


async def test_stop_aborts_the_run_and_the_model_request(server: WsAgentServer, sim: SimulatorServer) -> None:
    (seen,) = await drive(server, {"kind": "abort", "chatId": "chat-stop-0123456789", "after": 3,
                                   "text": "go on sim:rate=50 sim:tokens=100000 sim:reasoning=0"})
    assert seen["probe"] == "no-active" and seen["error"] is None
    await sim.simulator.stats.wait_for(lambda s: s.disconnected == 1 and s.active == 0, 5)
    assert sim.simulator.stats.completed == 0
    (run,) = [r for r in local_broker(server) if r.id == "ai-sdk:chat-stop-0123456789"]
    await asyncio.wait_for(run.wait(), 5)
    assert run.outcome == "cancelled"


async def test_resume_after_the_socket_dropped(server: WsAgentServer, sim: SimulatorServer) -> None:
    prompt = "resume me sim:rate=100 sim:tokens=60"
    (seen,) = await drive(server, {"kind": "resume", "chatId": "chat-resume-0123456789", "text": prompt,
                                   "after": 3})
    assert sim.simulator.stats.streams == 1  # resumed, not asked again
    _, answer = await expected(sim, prompt)
    before, after = seen["before"], seen["after"]
    assert after is not None and after["error"] is None
    assert after["message"]["id"] == before["message"]["id"]  # Chat replaces its partial message
    assert parts_of(after["message"], "text")[0]["text"] == answer
    assert answer.startswith(parts_of(before["message"], "text")[0]["text"])
    assert after["types"][:2] == ["start", "start-step"] and after["types"][-1] == "finish"


async def test_no_active_and_two_chats_on_one_socket(server: WsAgentServer, sim: SimulatorServer) -> None:
    unknown, two = await drive(
        server, {"kind": "noActive", "chatId": "chat-nobody-0123456789"},
        {"kind": "two", "chats": [{"chatId": "chat-a-0123456789", "text": "first sim:tokens=30"},
                                  {"chatId": "chat-b-0123456789", "text": "second sim:tokens=20"}]})
    assert unknown["resumed"] is None
    first, second = two["results"]
    assert parts_of(first["message"], "text")[0]["text"] == (await expected(sim, "first sim:tokens=30"))[1]
    assert parts_of(second["message"], "text")[0]["text"] == (await expected(sim, "second sim:tokens=20"))[1]


async def test_a_token_in_a_bearer_subprotocol(make_server: ServerFactory) -> None:
    """Browsers cannot set headers: the transport offers ``wsagent`` and ``bearer.<jwt>``."""
    server = await make_server(jwt_secret=SECRET, require_auth=True)
    (seen,) = await drive(server, {"kind": "send", "chatId": "chat-auth-0123456789", "text": "hello"},
                          protocols=["wsagent", f"bearer.{token()}"])
    assert seen["error"] is None and parts_of(seen["message"], "text")
    (run,) = [r for r in local_broker(server) if r.id == "ai-sdk:chat-auth-0123456789"]
    assert run.user == "alice"


# A person in the loop: the real ``Chat`` (useChat's class) with ``sendAutomaticallyWhen:
# lastAssistantMessageIsCompleteWithApprovalResponses``, answering with ``addToolApprovalResponse``.

QUESTION = "What is (2 + 3) * 7?"
ASSISTANT = {"agent": "assistant"}


async def approval(server: WsAgentServer, chat_id: str, approved: bool, reason: str | None = None,
                   **step: Any) -> dict[str, Any]:
    """Ask ``QUESTION`` of the assistant in a Chat; answer its approval request; what the chat held."""
    decision: dict[str, Any] = {"approved": approved} | ({"reason": reason} if reason is not None else {})
    (seen,) = await drive(server, {"kind": "approval", "chatId": chat_id, "text": QUESTION, "body": ASSISTANT,
                                   "decisions": [decision], **step})
    return seen


def requested_call(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The tool part of the chat's last message (the assistant's), waiting for its approval."""
    assert [m["role"] for m in messages] == ["user", "assistant"]
    (tool,) = parts_of(messages[-1], "dynamic-tool")
    assert tool["state"] == "approval-requested" and tool["toolName"] == "calculator"
    assert tool["input"] == {"expression": "(2 + 3) * 7"} and tool["approval"] == {"id": tool["toolCallId"]}
    return tool


def answered(seen: dict[str, Any], message_id: str) -> tuple[dict[str, Any], str]:
    """The answered tool part and the text after it, checking the answer continued the same one message."""
    assert seen["error"] is None and seen["status"] == "ready" and seen["answered"] == 1
    messages = seen["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # one assistant message, continued
    message = messages[-1]
    assert message["id"] == message_id
    (tool,) = parts_of(message, "dynamic-tool")
    texts = [i for i, p in enumerate(message["parts"]) if p["type"] == "text"]
    assert len(texts) == 1 and texts[0] > message["parts"].index(tool)  # the text follows the tool part
    # addToolApprovalResponse's automatic send: the assistant message, its part approval-responded
    send = seen["sent"][-1]
    assert send["type"] == "send" and send["trigger"] == "submit-message" and send["messageId"] == message_id
    assert [p["state"] for p in send["last"]] == ["approval-responded"]
    request, continued = seen["responses"]  # the response that stopped at the request (or its replay), and the rest
    assert request[-3:] == ["tool-approval-request", "finish-step", "finish"]
    assert continued[:2] == ["start", "tool-approval-response"] and continued[-1] == "finish"
    # the approved tool's output belongs to the step that called it (as streamText puts it): no empty step
    assert len(parts_of(message, "step-start")) == 2
    return tool, message["parts"][texts[0]]["text"]


async def test_approve_a_tool_call_and_the_message_goes_on(make_server: ServerFactory, sim: SimulatorServer,
                                                           ) -> None:
    server = await make_server(approval_tools=("calculator",))
    seen = await approval(server, "chat-approve-0123456789", approved=True)
    assert seen["firstError"] is None and seen["resumed"] is None
    call = requested_call(seen["requested"])
    tool, text = answered(seen, seen["requested"][-1]["id"])
    assert tool["toolCallId"] == call["toolCallId"] and tool["state"] == "output-available"
    assert tool["output"] == "(2 + 3) * 7 = 35" and tool["approval"] == {"id": call["toolCallId"], "approved": True}
    assert text == "Based on the tool results: (2 + 3) * 7 = 35."
    assert "tool-output-available" in seen["responses"][1] and "tool-output-denied" not in seen["responses"][1]
    assert seen["statuses"] == ["ready", "submitted", "streaming", "ready", "submitted", "streaming", "ready"]
    (run,) = [r for r in local_broker(server) if r.id == "ai-sdk:chat-approve-0123456789"]
    assert run.outcome == "done"
    assert sim.simulator.stats.streams == 2  # the call, then the answer: one run, continued


async def test_deny_a_tool_call_with_a_reason(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",))
    seen = await approval(server, "chat-deny-0123456789", approved=False, reason="not now")
    call = requested_call(seen["requested"])
    tool, text = answered(seen, seen["requested"][-1]["id"])
    assert tool["state"] == "output-denied" and "output" not in tool
    assert tool["approval"] == {"id": call["toolCallId"], "approved": False, "reason": "not now"}
    assert "denied the call to calculator: not now" in text  # the model was told
    assert "tool-output-denied" in seen["responses"][1] and "tool-output-available" not in seen["responses"][1]


@pytest.mark.parametrize("keep", ["all", "user"])
async def test_approve_after_a_page_reload(make_server: ServerFactory, sim: SimulatorServer, keep: str) -> None:
    """The page goes while the approval waits; a new Chat with the chat's id resumes it (``resume: true``), gets
    the request back and answers it there. ``keep``: the messages the new page starts from (a page that stores
    them all, or only the user's)."""
    server = await make_server(approval_tools=("calculator",))
    chat = f"chat-reload-{keep}-0123456789"
    seen = await approval(server, chat, approved=True, reload=True, keep=keep)
    call = requested_call(seen["requested"])
    resumed = seen["resumed"]
    assert resumed["error"] is None and resumed["status"] == "ready"
    assert requested_call(resumed["messages"]) == call  # replayed up to the pending request, stopping there
    assert resumed["messages"][-1]["id"] == seen["requested"][-1]["id"]
    assert seen["sent"][0] == {"type": "resume"}
    tool, text = answered(seen, seen["requested"][-1]["id"])
    assert tool["state"] == "output-available" and tool["output"] == "(2 + 3) * 7 = 35"
    assert text == "Based on the tool results: (2 + 3) * 7 = 35."
    assert sim.simulator.stats.streams == 2  # resumed from wsagent, not asked again


async def test_approve_after_a_reload_of_a_page_that_kept_no_messages(make_server: ServerFactory) -> None:
    """A page that does not store its messages: after the reload its chat holds only the replayed message."""
    server = await make_server(approval_tools=("calculator",))
    seen = await approval(server, "chat-reload-none-0123456789", approved=True, reload=True, keep="none")
    assert [m["role"] for m in seen["resumed"]["messages"]] == ["assistant"]
    assert seen["error"] is None
    (tool,) = parts_of(seen["messages"][-1], "dynamic-tool")
    assert tool["state"] == "output-available"


def send_frame(request_id: str, chat_id: str, messages: Any, **extra: Any) -> str:
    return json.dumps({"type": "send", "requestId": request_id, "id": chat_id, "trigger": "submit-message",
                       "messages": messages, "headers": {}, "body": {}, **extra})


def user(text: str) -> list[dict[str, Any]]:
    return [{"id": "u", "role": "user", "parts": [{"type": "text", "text": text}]}]


async def test_bad_requests_get_an_error_for_their_request_only(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        await ws.send(send_frame("good", "chat-good-0123456789", user("long one sim:rate=100 sim:tokens=40")))
        refused = {
            "parts": send_frame("p", "c1", [{"id": "u", "role": "user", "parts": [{"type": "video", "url": "x"}]}]),
            "role": send_frame("r", "c2", [{"id": "u", "role": "robot", "parts": []}]),
            "many": send_frame("m", "c3", user("x") * 1001),
            "trigger": send_frame("t", "c4", user("x"), trigger="reload"),
            "kind": json.dumps({"type": "subscribe", "requestId": "k", "id": "c5"}),
            "params": send_frame("q", "c6", user("x"), body={"params": {"api_key": "x"}}),
            "model": send_frame("o", "c7", user("x"), body={"model": "gpt-5"}),
        }
        for request in refused.values():
            await ws.send(request)
        errors: dict[str, str] = {}
        chunks = 0
        while True:
            frame = await recv_json(ws)
            if frame["type"] == "error":
                errors[frame["requestId"]] = frame["errorText"]
            elif frame["requestId"] == "good":
                chunks += frame["type"] == "chunk"
                if frame["type"] == "end":
                    break
    assert errors == {
        "p": "unknown part type 'video' in a user message",
        "r": "each message needs a role: system, user or assistant",
        "m": "too many messages: 1001, at most 1000",
        "t": "'trigger' must be submit-message or regenerate-message",
        "k": "unknown frame type 'subscribe': send, resume or abort",
        "q": "unsupported params: api_key",
        "o": "model 'gpt-5' may not be chosen here; ask without 'model' for 'wsagent-sim', or see --allowed-models",
    }
    assert chunks > 5  # the good chat streamed to its end beside them


@pytest.mark.parametrize(("frame", "code"), [("not json", 1008), ('{"type": "send"}', 1008), (b"\x00", 1003)])
async def test_frames_that_name_no_request_close_the_socket(server: WsAgentServer, frame: str | bytes,
                                                           code: int) -> None:
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        await ws.send(frame)
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code


async def test_another_users_chat_cannot_be_resumed(make_server: ServerFactory) -> None:
    server = await make_server(jwt_secret=SECRET)
    chat = "chat-private-0123456789"
    async with ws_connect(server, f"/ws/ai-sdk?token={token()}") as alice:
        await alice.send(send_frame("a", chat, user("mine sim:rate=100 sim:tokens=200")))
        assert (await recv_json(alice))["type"] == "chunk"
        async with ws_connect(server, f"/ws/ai-sdk?token={token({'user_id': 'mallory'})}") as mallory, \
                ws_connect(server, "/ws/ai-sdk") as anonymous:
            for ws in (mallory, anonymous):
                await ws.send(json.dumps({"type": "resume", "requestId": "x", "id": chat, "headers": {}, "body": {}}))
                assert await recv_json(ws) == {"type": "no-active", "requestId": "x"}
                await ws.send(json.dumps({"type": "abort", "requestId": "a"}))
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["type"] != "end":
            frames.append(await recv_json(alice))
    assert frames[-2]["chunk"]["type"] == "finish"  # their aborts touched nothing


def test_approval_answers_are_held_to_the_json_protocols_bounds() -> None:
    """Found by the outside attack: an AI SDK answer's reason of 900 KB reached the log, Redis and the model's
    prompt, and an approval id of 500 KB came back in full in an error. The bounds are /ws/chat's approve's."""
    def answered(approval: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "hi"}]},
                {"id": "m", "role": "assistant", "parts": [
                    {"type": "dynamic-tool", "toolName": "calculator", "toolCallId": "c1", "input": {},
                     "state": "approval-responded", "approval": approval}]}]

    assert approval_responses(answered({"id": "c1", "approved": False, "reason": "no"})) == [("c1", False, "no")]
    for bad in ({"id": "c1", "approved": False, "reason": "R" * 1001}, {"id": "x" * 129, "approved": True},
                {"id": "", "approved": True}, {"id": "c1", "approved": "yes"}, {"id": "c1", "approved": True,
                                                                                 "reason": 7}):
        with pytest.raises(ProtocolViolation) as refused:
            approval_responses(answered(bad))
        assert len(refused.value.message) < 200
