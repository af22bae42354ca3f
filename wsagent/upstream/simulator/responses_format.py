"""The Responses API wire format: a :class:`~.plan.Plan` as the API's typed events, or as one
``response`` object; and a Responses API request read as the chat completions request it means."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from .plan import Plan, text_of

__all__ = ["ResponsesFormat", "chat_body"]


class ResponsesFormat:
    """The Responses API's typed events (``response.created`` ... ``response.completed``), exactly as
    OpenAI writes them (an ``event:`` line naming each, a ``sequence_number`` in each), and the whole
    ``response`` object."""

    def __init__(self, body: dict[str, Any], model: str, the_plan: Plan, nl: str) -> None:
        self.plan = the_plan
        self.nl = nl
        self.seq = 0
        #: each event written, in order (its index is its sequence number), when kept: see :meth:`keep`
        self.log: list[str] | None = None
        self.background = False
        #: the terminal ``response`` object, once :meth:`end` or :meth:`error` wrote it
        self.final: dict[str, Any] | None = None
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

    def keep(self, response_id: str, log: list[str]) -> None:
        """Write a background response (``background`` and ``store`` true, queued first) under ``response_id``,
        and append each event to ``log`` as it is written."""
        self.background = True
        self.log = log
        self.response.update({"id": response_id, "background": True, "store": True})

    def _event(self, kind: str, payload: dict[str, Any]) -> str:
        payload = {"type": kind, **payload, "sequence_number": self.seq}
        self.seq += 1
        event = f"event: {kind}{self.nl}data: {json.dumps(payload)}{self.nl}{self.nl}"
        if self.log is not None:
            self.log.append(event)
        return event

    def _item(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": len(self.output)}

    @property
    def item_id(self) -> str:
        prefix = "rs" if self.open == "reasoning_content" else "msg"
        return f"{prefix}_{self.digest}{len(self.output)}"

    def begin(self) -> str:
        if self.background:  # as OpenAI writes a background response: queued first
            queued = {**self.response, "status": "queued"}
            return (self._event("response.created", {"response": queued})
                    + self._event("response.queued", {"response": queued})
                    + self._event("response.in_progress", {"response": self.response}))
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
        self.final = failed
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
        self.final = final
        out.append(self._event(f"response.{final['status']}", {"response": final}))
        return "".join(out)

    def snapshot(self, status: str) -> dict[str, Any]:
        """The ``response`` object as it stands: the items finished so far, and the one being written with
        its text so far (``in_progress``, or ``incomplete`` once the response is over)."""
        output = list(self.output)
        if self.open is not None:
            text = "".join(self.text)
            if self.open == "reasoning_content":
                output.append({"id": self.item_id, "type": "reasoning",
                               "summary": [{"type": "summary_text", "text": text}]})
            else:
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                state = "in_progress" if status in ("queued", "in_progress") else "incomplete"
                output.append({"id": self.item_id, "type": "message", "status": state, "role": "assistant",
                               "content": [part]})
        return {**self.response, "status": status, "output": output}

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


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses API request as the chat-completions request that asks the same (what :func:`~.plan.plan` reads)."""
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
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": text_of(item.get("output"))})
        elif kind == "message":
            messages.append({"role": item.get("role"), "content": text_of(item.get("content"))})
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
