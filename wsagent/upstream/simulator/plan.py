"""What the simulated model says to a request, decided deterministically; no I/O.

:func:`directives` reads a request's ``sim`` switches (the package's docstring lists them), :func:`cap`
holds them to what one answer may hold, and :func:`plan` decides the answer: reasoning, text or tool
calls, and how it finishes. The wire formats (:mod:`.chat_format`, :mod:`.responses_format`) write a
:class:`Plan` out; the app (:mod:`.app`) paces it and injects the faults the switches ask for.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .schema import formatted
from .settings import SimulatorSettings

__all__ = ["MAX_CHARS", "MAX_TOKENS", "Plan", "cap", "directives", "last_user_text", "plan", "text_of"]

_DIRECTIVE = re.compile(r"\bsim:(\w+)=(\S+)")
_EXPRESSION = re.compile(r"[-+*/%^().\d\s]*\d[-+*/%^().\d\s]*[-+*/%^][-+*/%^().\d\s]*\d[-+*/%^().\d\s]*")
_VOCABULARY = (
    "streams tokens as they arrive so people see the answer grow instead of waiting for all of it "
    "a websocket keeps one connection open in both directions while the model writes its reply "
    "backpressure slows the reader down when the browser cannot keep up and memory stays bounded "
    "every run ends with one terminal event and a client that leaves stops the generation at once"
).split()


#: What one answer may hold, whatever the switches ask: tokens, and characters (``pad`` x tokens, ``long``).
MAX_TOKENS = 1_000_000
MAX_CHARS = 16 * 1024 * 1024


def cap(switches: dict[str, str]) -> dict[str, str]:
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


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message (the prompt)."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def directives(body: dict[str, Any]) -> tuple[dict[str, str], str]:
    """Switches from the body's ``sim`` object and the last user message; the prompt without them."""
    switches: dict[str, str] = {}
    prompt = last_user_text(body)
    for key, value in _DIRECTIVE.findall(prompt):
        switches[key] = value
    prompt = _DIRECTIVE.sub("", prompt).strip()
    sim = body.get("sim")
    if isinstance(sim, dict):
        switches.update({str(k): str(v) if not isinstance(v, str) else v for k, v in sim.items()})
    return switches, prompt


def text_of(content: Any) -> str:
    """A message's content as text: a string as it is, a list of parts as their texts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


@dataclass
class Plan:
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


def continued(body: dict[str, Any]) -> str | None:
    """The partial answer a chat completions request asks the model to continue (vLLM's
    ``continue_final_message``, with ``add_generation_prompt: false``: the last message is the assistant's,
    unfinished), or None."""
    messages = body.get("messages")
    if body.get("continue_final_message") is not True or not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return None
    return text_of(last.get("content"))


def plan(body: dict[str, Any], switches: dict[str, str], prompt: str, settings: SimulatorSettings) -> Plan:
    """Decide, deterministically, what the simulated model says to this request. A request that continues a
    partial answer (:func:`continued`) gets the rest of what the request without it gets: no reasoning, and
    none of the partial answer's tokens again."""
    prefix = continued(body)
    if prefix is not None:
        whole = plan({**body, "messages": body["messages"][:-1], "continue_final_message": False}, switches,
                     prompt, settings)
        rest: list[str] = []
        taken = 0
        for token in whole.content:  # the tokens past the prefix (one it ends inside, from there)
            if taken + len(token) > len(prefix):
                rest.append(token[max(0, len(prefix) - taken):])
            taken += len(token)
        if not "".join(whole.content).startswith(prefix):
            rest = whole.content
        return Plan([], rest, whole.tool_calls, whole.finish_reason, whole.prompt_tokens + len(prefix.split()))
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    clean = [(m.get("role"), _DIRECTIVE.sub("", text_of(m.get("content"))).strip()) for m in messages]
    prompt_tokens = sum(len(text.split()) for _, text in clean) + 4 * len(messages)
    seed = hashlib.sha256(json.dumps(clean).encode()).digest()
    limit = int(switches.get("tokens", settings.tokens))
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    reasoning_on = switches.get("reasoning", "1" if settings.reasoning else "0") != "0"
    system = next((text_of(m.get("content")) for m in messages if m.get("role") == "system"), "")
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
            return Plan(
                reasoning=_words(f"The request needs the {names} tool, so I will call it.") if reasoning_on else [],
                content=[],
                tool_calls=calls,
                finish_reason="tool_calls",
                prompt_tokens=prompt_tokens,
            )

    if last_role == "tool":
        results = [text_of(m.get("content")) for m in messages[_tool_results_start(messages):]]
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
    shaped = formatted(body.get("response_format"), " ".join(tokens).strip())
    if shaped is not None:  # a JSON answer, whole (cutting it to a token limit would break it), in pieces
        tokens = [shaped[i:i + 8] for i in range(0, len(shaped), 8)]
    finish = "stop"
    if isinstance(max_tokens, int) and 0 < max_tokens < len(tokens):
        tokens = tokens[:max_tokens]
        finish = "length"
    return Plan(
        reasoning=_words(thought) if reasoning_on else [],
        content=tokens,
        tool_calls=[],
        finish_reason=finish,
        prompt_tokens=prompt_tokens,
    )


def _tool_results_start(messages: Sequence[dict[str, Any]]) -> int:
    """Index of the first of the trailing ``tool`` messages."""
    start = len(messages)
    while start > 0 and messages[start - 1].get("role") == "tool":
        start -= 1
    return start
