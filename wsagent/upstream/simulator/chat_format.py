"""The chat completions wire format: a :class:`~.plan.Plan` as ``chat.completion.chunk`` events, or
as one ``chat.completion``."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from .plan import Plan

__all__ = ["ChatFormat"]


class ChatFormat:
    """``chat.completion.chunk`` events, and the whole ``chat.completion``."""

    def __init__(self, body: dict[str, Any], model: str, the_plan: Plan, nl: str) -> None:
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


def _usage(the_plan: Plan, completion: int) -> dict[str, Any]:
    """As OpenAI writes it, details included (swarms' detailed streaming, through litellm, failed on usage
    without ``prompt_tokens_details``: ``'NoneType' object has no attribute 'audio_tokens'``)."""
    return {"prompt_tokens": the_plan.prompt_tokens, "completion_tokens": completion,
            "total_tokens": the_plan.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": len(the_plan.reasoning), "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
