"""The OpenAI Responses API as a second upstream dialect, sans I/O.

:func:`responses_request` turns the chat-completions body every caller builds
into a ``POST {base}/responses`` body; :class:`ResponsesInterpreter` turns the
SSE events of the streamed answer into the same :data:`~wsagent.core.chunks.ModelEvent`
s as :class:`~wsagent.core.chunks.ChunkInterpreter`, so the relay, agents and
workflows cannot tell the dialects apart. The SSE decoder is shared.

What maps to what:

=========================================  =====================================
``response.output_text.delta``             ``TextDelta("content")``
``response.refusal.delta``                 ``TextDelta("refusal")``
``response.reasoning_summary_text.delta``  ``TextDelta("reasoning")`` (a blank
``response.reasoning_text.delta``          line between summary parts)
``response.output_item.done`` (a           ``ToolCall`` (arguments streamed by
``function_call``)                         ``function_call_arguments.delta``)
``response.completed``                     ``Usage``, then ``Finish("stop")``, or
                                           ``Finish("tool_calls")`` after a call
``response.incomplete``                    ``Finish("length")`` or
                                           ``Finish("content_filter")``
``response.failed``, ``error``             :class:`UpstreamError`
                                           ``upstream_stream_error`` with the
                                           upstream's message and code
=========================================  =====================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .chunks import (
    MAX_TOOL_ARGUMENTS,
    Arguments,
    DeltaKind,
    Finish,
    ModelEvent,
    TextDelta,
    ToolCall,
    ToolCallBounds,
    Usage,
    feed_tail,
    mend,
    stream_error,
    unmended,
)
from .errors import UpstreamError
from .events import well_formed
from .sse import SSEEvent

__all__ = ["ResponsesInterpreter", "responses_request", "response_to_events"]

#: Chat-completions parameters with another name (or shape) in the Responses API.
_RENAMED = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens"}
#: Chat-completions parameters the Responses API has no use for.
_DROPPED = frozenset({"stream_options", "messages", "n"})


def _content(content: Any, role: str) -> Any:
    """Chat content parts as Responses input parts (a string stays a string)."""
    if not isinstance(content, list):
        return content if content is not None else ""
    kind = "output_text" if role == "assistant" else "input_text"
    parts = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            parts.append({"type": kind, "text": part.get("text", "")})
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append({"type": "input_image", "image_url": url, "detail": "auto"})
        else:
            parts.append(part)
    return parts


def _input_items(messages: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for message in messages or ():
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "tool":
            output = message.get("content")
            items.append({"type": "function_call_output", "call_id": str(message.get("tool_call_id") or ""),
                          "output": output if isinstance(output, str) else json.dumps(output)})
            continue
        content = message.get("content")
        if role != "assistant" or content:
            items.append({"role": role, "content": _content(content, str(role))})
        if role == "assistant":
            for call in message.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    items.append({"type": "function_call", "call_id": str(call.get("id") or ""),
                                  "name": str(function.get("name") or ""),
                                  "arguments": str(function.get("arguments") or "")})
    return items


def _tool(tool: Any) -> Any:
    """``{"type": "function", "function": {...}}`` as the Responses API's flat function tool."""
    if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        return {"type": "function", **tool["function"]}
    return tool


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "function", "name": choice["function"].get("name")}
    return choice


def _text_format(response_format: Any) -> Any:
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        return {"type": "json_schema", **(spec if isinstance(spec, dict) else {})}
    return response_format


def responses_request(chat: dict[str, Any]) -> dict[str, Any]:
    """The Responses API body that asks what the chat-completions body ``chat`` asks.

    Messages become input items (a tool call and its result become ``function_call``
    and ``function_call_output`` items), tools lose their ``function`` wrapper,
    ``response_format`` becomes ``text.format``, ``max_tokens`` ``max_output_tokens``
    and ``reasoning_effort`` ``reasoning.effort`` (with a summary, which is what
    streams as reasoning). Other parameters pass as they are, and the model server
    answers for them. ``store`` is off: wsagent keeps its own history.
    """
    body: dict[str, Any] = {"model": chat.get("model"), "input": _input_items(chat.get("messages")),
                            "stream": bool(chat.get("stream", True)), "store": False}
    for key, value in chat.items():
        if key in _DROPPED or key in body:
            continue
        if key in _RENAMED:
            body[_RENAMED[key]] = value
        elif key == "tools":
            body["tools"] = [_tool(tool) for tool in value or ()]
        elif key == "tool_choice":
            body["tool_choice"] = _tool_choice(value)
        elif key == "response_format":
            body["text"] = {"format": _text_format(value)}
        elif key == "reasoning_effort":
            body["reasoning"] = {"effort": value, "summary": "auto"}
        else:
            body[key] = value
    return body


@dataclass(slots=True)
class _Call:
    call_id: str
    name: str
    arguments: Arguments = field(default_factory=Arguments)


_FINISH = {"max_output_tokens": "length", "content_filter": "content_filter"}


class ResponsesInterpreter:
    """Turn the SSE events of one streamed ``/responses`` answer into :data:`ModelEvent` s.

    The same interface as :class:`~wsagent.core.chunks.ChunkInterpreter`: ``feed``,
    ``end``, ``done``, ``finish_reason``. A stream is complete only after its
    terminal event (``response.completed`` or ``response.incomplete``): the
    Responses API has no ``[DONE]``, and an answer cut before its terminal event
    has lost its usage and maybe a tool call.

    Text is made valid as :class:`~wsagent.core.chunks.ChunkInterpreter` makes it (see
    :func:`~wsagent.core.chunks.mend`), and tool calls have the same bounds
    (:class:`~wsagent.core.chunks.ToolCallBounds`).
    """

    __slots__ = ("_calls", "_emitted", "_bounds", "_held", "done", "finish_reason", "response_id", "sequence")

    def __init__(self) -> None:
        self._calls: dict[str, _Call] = {}
        self._emitted = 0
        self._bounds = ToolCallBounds()
        self._held: dict[tuple[int, DeltaKind], str] = {}
        self.done = False
        self.finish_reason: str | None = None
        #: The response's id (from ``response.created``) and the ``sequence_number`` of the last event
        #: interpreted: where a stream of a background response is re-attached (``starting_after``).
        self.response_id: str | None = None
        self.sequence = -1

    def feed(self, sse: SSEEvent) -> list[ModelEvent]:
        """Interpret one SSE event. Raises :class:`UpstreamError` for an error in the stream."""
        if self.done:
            return []
        if sse.data == "[DONE]":  # some compatible servers add it
            raise UpstreamError("upstream ended the stream without a terminal response event",
                                code="upstream_truncated", retryable=True)
        try:
            event = json.loads(sse.data)
        except (ValueError, RecursionError):
            raise UpstreamError(f"upstream sent data that is not JSON: {sse.data[:200]!r}",
                                code="upstream_protocol", retryable=True) from None
        if not isinstance(event, dict):
            raise UpstreamError("upstream sent an event that is not a JSON object", code="upstream_protocol",
                                retryable=True)
        sequence = event.get("sequence_number")
        if type(sequence) is int:
            if sequence <= self.sequence:  # a re-attached stream that repeats what was read: taken once
                return []
            self.sequence = sequence
        kind = event.get("type") or sse.event
        if kind == "response.output_text.delta":
            return self._delta("content", event)
        if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            return self._delta("reasoning", event)
        if kind == "response.reasoning_summary_part.added":
            index = event.get("summary_index")
            return self._delta("reasoning", {"delta": "\n\n"}) if isinstance(index, int) and index > 0 else []
        if kind == "response.refusal.delta":
            return self._delta("refusal", event)
        if kind == "response.output_item.added":
            self._item_added(event.get("item"))
            return []
        if kind == "response.created":
            response = event.get("response")
            response_id = response.get("id") if isinstance(response, dict) else None
            if isinstance(response_id, str) and response_id:
                self.response_id = response_id
            return []
        if kind == "response.function_call_arguments.delta":
            call = self._calls.get(str(event.get("item_id")))
            delta = event.get("delta")
            if call is not None and isinstance(delta, str):
                self._bounds.grow(call.arguments.size, len(delta))
                call.arguments.append(delta)
            return []
        if kind == "response.output_item.done":
            return self._item_done(event.get("item"))
        if kind in ("response.completed", "response.incomplete"):
            return self._terminal(event.get("response"))
        if kind == "response.failed":
            response = event.get("response")
            error = response.get("error") if isinstance(response, dict) else None
            raise stream_error(error, "the model server reported the response failed")
        if kind == "error":
            raise stream_error(event.get("error", event), "upstream sent an error event")
        return []

    def end(self, tail: list[SSEEvent] | None = None) -> list[ModelEvent]:
        """The body ended (``tail``: what :meth:`SSEDecoder.close` returned)."""
        out = feed_tail(self, tail)
        if not self.done:
            raise UpstreamError("upstream closed the stream before the model finished", code="upstream_truncated",
                                retryable=True)
        return out

    def _delta(self, kind: DeltaKind, event: dict[str, Any]) -> list[ModelEvent]:
        delta = event.get("delta")
        if not isinstance(delta, str) or not delta:
            return []
        if self._held or not delta.isascii():
            delta = mend(self._held, kind, 0, delta)
        return [TextDelta(kind, delta)] if delta else []

    def _item_added(self, item: Any) -> None:
        if isinstance(item, dict) and item.get("type") == "function_call":
            self._bounds.call()
            call = _Call(str(item.get("call_id") or item.get("id") or ""), str(item.get("name") or ""))
            if isinstance(item.get("arguments"), str) and item["arguments"]:
                self._bounds.grow(0, len(item["arguments"]))
                call.arguments.append(item["arguments"])
            self._calls[str(item.get("id") or call.call_id)] = call

    def _item_done(self, item: Any) -> list[ModelEvent]:
        if not isinstance(item, dict) or item.get("type") != "function_call":
            return []
        call = self._calls.pop(str(item.get("id") or item.get("call_id") or ""), None)
        arguments = item.get("arguments")
        if call is None:
            self._bounds.call()
        if isinstance(arguments, str):  # whole: counted once, when no deltas brought it already
            if call is None:
                self._bounds.grow(0, len(arguments))
            elif len(arguments) > MAX_TOOL_ARGUMENTS:
                self._bounds.grow(len(arguments), 0)
        else:
            arguments = call.arguments.text if call is not None else ""
        call_id = str(item.get("call_id") or (call.call_id if call else "") or f"call_{self._emitted}")
        name = str(item.get("name") or (call.name if call else ""))
        self._emitted += 1
        return [ToolCall(well_formed(call_id), well_formed(name), well_formed(arguments), self._emitted - 1)]

    def _terminal(self, response: Any) -> list[ModelEvent]:
        out: list[ModelEvent] = unmended(self._held) if self._held else []
        response = response if isinstance(response, dict) else {}
        usage = response.get("usage")
        if isinstance(usage, dict):
            prompt, completion = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
            out.append(Usage(prompt, completion, _int(usage.get("total_tokens")) or prompt + completion))
        if response.get("status") == "incomplete":
            details = response.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            self.finish_reason = _FINISH.get(str(reason), "length")
        else:
            self.finish_reason = "tool_calls" if self._emitted else "stop"
        self.done = True
        out.append(Finish(self.finish_reason))
        return out


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def response_to_events(body: dict[str, Any]) -> list[ModelEvent]:
    """Events for a whole (not streamed) ``response`` object."""
    if body.get("status") == "failed" or (body.get("error") and not body.get("output")):
        raise stream_error(body.get("error"), "the model server reported the response failed")
    out: list[ModelEvent] = []
    interpreter = ResponsesInterpreter()
    for item in body.get("output") or ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "reasoning":
            text = "\n\n".join(part.get("text", "") for part in item.get("summary") or () if isinstance(part, dict))
            text = text or "".join(part.get("text", "") for part in item.get("content") or ()
                                   if isinstance(part, dict))
            if text:
                out.append(TextDelta("reasoning", well_formed(text)))
        elif item.get("type") == "message":
            for part in item.get("content") or ():
                if isinstance(part, dict) and part.get("type") == "output_text" and part.get("text"):
                    out.append(TextDelta("content", well_formed(str(part["text"]))))
                elif isinstance(part, dict) and part.get("type") == "refusal" and part.get("refusal"):
                    out.append(TextDelta("refusal", well_formed(str(part["refusal"]))))
        elif item.get("type") == "function_call":
            out += interpreter._item_done(item)
    return out + interpreter._terminal({**body, "output": []})
