"""A simulated OpenAI-compatible model server, served over real HTTP: ``POST /v1/chat/completions`` and
``POST /v1/responses`` (the Responses API, in OpenAI's exact event format), the same answers on both.

wsagent streams from it when no upstream is configured, so every path (SSE
parsing, relay, backpressure, cancellation, tool calls) runs for real on a
machine with no network and no model. Tests and benchmarks use it too, with
switches that inject the faults real servers produce.

Answers are deterministic for a given request. ``tool_choice`` and
``response_format`` are honoured as OpenAI does (a JSON answer conforms to the
request's schema), and a reply that is not streamed carries its reasoning. Switches are honoured only when
the simulator is started with them on (``SimulatorSettings(switches=True)``,
``python -m wsagent.simulator --switches``, ``python -m wsagent.serve
--sim-switches``): they are for tests and benchmarks, and anyone who can send
a prompt could otherwise use them (``sim:tokens=20000 sim:pad=20000`` once took
the server from 49 to 438 MiB). Then they come from a ``sim`` object in the
request body, or from ``sim:key=value`` words in the last user message (so a
person at a WebSocket client can try them), capped so that one answer holds at
most about 16 MiB:

=================  ==========================================================
``tokens=N``       answer length in tokens (default: the server's setting)
``rate=R``         tokens per second (0: as fast as the socket takes them)
``reasoning=0|1``  stream reasoning deltas first (default 1)
``status=N``       answer HTTP N with an OpenAI-shaped error body
``fail_times=K``   with ``status``: only the first K such requests fail
``retry_after_ms``  sent as the ``retry-after-ms`` header with ``status``
``should_retry``   sent as ``x-should-retry`` with ``status``
``error_after=N``  after N tokens, an ``{"error": ...}`` event in the stream
``error_done=1``   with ``error_after``: a ``[DONE]`` after the error
``stall_after=N``  after N tokens, send nothing more (the connection stays)
``drop_after=N``   after N tokens, reset the TCP connection
``newline=crlf``   line endings: ``lf`` (default), ``crlf`` or ``cr``
``comment_every``  a ``: ping`` comment every N tokens
``long=N``         one content delta of N characters
``pad=N``          pad every content token to N characters (bulk tests)
``json=1``         answer a whole ``chat.completion`` even when asked to stream
``hold=1``         never answer (not even headers): a first-byte timeout
``tool=NAME``      call this tool (when offered) whatever the prompt says
``tool_loop=1``    call a tool again even after tool results
``bad_args=1``     tool call arguments that are not valid JSON
``stamp=1``        each token is the monotonic time it was written at
``tag=NAME``       count this stream's tokens, streams and disconnect time under NAME (``GET /stats?tag=NAME``)
``raw=TEXT``       (body only) replay TEXT byte for byte as the stream
``raw_chunk=N``    with ``raw``: write it in pieces of N bytes
=================  ==========================================================
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .tuning import DEFAULT_GC_THRESHOLDS, tune_gc, tune_malloc

__all__ = ["SimulatorSettings", "SimStats", "make_app", "Simulator", "SimulatorServer", "main"]

log = logging.getLogger("wsagent.simulator")

_DIRECTIVE = re.compile(r"\bsim:(\w+)=(\S+)")
_EXPRESSION = re.compile(r"[-+*/%^().\d\s]*\d[-+*/%^().\d\s]*[-+*/%^][-+*/%^().\d\s]*\d[-+*/%^().\d\s]*")
_VOCABULARY = (
    "streams tokens as they arrive so people see the answer grow instead of waiting for all of it "
    "a websocket keeps one connection open in both directions while the model writes its reply "
    "backpressure slows the reader down when the browser cannot keep up and memory stays bounded "
    "every run ends with one terminal event and a client that leaves stops the generation at once"
).split()


@dataclass
class SimulatorSettings:
    rate: float = 50.0
    tokens: int = 24
    reasoning: bool = True
    model: str = "wsagent-sim"
    switches: bool = False  # honour ``sim`` switches (tests, benchmarks); off, a prompt is only a prompt


#: What one answer may hold, whatever the switches ask: tokens, and characters (``pad`` x tokens, ``long``).
MAX_TOKENS = 1_000_000
MAX_CHARS = 16 * 1024 * 1024


def _capped(switches: dict[str, str]) -> dict[str, str]:
    """``switches`` with ``tokens``, ``pad`` and ``long`` held to :data:`MAX_TOKENS` and :data:`MAX_CHARS`."""
    try:
        tokens = min(int(switches.get("tokens", 0)), MAX_TOKENS)
        if "tokens" in switches:
            switches["tokens"] = str(tokens)
        if "pad" in switches:
            switches["pad"] = str(min(int(switches["pad"]), MAX_CHARS // max(tokens, 1)))
        if "long" in switches:
            switches["long"] = str(min(int(switches["long"]), MAX_CHARS))
    except ValueError:
        return {}
    return switches


@dataclass
class SimStats:
    """What the simulated upstream saw; tests and benchmarks read it."""

    requests: int = 0
    streams: int = 0
    active: int = 0
    completed: int = 0
    disconnected: int = 0
    tokens_sent: int = 0
    disconnect_times: list[float] = field(default_factory=list)
    last_body: dict[str, Any] | None = None
    tags: dict[str, dict[str, float]] = field(default_factory=dict)
    changed: asyncio.Condition | None = None

    def disconnect(self, tag: dict[str, float] | None) -> None:
        now = time.monotonic()
        self.disconnected += 1
        self.disconnect_times.append(now)
        if tag is not None:
            tag["disconnected"] = now

    def _notify(self) -> None:
        cond = self.changed
        if cond is not None:
            asyncio.get_running_loop().create_task(_notify_all(cond))

    async def wait_for(self, predicate: Any, limit: float = 10.0) -> None:
        """Wait until ``predicate(stats)`` holds (event driven, not polled); at most ``limit`` seconds."""
        if self.changed is None:
            self.changed = asyncio.Condition()
        async with asyncio.timeout(limit):
            async with self.changed:
                await self.changed.wait_for(lambda: predicate(self))


async def _notify_all(cond: asyncio.Condition) -> None:
    async with cond:
        cond.notify_all()


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def _directives(body: dict[str, Any]) -> tuple[dict[str, str], str]:
    """Switches from the body's ``sim`` object and the last user message; the prompt without them."""
    switches: dict[str, str] = {}
    prompt = _last_user_text(body)
    for key, value in _DIRECTIVE.findall(prompt):
        switches[key] = value
    prompt = _DIRECTIVE.sub("", prompt).strip()
    sim = body.get("sim")
    if isinstance(sim, dict):
        switches.update({str(k): str(v) if not isinstance(v, str) else v for k, v in sim.items()})
    return switches, prompt


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


@dataclass
class _Plan:
    reasoning: list[str]
    content: list[str]
    tool_calls: list[tuple[str, str, str]]
    finish_reason: str
    prompt_tokens: int


def _words(text: str) -> list[str]:
    words = text.split()
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _tool_names(tools: Any) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out.append((fn["name"], fn.get("parameters") or {}))
    return out


def _arguments(name: str, schema: dict[str, Any], prompt: str) -> dict[str, Any]:
    props = schema.get("properties") or {}
    args: dict[str, Any] = {}
    for key in schema.get("required") or list(props)[:1]:
        kind = (props.get(key) or {}).get("type", "string")
        if key == "expression":
            match = _EXPRESSION.search(prompt)
            args[key] = match.group(0).strip() if match else prompt
        elif kind in ("integer", "number"):
            args[key] = 1
        elif kind == "boolean":
            args[key] = True
        else:
            args[key] = prompt
    return args


def _wanted_tools(prompt: str, tools: list[tuple[str, dict[str, Any]]],
                  forced: str | None) -> list[tuple[str, dict[str, Any]]]:
    lowered = prompt.lower()
    wanted = []
    for name, schema in tools:
        spoken = name.lower().replace("_", " ")
        if forced is not None:
            hit = name == forced
        elif name.lower() in lowered or spoken in lowered:
            hit = True
        elif "calc" in name.lower():
            hit = _EXPRESSION.search(prompt) is not None
        elif "time" in name.lower():
            hit = "time" in lowered or "date" in lowered
        elif "search" in name.lower():
            hit = any(w in lowered for w in ("search", "look up", "find "))
        else:
            hit = False
        if hit:
            wanted.append((name, schema))
    return wanted


def plan(body: dict[str, Any], switches: dict[str, str], prompt: str, settings: SimulatorSettings) -> _Plan:
    """Decide, deterministically, what the simulated model says to this request."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    clean = [(m.get("role"), _DIRECTIVE.sub("", _text(m.get("content"))).strip()) for m in messages]
    prompt_tokens = sum(len(text.split()) for _, text in clean) + 4 * len(messages)
    seed = hashlib.sha256(json.dumps(clean).encode()).digest()
    limit = int(switches.get("tokens", settings.tokens))
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    reasoning_on = switches.get("reasoning", "1" if settings.reasoning else "0") != "0"
    system = next((_text(m.get("content")) for m in messages if m.get("role") == "system"), "")
    tools = _tool_names(body.get("tools"))
    last_role = messages[-1].get("role") if messages else "user"
    looping = switches.get("tool_loop") == "1"

    choice = body.get("tool_choice", "auto")
    if choice == "none":
        tools = []
    if tools and (last_role != "tool" or looping or choice == "required" or isinstance(choice, dict)):
        if isinstance(choice, dict):  # {"type": "function", "function": {"name": ...}}: that one, always
            named = (choice.get("function") or {}).get("name")
            wanted = [(name, schema) for name, schema in tools if name == named]
        else:
            wanted = _wanted_tools(prompt, tools, switches.get("tool"))
            if not wanted and choice == "required":
                wanted = tools[:1]
        if wanted:
            calls = []
            for n, (name, schema) in enumerate(wanted):
                args = json.dumps(_arguments(name, schema, prompt))
                if switches.get("bad_args") == "1":
                    args = args[:-1] + ', "broken'
                call_id = f"call_{seed[n:n + 6].hex()}"
                calls.append((call_id, name, args))
            names = " and ".join(name for _, name, _ in calls)
            return _Plan(
                reasoning=_words(f"The request needs the {names} tool, so I will call it.") if reasoning_on else [],
                content=[],
                tool_calls=calls,
                finish_reason="tool_calls",
                prompt_tokens=prompt_tokens,
            )

    if last_role == "tool":
        results = [_text(m.get("content")) for m in messages[messages_tail_start(messages):]]
        text = "Based on the tool results: " + "; ".join(r[:200] for r in results) + "."
        thought = "The tool answered, so I can reply now."
    else:
        role = re.split(r"[.!?\n]", system, maxsplit=1)[0].strip()
        role = re.sub(r"^you are\s+", "", role, flags=re.IGNORECASE)
        opening = f"As {' '.join(role.split()[:8])}, " if role else ""
        topic = " ".join(prompt.split()[:12])
        offset = seed[0] % len(_VOCABULARY)
        filler = [_VOCABULARY[(offset + i) % len(_VOCABULARY)] for i in range(max(limit, 1) * 2)]
        text = f"{opening}here is a simulated answer about {topic or 'nothing in particular'}: " + " ".join(filler)
        thought = f"The user asks about {topic or 'nothing'}. I will answer briefly."
    tokens = _words(text)[:limit] if limit > 0 else []
    shaped = _formatted(body.get("response_format"), " ".join(tokens).strip())
    if shaped is not None:  # a JSON answer, whole (cutting it to a token limit would break it), in pieces
        tokens = [shaped[i:i + 8] for i in range(0, len(shaped), 8)]
    finish = "stop"
    if isinstance(max_tokens, int) and 0 < max_tokens < len(tokens):
        tokens = tokens[:max_tokens]
        finish = "length"
    return _Plan(
        reasoning=_words(thought) if reasoning_on else [],
        content=tokens,
        tool_calls=[],
        finish_reason=finish,
        prompt_tokens=prompt_tokens,
    )


def _formatted(response_format: Any, text: str) -> str | None:
    """The answer as ``response_format`` asks: a JSON object (``json_object``), or a value that conforms
    to ``json_schema``'s schema (every property, so that ``strict`` holds too); None for plain text."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return json.dumps({"answer": text})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return json.dumps(_conforming(schema if isinstance(schema, dict) else {}, text, {}))
    return None


def _conforming(schema: dict[str, Any], text: str, defs: dict[str, Any], depth: int = 0) -> Any:
    """A value of ``schema``: the simplest that validates, with the answer's words in its strings."""
    defs = {**defs, **(schema.get("$defs") or schema.get("definitions") or {})}
    ref = schema.get("$ref")
    if isinstance(ref, str) and depth < 8:
        return _conforming(defs.get(ref.rsplit("/", 1)[-1], {}), text, defs, depth + 1)
    for combined in ("anyOf", "oneOf", "allOf"):
        options = schema.get(combined)
        if isinstance(options, list) and options and depth < 8:
            return _conforming(options[0], text, defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        return {key: _conforming(sub, text, defs, depth + 1) for key, sub in props.items()} if depth < 8 else {}
    if kind == "array":
        return [_conforming(schema.get("items") or {}, text, defs, depth + 1)] if depth < 8 else []
    if kind == "integer":
        return int(schema.get("minimum", 42))
    if kind == "number":
        return float(schema.get("minimum", 42.0))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def messages_tail_start(messages: Sequence[dict[str, Any]]) -> int:
    """Index of the first of the trailing ``tool`` messages."""
    start = len(messages)
    while start > 0 and messages[start - 1].get("role") == "tool":
        start -= 1
    return start


class _ChatFormat:
    """``chat.completion.chunk`` events, and the whole ``chat.completion``."""

    def __init__(self, body: dict[str, Any], model: str, the_plan: _Plan, nl: str) -> None:
        self.plan = the_plan
        self.nl = nl
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_id = "chatcmpl-sim" + hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]
        self.head = json.dumps({"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": model, "system_fingerprint": "fp_wsagent_sim"})[:-1]
        self.model = model

    def _data(self, payload: str) -> str:
        return f"data: {payload}{self.nl}{self.nl}"

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._data(f'{self.head},"choices":[{json.dumps(choice)}]}}')

    def begin(self) -> str:
        return self._chunk({"role": "assistant", "content": ""})

    def token(self, kind: str, text: str) -> str:
        return (f'data: {self.head},"choices":[{{"index":0,"delta":{{"{kind}":{json.dumps(text)}}},'
                f'"logprobs":null,"finish_reason":null}}]}}{self.nl}{self.nl}')

    def error(self, done: bool) -> str:
        out = self._data(json.dumps({"error": {"message": "simulated mid-stream failure", "type": "server_error",
                                               "code": 500}}))
        return out + self._data("[DONE]") if done else out

    def end(self, completion_tokens: int) -> str:
        out = []
        for n, (call_id, name, args) in enumerate(self.plan.tool_calls):
            half = len(args) // 2
            out.append(self._chunk({"tool_calls": [{"index": n, "id": call_id, "type": "function",
                                                    "function": {"name": name, "arguments": args[:half]}}]}))
            out.append(self._chunk({"tool_calls": [{"index": n, "function": {"arguments": args[half:]}}]}))
        out.append(self._chunk({}, self.plan.finish_reason))
        if self.include_usage:
            usage = json.dumps(_usage(self.plan, completion_tokens))
            out.append(self._data(f'{self.head},"choices":[],"usage":{usage}}}'))
        out.append(self._data("[DONE]"))
        return "".join(out)

    def whole(self) -> dict[str, Any]:
        the_plan = self.plan
        message: dict[str, Any] = {"role": "assistant", "content": "".join(the_plan.content) or None}
        if the_plan.reasoning:
            message["reasoning_content"] = "".join(the_plan.reasoning)
        if the_plan.tool_calls:
            message["tool_calls"] = [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
                for call_id, name, args in the_plan.tool_calls
            ]
        return {
            "id": "chatcmpl-sim",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": the_plan.finish_reason}],
            "usage": _usage(the_plan, len(the_plan.content) + len(the_plan.reasoning)),
        }


def _usage(the_plan: _Plan, completion: int) -> dict[str, Any]:
    """As OpenAI writes it, details included (swarms' detailed streaming, through litellm, failed on usage
    without ``prompt_tokens_details``: ``'NoneType' object has no attribute 'audio_tokens'``)."""
    return {"prompt_tokens": the_plan.prompt_tokens, "completion_tokens": completion,
            "total_tokens": the_plan.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": len(the_plan.reasoning), "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


class _ResponsesFormat:
    """The Responses API's typed events (``response.created`` ... ``response.completed``), exactly as
    OpenAI writes them (an ``event:`` line naming each, a ``sequence_number`` in each), and the whole
    ``response`` object."""

    def __init__(self, body: dict[str, Any], model: str, the_plan: _Plan, nl: str) -> None:
        self.plan = the_plan
        self.nl = nl
        self.seq = 0
        digest = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
        self.digest = digest
        self.output: list[dict[str, Any]] = []
        self.open: str | None = None
        self.text: list[str] = []
        text_config = body.get("text") if isinstance(body.get("text"), dict) else None
        self.response: dict[str, Any] = {
            "id": f"resp_{digest}", "object": "response", "created_at": int(time.time()), "model": model,
            "status": "in_progress", "error": None, "incomplete_details": None,
            "instructions": body.get("instructions") if isinstance(body.get("instructions"), str) else None,
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
            "output": [], "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "text": text_config or {"format": {"type": "text"}}, "store": False, "usage": None,
            "max_output_tokens": body.get("max_output_tokens"),
        }

    def _event(self, kind: str, payload: dict[str, Any]) -> str:
        payload = {"type": kind, **payload, "sequence_number": self.seq}
        self.seq += 1
        return f"event: {kind}{self.nl}data: {json.dumps(payload)}{self.nl}{self.nl}"

    def _item(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": len(self.output)}

    @property
    def item_id(self) -> str:
        prefix = "rs" if self.open == "reasoning_content" else "msg"
        return f"{prefix}_{self.digest}{len(self.output)}"

    def begin(self) -> str:
        return (self._event("response.created", {"response": self.response})
                + self._event("response.in_progress", {"response": self.response}))

    def _start(self, kind: str) -> str:
        self.open = kind
        self.text = []
        item: dict[str, Any]
        part: dict[str, Any]
        if kind == "reasoning_content":
            item = {"id": self.item_id, "type": "reasoning", "summary": []}
            part = {"type": "summary_text", "text": ""}
            return (self._event("response.output_item.added", {"output_index": len(self.output), "item": item})
                    + self._event("response.reasoning_summary_part.added",
                                  {**self._item(), "summary_index": 0, "part": part}))
        item = {"id": self.item_id, "type": "message", "status": "in_progress", "role": "assistant",
                "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return (self._event("response.output_item.added", {"output_index": len(self.output), "item": item})
                + self._event("response.content_part.added", {**self._item(), "content_index": 0, "part": part}))

    def _finish_item(self) -> str:
        if self.open is None:
            return ""
        text = "".join(self.text)
        where = self._item()
        part: dict[str, Any]
        if self.open == "reasoning_content":
            part = {"type": "summary_text", "text": text}
            item: dict[str, Any] = {"id": self.item_id, "type": "reasoning", "summary": [part]}
            out = (self._event("response.reasoning_summary_text.done", {**where, "summary_index": 0, "text": text})
                   + self._event("response.reasoning_summary_part.done", {**where, "summary_index": 0, "part": part}))
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            status = "incomplete" if self.plan.finish_reason == "length" else "completed"
            item = {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": [part]}
            out = (self._event("response.output_text.done", {**where, "content_index": 0, "text": text,
                                                              "logprobs": []})
                   + self._event("response.content_part.done", {**where, "content_index": 0, "part": part}))
        out += self._event("response.output_item.done", {"output_index": where["output_index"], "item": item})
        self.output.append(item)
        self.open = None
        return out

    def token(self, kind: str, text: str) -> str:
        out = self._finish_item() + self._start(kind) if kind != self.open else ""
        self.text.append(text)
        if kind == "reasoning_content":
            return out + self._event("response.reasoning_summary_text.delta",
                                     {**self._item(), "summary_index": 0, "delta": text})
        return out + self._event("response.output_text.delta",
                                 {**self._item(), "content_index": 0, "delta": text, "logprobs": []})

    def error(self, done: bool) -> str:
        failed = {**self.response, "status": "failed", "output": self.output,
                  "error": {"code": "server_error", "message": "simulated mid-stream failure"}}
        return self._event("response.failed", {"response": failed})

    def end(self, completion_tokens: int) -> str:
        out = [self._finish_item()]
        for call_id, name, args in self.plan.tool_calls:
            index = len(self.output)
            item = {"id": f"fc_{self.digest}{index}", "type": "function_call", "status": "in_progress",
                    "call_id": call_id, "name": name, "arguments": ""}
            where = {"item_id": item["id"], "output_index": index}
            half = len(args) // 2
            out += [self._event("response.output_item.added", {"output_index": index, "item": item}),
                    self._event("response.function_call_arguments.delta", {**where, "delta": args[:half]}),
                    self._event("response.function_call_arguments.delta", {**where, "delta": args[half:]}),
                    self._event("response.function_call_arguments.done", {**where, "name": name, "arguments": args})]
            item = {**item, "status": "completed", "arguments": args}
            out.append(self._event("response.output_item.done", {"output_index": index, "item": item}))
            self.output.append(item)
        final = self._final(completion_tokens)
        out.append(self._event(f"response.{final['status']}", {"response": final}))
        return "".join(out)

    def _final(self, completion_tokens: int) -> dict[str, Any]:
        incomplete = self.plan.finish_reason == "length"
        reasoning = len(self.plan.reasoning)
        return {**self.response, "status": "incomplete" if incomplete else "completed", "output": self.output,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "usage": {"input_tokens": self.plan.prompt_tokens,
                          "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                          "output_tokens": completion_tokens,
                          "output_tokens_details": {"reasoning_tokens": reasoning},
                          "total_tokens": self.plan.prompt_tokens + completion_tokens}}

    def whole(self) -> dict[str, Any]:
        for text in self.plan.reasoning:
            self.token("reasoning_content", text)
        for text in self.plan.content:
            self.token("content", text)
        self.end(len(self.plan.reasoning) + len(self.plan.content))
        return self._final(len(self.plan.reasoning) + len(self.plan.content))


_Format = _ChatFormat | _ResponsesFormat


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses API request as the chat-completions request that asks the same (what :func:`plan` reads)."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    for item in [{"role": "user", "content": items}] if isinstance(items, str) else items or ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "function_call":
            if not messages or messages[-1].get("role") != "assistant":
                messages.append({"role": "assistant", "content": None})
            messages[-1].setdefault("tool_calls", []).append(
                {"id": item.get("call_id"), "type": "function",
                 "function": {"name": item.get("name"), "arguments": item.get("arguments")}})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(item.get("output"))})
        elif kind == "message":
            messages.append({"role": item.get("role"), "content": _text(item.get("content"))})
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages, "stream": bool(body.get("stream"))}
    tools = [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
             for tool in body.get("tools") or () if isinstance(tool, dict) and tool.get("type") == "function"]
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat["tool_choice"] = choice
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    elif isinstance(fmt, dict):
        chat["response_format"] = fmt
    if isinstance(body.get("max_output_tokens"), int):
        chat["max_tokens"] = body["max_output_tokens"]
    if "sim" in body:
        chat["sim"] = body["sim"]
    return chat


class Simulator:
    """The aiohttp handlers; one instance per app holds its settings and stats."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.stats = SimStats()
        self._failures: dict[str, int] = {}

    async def stats_view(self, request: web.Request) -> web.Response:
        """What the simulator saw, for benchmarks running it in another process."""
        stats = self.stats
        if "tag" in request.query:
            return web.json_response(stats.tags.get(request.query["tag"], {}))
        return web.json_response({
            "requests": stats.requests, "streams": stats.streams, "active": stats.active,
            "completed": stats.completed, "disconnected": stats.disconnected, "tokens_sent": stats.tokens_sent,
            "disconnect_times": stats.disconnect_times[-10000:],
        })

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({
            "object": "list",
            "data": [{"id": self.settings.model, "object": "model", "created": 0, "owned_by": "wsagent"}],
        })

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        return await self._answer(request, "messages", _ChatFormat)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses``: the same answers, in the Responses API's events."""
        return await self._answer(request, "input", _ResponsesFormat)

    async def _answer(self, request: web.Request, required: str,
                      make: type[_ChatFormat] | type[_ResponsesFormat]) -> web.StreamResponse:
        self.stats.requests += 1
        try:
            raw_body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON", "invalid_request_error")
        if not isinstance(raw_body, dict) or not isinstance(raw_body.get(required), (list, str)):
            return _error(400, f"'{required}' is required", "invalid_request_error")
        self.stats.last_body = raw_body
        body = raw_body if make is _ChatFormat else chat_body(raw_body)
        switches, prompt = _directives(body)
        if not self.settings.switches:
            switches, prompt = {}, _last_user_text(body)
        switches = _capped(switches)
        status = switches.get("status")
        if status is not None:
            key = switches.get("fail_key", prompt)
            seen = self._failures.get(key, 0)
            self._failures[key] = seen + 1
            if "fail_times" not in switches or seen < int(switches["fail_times"]):
                headers = {}
                if "retry_after_ms" in switches:
                    headers["retry-after-ms"] = switches["retry_after_ms"]
                if "should_retry" in switches:
                    headers["x-should-retry"] = switches["should_retry"]
                return _error(int(status), f"simulated HTTP {status}", "server_error", headers)
        if switches.get("hold") == "1":
            await asyncio.Event().wait()
        if "raw" in switches:
            return await self._raw(request, switches)
        model = str(body.get("model") or self.settings.model)
        nl = {"crlf": "\r\n", "cr": "\r"}.get(switches.get("newline", "lf"), "\n")
        fmt = make(raw_body, model, plan(body, switches, prompt, self.settings), nl)
        if not body.get("stream") or switches.get("json") == "1":
            return web.json_response(fmt.whole())
        return await self._stream(request, fmt, switches)

    async def _raw(self, request: web.Request, switches: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        raw = switches["raw"].encode()
        step = int(switches.get("raw_chunk", 0)) or len(raw) or 1
        for start in range(0, len(raw), step):
            await response.write(raw[start:start + step])
        await response.write_eof()
        return response

    async def _stream(self, request: web.Request, fmt: _Format, switches: dict[str, str]) -> web.StreamResponse:
        stats = self.stats
        stats.streams += 1
        stats.active += 1
        stats._notify()
        the_plan = fmt.plan
        rate = float(switches.get("rate", self.settings.rate))
        interval = 1.0 / rate if rate > 0 else 0.0
        error_after = int(switches.get("error_after", -1))
        stall_after = int(switches.get("stall_after", -1))
        drop_after = int(switches.get("drop_after", -1))
        comment_every = int(switches.get("comment_every", 0))
        stamp = switches.get("stamp") == "1"
        tag = stats.tags.setdefault(switches["tag"], {"tokens": 0, "streams": 0}) if "tag" in switches else None
        if tag is not None:
            tag["streams"] += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        loop = asyncio.get_running_loop()
        finished = False
        try:
            await response.prepare(request)
            await response.write(fmt.begin().encode())
            sent = 0
            start = loop.time()
            pieces: list[tuple[str, str]] = [("reasoning_content", t) for t in the_plan.reasoning]
            pad = int(switches.get("pad", 0))
            pieces += [("content", _padded(t, pad, n) if pad else t) for n, t in enumerate(the_plan.content)]
            if "long" in switches:
                pieces.append(("content", "x" * int(switches["long"])))
            for kind, text in pieces:
                if sent == error_after:
                    await response.write(fmt.error(switches.get("error_done") == "1").encode())
                    finished = True
                    return response
                if sent == stall_after:
                    await asyncio.Event().wait()
                if sent == drop_after:
                    assert request.transport is not None
                    request.transport.abort()
                    finished = True
                    return response
                if interval:
                    delay = start + sent * interval - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if comment_every and sent and sent % comment_every == 0:
                    await response.write(f": ping{fmt.nl}".encode())
                if stamp:
                    text = f"{time.monotonic():.6f} "
                await response.write(fmt.token(kind, text).encode())
                sent += 1
                stats.tokens_sent += 1
                if tag is not None:
                    tag["tokens"] = sent
            await response.write(fmt.end(len(pieces) + len(the_plan.tool_calls)).encode())
            await response.write_eof()
            finished = True
            return response
        except asyncio.CancelledError:
            stats.disconnect(tag)
            raise
        except ConnectionError:
            stats.disconnect(tag)
            return response
        finally:
            stats.active -= 1
            if finished:
                stats.completed += 1
            stats._notify()


_PAD_SIZE = 1 << 20
_pad_text: str | None = None


def _padded(token: str, width: int, n: int) -> str:
    """``token`` filled out to ``width`` characters with random letters, which compress about as
    poorly as real text (a repeated filler would let permessage-deflate hide any backpressure bug)."""
    global _pad_text
    if _pad_text is None:
        rng = random.Random(0)
        _pad_text = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=_PAD_SIZE))
    fill = max(0, width - len(token) - 1)
    start = (n * fill) % (_PAD_SIZE - fill)
    return token + " " + _pad_text[start:start + fill]


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": str(status)}},
        status=status,
        headers=headers,
    )


SIMULATOR = web.AppKey("simulator", Simulator)


def make_app(settings: SimulatorSettings | None = None) -> web.Application:
    """The simulator as an aiohttp app; ``app[SIMULATOR]`` holds its settings and stats."""
    sim = Simulator(settings or SimulatorSettings())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIMULATOR] = sim
    app.router.add_post("/v1/chat/completions", sim.completions)
    app.router.add_post("/v1/responses", sim.responses)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_get("/stats", sim.stats_view)
    return app


class SimulatorServer:
    """Run the simulator on a loopback port inside the current event loop."""

    def __init__(self, settings: SimulatorSettings | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = make_app(settings)
        self.host = host
        self.port = port
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)

    @property
    def simulator(self) -> Simulator:
        return self.app[SIMULATOR]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> SimulatorServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wsagent.simulator",
                                     description="Serve the simulated OpenAI-compatible model.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second (0: unthrottled)")
    parser.add_argument("--tokens", type=int, default=24, help="answer length in tokens")
    parser.add_argument("--no-reasoning", action="store_true", help="do not stream reasoning deltas")
    parser.add_argument("--switches", action="store_true",
                        help="honour sim switches in requests (fault injection for tests and benchmarks)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = SimulatorSettings(rate=args.rate, tokens=args.tokens, reasoning=not args.no_reasoning,
                                 switches=args.switches)

    async def run() -> None:
        server = await SimulatorServer(settings, args.host, args.port).start()
        tune_gc(DEFAULT_GC_THRESHOLDS)  # a model server should not pause every stream for the collector either
        tune_malloc()
        log.info("simulated model at %s", server.base_url)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, the address is not this machine's: one line, as serve says it
        log.error("cannot serve on %s:%s: %s", args.host, args.port, exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
