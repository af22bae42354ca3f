"""The Vercel AI SDK's WebSocket chat transport, sans I/O: UI messages in, UI message chunks out.

``WebSocketChatTransport`` (npm ``ai`` 7) sends ``send``, ``resume`` and
``abort`` frames and expects ``start``, ``chunk`` (a ``sequence`` from 0 and
one ``UIMessageChunk``), ``end``, ``error`` and ``no-active`` back. This module
holds the two conversions the route (:mod:`wsagent.handlers.ai_sdk`) needs, with no
I/O: :func:`chat_messages` turns the chat's UI messages into OpenAI chat
messages, and :class:`UIChunks` renders a run's log (:mod:`wsagent.core.render`)
as transport frames for one request.

What maps to what (docs/ai-sdk.md has the table too):

* ``start`` → ``start`` (a ``messageId`` stable for the run, the model in
  ``messageMetadata``) and ``start-step``;
* ``token``/``answer``/``refusal`` → ``text-start``/``text-delta``/``text-end``
  (a delta may carry several model deltas: a run merges what its client has
  not taken yet); ``thinking`` → ``reasoning-start``/``-delta``/``-end``;
* a model's ``tool_call`` → ``tool-input-start``/``-delta``/``-available``
  (the client's own tools: its ``onToolCall`` runs them); an agent's
  ``action`` → the same with ``dynamic: true`` (a server-side tool), and its
  ``observation`` → ``tool-output-available`` or ``tool-output-error``, then
  a new step;
* a workflow's agents: each agent's text and reasoning are parts of their own,
  with ``providerMetadata.wsagent.agent`` naming the agent, and a
  ``data-agent`` part (``{agent, workflow, status}``) per agent, updated from
  ``running`` to how it ended;
* an ``approval_request`` → the tool's input chunks and ``tool-approval-request``
  (``approvalId`` is the ``call_id``), and the response ends there
  (``finish``, then ``end``: :meth:`UIChunks.pause`) while the run waits;
  ``addToolApprovalResponse`` and the next ``send`` answer it, and that
  request continues the same assistant message (``UIChunks(...,
  continues=...)``): ``approval`` → ``tool-approval-response`` (and, denied,
  ``tool-output-denied``), then the tool's output and the rest;
* ``steer`` → a ``data-steer`` part (``{content, delivered, reason}``);
* ``usage`` → ``finish``'s ``messageMetadata.usage``; ``done`` → ``finish``
  with its finish reason; ``error`` → ``error`` with the plain message;
  ``cancelled`` → ``abort``; each then ``end``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .errors import ProtocolViolation
from .events import KIND_NAMES, well_formed_json
from .person import MAX_REASON
from .render import Author

__all__ = ["UIChunks", "chat_messages", "approval_responses", "last_user_text", "message_id", "MAX_MESSAGES",
           "MAX_PARTS"]

#: What one ``send`` may carry (the chat's whole history).
MAX_MESSAGES = 1000
MAX_PARTS = 4000
#: An approval's id, as ``approve`` on ``/ws/chat`` bounds a call id.
MAX_ID = 128

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_quote = json.encoder.encode_basestring
_NAMES = KIND_NAMES
_TOKEN, _THINKING, _REFUSAL, _ANSWER = (KIND_NAMES.index(n) for n in ("token", "thinking", "refusal", "answer"))
_APPROVAL_REQUEST = KIND_NAMES.index("approval_request")
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool-calls", "content_filter": "content-filter",
           "function_call": "tool-calls"}


def message_id(run_key: str) -> str:
    """The assistant message's id for the run with ``run_key``: the same on every replay (a resumed
    chat replaces its partial message), and telling nothing of the key."""
    return "msg-" + hashlib.blake2b(run_key.encode(), digest_size=12).hexdigest()


class UIChunks:
    """One transport request's view of a run: each log entry as ``chunk`` frames, then ``end``.

    A :class:`~wsagent.core.render.Renderer`; the sequence numbers start at 0 for each
    request, so a resume (a new request) replays the run from its first chunk.
    """

    __slots__ = ("_prefix", "_end", "_message_id", "sequence", "_text", "_reasoning", "_parts", "_steps",
                 "_usage", "_model", "_metadata", "_agents", "_announced", "_quiet", "_steers", "_step_due")

    def __init__(self, request_id: str, message: str, continues: frozenset[str] = frozenset()) -> None:
        """``continues``: the call ids of the approval requests this request answered. It renders nothing
        until the last of them (the previous request showed all that), then continues that message."""
        self._prefix = '{"type":"chunk","requestId":' + _quote(request_id) + ',"sequence":'
        self._end = '{"type":"end","requestId":' + _quote(request_id) + "}"
        self._message_id = message
        self.sequence = 0
        self._text: dict[Author, str] = {}
        self._reasoning: dict[Author, str] = {}
        self._parts = 0
        self._steps = True  # observations start new steps (not in a workflow: its agents interleave)
        self._usage: dict[str, Any] | None = None
        self._model: str | None = None
        self._metadata: dict[str, Any] = {}  # the start's (a continued message starts with it again)
        self._agents: set[str] = set()
        self._announced: set[str] = set()  # calls whose input the client has (with their approval request)
        self._quiet = set(continues)
        self._steers = 0
        self._step_due = False  # a continued message: its next model output starts a step (its tool outputs do not)

    def _chunk(self, out: list[str], chunk: str) -> None:
        out.append(f'{self._prefix}{self.sequence},"chunk":{chunk}}}')
        self.sequence += 1

    def _emit(self, out: list[str], chunk: dict[str, Any]) -> None:
        self._chunk(out, _dumps(chunk))

    def render(self, kind: int, payload: str, out: list[str], author: Author) -> None:
        if self._quiet:
            self._catch_up(kind, payload, out, author)
        elif kind == _TOKEN or kind == _ANSWER or kind == _REFUSAL:
            part = self._text.get(author)
            if part is None:
                part = self._open(out, "text", author)
            self._chunk(out, f'{{"type":"text-delta","id":"{part}","delta":{_quote(payload)}}}')
        elif kind == _THINKING:
            part = self._reasoning.get(author)
            if part is None:
                part = self._open(out, "reasoning", author)
            self._chunk(out, f'{{"type":"reasoning-delta","id":"{part}","delta":{_quote(payload)}}}')
        else:
            self._event(_NAMES[kind], json.loads(payload), out)

    def _catch_up(self, kind: int, payload: str, out: list[str], author: Author) -> None:
        """Render for nobody (keeping the renderer's state) up to the last approval request this
        request answers; then start the continued message."""
        quiet, self._quiet = self._quiet, set()
        self.render(kind, payload, [], author)
        self._quiet = quiet
        if kind == _APPROVAL_REQUEST:
            quiet.discard(json.loads(payload)["call_id"])
            if not quiet:
                self.sequence = 0
                self._close([])
                self._start(out, step=False)
                self._step_due = True

    def pause(self, out: list[str]) -> None:
        """The run waits for approvals: this response ends (``finish`` with reason ``tool-calls``), so that
        ``useChat`` is ready for ``addToolApprovalResponse``, whose next ``send`` continues the message."""
        self._close(out)
        self._chunk(out, '{"type":"finish-step"}')
        final: dict[str, Any] = {"model": self._model} if self._model else {}
        self._emit(out, {"type": "finish", "finishReason": "tool-calls", "messageMetadata": final})
        out.append(self._end)

    def steered(self, out: list[str], content: str) -> None:
        """This request's message went to the chat's running agent (``on_busy`` steer): a transient
        ``data-steer`` chunk says so, and the request ends; the delivery shows in the agent's response."""
        self._emit(out, {"type": "data-steer", "data": {"content": content, "status": "sent"}, "transient": True})
        self._chunk(out, '{"type":"finish"}')
        out.append(self._end)

    def _start(self, out: list[str], step: bool = True) -> None:
        self._emit(out, {"type": "start", "messageId": self._message_id, "messageMetadata": self._metadata})
        if step:
            self._chunk(out, '{"type":"start-step"}')

    def _step(self, out: list[str]) -> None:
        """The step a continued message's model output opens (as ``streamText`` puts the approved tools'
        outputs before its first step)."""
        if self._step_due:
            self._step_due = False
            self._chunk(out, '{"type":"start-step"}')

    def _open(self, out: list[str], kind: str, author: Author) -> str:
        """Start a text or reasoning part for ``author`` (closing its part of the other kind)."""
        self._step(out)
        other = self._reasoning if kind == "text" else self._text
        if author in other:
            self._emit(out, {"type": f"{'reasoning' if kind == 'text' else 'text'}-end", "id": other.pop(author)})
        self._agent_seen(out, author)
        self._parts += 1
        part = f"{kind[0]}{self._parts}"
        (self._text if kind == "text" else self._reasoning)[author] = part
        chunk: dict[str, Any] = {"type": f"{kind}-start", "id": part}
        if author[0] is not None:
            chunk["providerMetadata"] = {"wsagent": {"agent": author[0]}}
        self._emit(out, chunk)
        return part

    def _agent_seen(self, out: list[str], author: Author) -> None:
        agent, workflow = author
        if agent is not None and workflow is not None and agent not in self._agents:
            self._agents.add(agent)
            self._emit(out, {"type": "data-agent", "id": f"agent-{agent}",
                             "data": {"agent": agent, "workflow": workflow, "status": "running"}})

    def _close(self, out: list[str], author: Author | None = None) -> None:
        """End the open text and reasoning parts (of ``author``, or all)."""
        for kind, parts in (("text", self._text), ("reasoning", self._reasoning)):
            for key in [k for k in parts if author is None or k == author]:
                self._emit(out, {"type": f"{kind}-end", "id": parts.pop(key)})

    def _event(self, name: str, fields: dict[str, Any], out: list[str]) -> None:
        author: Author = (fields.get("agent"), fields.get("workflow"))
        if name == "start":
            self._model = fields.get("model")
            self._steps = fields.get("workflow") is None
            self._metadata = {k: fields[k] for k in ("model", "agent", "workflow") if fields.get(k) is not None}
            self._start(out)
        elif name == "action" and fields.get("call_id", "") in self._announced:
            pass  # its input went out with its approval request
        elif name in ("tool_call", "action", "approval_request"):
            self._step(out)
            self._close(out, author)
            self._agent_seen(out, author)
            call_id, tool, arguments = fields.get("call_id", ""), fields.get("name", ""), fields.get("arguments", "")
            dynamic = {"dynamic": True} if name != "tool_call" else {}
            self._emit(out, {"type": "tool-input-start", "toolCallId": call_id, "toolName": tool, **dynamic})
            if arguments:
                self._emit(out, {"type": "tool-input-delta", "toolCallId": call_id, "inputTextDelta": arguments})
            self._emit(out, {"type": "tool-input-available", "toolCallId": call_id, "toolName": tool,
                             "input": _parsed(arguments), **dynamic})
            if name == "approval_request":
                self._announced.add(call_id)
                self._emit(out, {"type": "tool-approval-request", "approvalId": call_id, "toolCallId": call_id})
        elif name == "approval":
            call_id = fields.get("call_id", "")
            response: dict[str, Any] = {"type": "tool-approval-response", "approvalId": call_id,
                                        "approved": bool(fields.get("approved"))}
            if fields.get("reason"):
                response["reason"] = fields["reason"]
            self._emit(out, response)
            if not fields.get("approved"):
                self._emit(out, {"type": "tool-output-denied", "toolCallId": call_id})
        elif name == "steer":
            self._steers += 1
            data = {k: fields.get(k) for k in ("content", "delivered", "reason") if fields.get(k) is not None}
            self._emit(out, {"type": "data-steer", "id": f"steer-{self._steers}", "data": data})
        elif name == "observation":
            call_id = fields.get("call_id", "")
            if fields.get("is_error"):
                self._emit(out, {"type": "tool-output-error", "toolCallId": call_id,
                                 "errorText": fields.get("content", ""), "dynamic": True})
            else:
                self._emit(out, {"type": "tool-output-available", "toolCallId": call_id,
                                 "output": fields.get("content", ""), "dynamic": True})
            if self._steps:
                self._step_due = False
                self._close(out)
                self._chunk(out, '{"type":"finish-step"}')
                self._chunk(out, '{"type":"start-step"}')
        elif name == "usage":
            usage = self._usage or {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0}
            usage["inputTokens"] += fields.get("prompt_tokens", 0)
            usage["outputTokens"] += fields.get("completion_tokens", 0)
            usage["totalTokens"] += fields.get("total_tokens", 0)
            if fields.get("estimated"):
                usage["estimated"] = True
            self._usage = usage
        elif name == "agent_end":
            self._close(out, author)
            agent = fields.get("agent")
            if agent is not None:
                self._agents.add(agent)
                data = {"agent": agent, "workflow": fields.get("workflow"), "status": fields.get("outcome", "done")}
                if fields.get("message"):
                    data["message"] = fields["message"]
                self._emit(out, {"type": "data-agent", "id": f"agent-{agent}", "data": data})
        elif name in ("done", "error", "cancelled"):
            self._close(out)
            if name == "done":
                self._chunk(out, '{"type":"finish-step"}')
                final: dict[str, Any] = {"model": self._model} if self._model else {}
                if self._usage is not None:
                    final["usage"] = self._usage
                reason = fields.get("finish_reason") or "stop"
                self._emit(out, {"type": "finish", "finishReason": _FINISH.get(reason, "other"),
                                 "messageMetadata": final})
            elif name == "error":
                self._emit(out, {"type": "error", "errorText": fields.get("message") or "the run failed"})
            else:
                self._emit(out, {"type": "abort", "reason": fields.get("reason", "cancelled")})
            out.append(self._end)


def _parsed(arguments: str) -> Any:
    """A tool call's input: its arguments as JSON, or the text as it came if it is not JSON."""
    try:
        return well_formed_json(json.loads(arguments)) if arguments else {}
    except (ValueError, RecursionError):
        return arguments


# -- UI messages → chat messages ------------------------------------------------

_SKIPPED = frozenset({"reasoning", "step-start", "source-url", "source-document", "reasoning-file", "custom"})
_DONE_TOOL_STATES = frozenset({"output-available", "output-error", "output-denied"})


def chat_messages(ui_messages: Any) -> list[dict[str, Any]]:
    """The chat's UI messages as OpenAI chat messages. Raises :class:`ProtocolViolation`.

    Text parts become content; image files become ``image_url`` parts; each step of
    an assistant message becomes an assistant message, its tool parts tool calls
    followed by their results (a call with no result yet is left out: a model
    server refuses a call without its answer); reasoning, sources and data parts
    are the UI's own and are not sent back.
    """
    if not isinstance(ui_messages, list) or not ui_messages:
        raise ProtocolViolation("'messages' must be a non-empty list of UI messages")
    if len(ui_messages) > MAX_MESSAGES:
        raise ProtocolViolation(f"too many messages: {len(ui_messages)}, at most {MAX_MESSAGES}")
    parts_seen = 0
    out: list[dict[str, Any]] = []
    for message in ui_messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ProtocolViolation("each message needs a role: system, user or assistant")
        parts = message.get("parts")
        if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("type"), str)
                                                  for p in parts):
            raise ProtocolViolation("each message needs 'parts', a list of objects with a 'type'")
        parts_seen += len(parts)
        if parts_seen > MAX_PARTS:
            raise ProtocolViolation(f"too many parts: at most {MAX_PARTS} in all")
        if message["role"] == "assistant":
            out += _assistant(parts)
        else:
            content = _user_content(parts, message["role"])
            if content:
                out.append({"role": message["role"], "content": content})
    if not out:
        raise ProtocolViolation("the messages hold no text to answer")
    return out


def approval_responses(ui_messages: Any) -> list[tuple[str, bool, str | None]]:
    """The approvals a ``send`` answers: (approval id, approved, reason) of each tool part of the last
    message, if it is the assistant's, in state ``approval-responded`` (``addToolApprovalResponse``): all a
    page reloaded without its messages may send."""
    last = ui_messages[-1] if isinstance(ui_messages, list) and ui_messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return []
    found: list[tuple[str, bool, str | None]] = []
    parts = last.get("parts")
    for part in parts[:MAX_PARTS] if isinstance(parts, list) else ():
        if not isinstance(part, dict) or part.get("state") != "approval-responded":
            continue
        approval = part.get("approval")
        if not isinstance(approval, dict):
            continue
        approval_id, approved, reason = approval.get("id"), approval.get("approved"), approval.get("reason")
        if not isinstance(approval_id, str) or not 0 < len(approval_id) <= MAX_ID or not isinstance(approved, bool):
            raise ProtocolViolation(f"an approval response needs an 'id' of 1 to {MAX_ID} characters and "
                                    "'approved' (a boolean)")
        if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
            raise ProtocolViolation(f"an approval response's 'reason' is a string of at most {MAX_REASON} characters")
        found.append((approval_id, approved, reason))
    return found


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message of chat messages (:func:`chat_messages`), or ''."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _user_content(parts: list[dict[str, Any]], role: str) -> str | list[dict[str, Any]]:
    texts: list[dict[str, Any]] = []
    for part in parts:
        kind = part["type"]
        if kind == "text":
            texts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "file":
            media = str(part.get("mediaType", ""))
            if role != "user" or not media.startswith("image/") or not isinstance(part.get("url"), str):
                raise ProtocolViolation(f"file parts of type {media!r} are not supported (images only, from the user)")
            texts.append({"type": "image_url", "image_url": {"url": part["url"]}})
        elif kind not in _SKIPPED and not kind.startswith("data-"):
            raise ProtocolViolation(f"unknown part type {kind!r} in a {role} message")
    if all(t["type"] == "text" for t in texts):
        return "".join(t["text"] for t in texts)
    return texts


def _assistant(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []

    def step() -> None:
        if text or calls:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
            if calls:
                message["tool_calls"] = list(calls)
            out.append(message)
            out.extend(results)
        text.clear()
        calls.clear()
        results.clear()

    for part in parts:
        kind = part["type"]
        if kind == "text":
            text.append(str(part.get("text", "")))
        elif kind == "step-start":
            step()
        elif kind == "dynamic-tool" or kind.startswith("tool-"):
            if part.get("state") not in _DONE_TOOL_STATES:
                continue
            name = part.get("toolName") if kind == "dynamic-tool" else kind[len("tool-"):]
            call_id = str(part.get("toolCallId", ""))
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": str(name), "arguments": json.dumps(part.get("input", {}))}})
            if part["state"] == "output-available":
                output = part.get("output")
                result = output if isinstance(output, str) else json.dumps(output)
            elif part["state"] == "output-error":
                result = f"error: {part.get('errorText', '')}"
            else:
                result = "the user denied this tool call"
            results.append({"role": "tool", "tool_call_id": call_id, "content": result})
        elif kind not in _SKIPPED and kind != "file" and not kind.startswith("data-"):
            raise ProtocolViolation(f"unknown part type {kind!r} in an assistant message")
    step()
    return out
