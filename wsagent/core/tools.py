"""Tools an agent may call: plain async functions with a schema from their signature.

A tool that raises, times out, or is called with arguments that are not valid
JSON for it becomes an observation that carries the error; the agent loop
goes on. A tool never holds the event loop: work that could take long is
bounded before it starts and runs in a worker thread (the calculator refuses
a result over :data:`MAX_BITS` before computing it), and every call has a time
limit (``ToolBox(timeout=...)``).
"""

from __future__ import annotations

import ast
import asyncio
import datetime as _dt
import inspect
import json
import math
import operator
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any, get_type_hints

from .events import well_formed, well_formed_json

__all__ = ["Tool", "ToolBox", "tool", "calculator", "current_time", "search_notes", "BUILTIN_TOOLS", "evaluate",
           "MAX_BITS"]

#: The largest integer the calculator computes: 4,096 bits (1,234 digits), a few microseconds of work.
#: ``((9**99)**999)**99`` once froze every other stream for 7 s.
MAX_BITS = 4096

ToolFunction = Callable[..., Awaitable[Any]]

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    function: ToolFunction
    needs_approval: bool = False  # a person approves each call first (docs/person-in-the-loop.md)

    def schema(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def _param_docs(doc: str) -> dict[str, str]:
    """``name: text`` lines under an ``Args:`` heading of a docstring."""
    found: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args:
            match = re.match(r"(\w+)\s*(?:\([^)]*\))?:\s*(.+)", stripped)
            if match:
                found[match.group(1)] = match.group(2)
            elif not stripped:
                in_args = False
    return found


def tool(function: ToolFunction | None = None, *, name: str | None = None, needs_approval: bool = False) -> Any:
    """Make a :class:`Tool` from an async function; usable as ``@tool``, ``@tool(needs_approval=True)`` or
    ``tool(fn)``. A tool that ``needs_approval`` runs only once a person has approved the call."""

    def build(fn: ToolFunction) -> Tool:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"tool {fn.__name__} must be an async function")
        doc = inspect.getdoc(fn) or ""
        hints = get_type_hints(fn)
        docs = _param_docs(doc)
        properties: dict[str, Any] = {}
        required: list[str] = []
        for pname, param in inspect.signature(fn).parameters.items():
            kind = _JSON_TYPES.get(hints.get(pname, str), "string")
            prop: dict[str, Any] = {"type": kind}
            if pname in docs:
                prop["description"] = docs[pname]
            properties[pname] = prop
            if param.default is inspect.Parameter.empty:
                required.append(pname)
        summary = doc.split("\n\n")[0].strip() or fn.__name__
        parameters = {"type": "object", "properties": properties, "required": required}
        return Tool(name or fn.__name__, summary, parameters, fn, needs_approval)

    return build(function) if function is not None else build


class ToolBox:
    """The tools one agent may use, looked up by name; each call may take ``timeout`` seconds."""

    def __init__(self, tools: Iterable[Tool | ToolFunction] = (), timeout: float = 10.0,
                 needs_approval: Iterable[str] = ()) -> None:
        self.timeout = timeout
        self._tools: dict[str, Tool] = {}
        for item in tools:
            t = item if isinstance(item, Tool) else tool(item)
            self._tools[t.name] = t
        asked = set(needs_approval)
        self._asking = frozenset(name for name, t in self._tools.items()
                                 if t.needs_approval or name in asked or "*" in asked)

    def __bool__(self) -> bool:
        return bool(self._tools)

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def needs_approval(self, name: str) -> bool:
        """Whether a call to ``name`` waits for a person's approval (the tool says so, or its agent does)."""
        return name in self._asking

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self._tools.values()]

    async def call(self, name: str, arguments: str) -> tuple[str, bool]:
        """Run a tool; returns (observation text, is_error). Never raises; gives up after ``timeout`` seconds."""
        t = self._tools.get(name)
        if t is None:
            return f"error: no tool named {name!r}", True
        try:
            args = well_formed_json(json.loads(arguments or "{}"))  # "\\ud800" in ASCII arguments is a lone surrogate
        except (ValueError, RecursionError) as exc:
            return f"error: arguments are not valid JSON ({exc}): {arguments[:200]}", True
        if not isinstance(args, dict):
            return "error: arguments must be a JSON object", True
        try:
            async with asyncio.timeout(self.timeout):
                result = await t.function(**args)
            return well_formed(result if isinstance(result, str) else json.dumps(result, default=str)), False
        except TimeoutError:
            return f"error: {name} took longer than {self.timeout:g}s and was stopped", True
        except TypeError as exc:
            return f"error: bad arguments for {name}: {exc}", True
        except Exception as exc:  # a tool's failure is the model's observation, not our crash
            return f"error: {type(exc).__name__}: {exc}", True


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "abs": abs, "round": round, "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "log": math.log, "exp": math.exp, "floor": math.floor, "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def evaluate(expression: str) -> float | int:
    """Arithmetic by walking the syntax tree: numbers, + - * / // % **, a few math functions.

    No ``eval``: names, attributes and calls other than the listed functions are refused. An
    integer result over :data:`MAX_BITS` is refused from its operands' sizes, before it is computed.
    """
    if len(expression) > 500:
        raise ValueError("expression too long")
    tree = ast.parse(expression.replace("^", "**"), mode="eval")

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1000:
                raise ValueError("exponent too large")
            if isinstance(left, int) and isinstance(right, int) and _bits(node.op, left, right) > MAX_BITS:
                raise ValueError(f"the result would have over {MAX_BITS} bits; refused")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                and not node.keywords):
            return _FUNCTIONS[node.func.id](*(walk(arg) for arg in node.args))
        raise ValueError(f"unsupported expression element: {type(node).__name__}")

    result: float | int = walk(tree)
    return result


def _bits(op: ast.operator, left: int, right: int) -> int:
    """The fewest bits ``left op right`` can have, from its operands' sizes alone (so a result
    this refuses is certainly too large; one it lets through has at most twice ``MAX_BITS``)."""
    if isinstance(op, ast.Pow):
        return (left.bit_length() - 1) * right + 1 if right > 0 else 1
    if isinstance(op, ast.Mult):
        return left.bit_length() + right.bit_length() - 1
    return max(left.bit_length(), right.bit_length())


@tool
async def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly as written.

    Args:
        expression: arithmetic such as "2 + 3 * (4 - 1)" or "sqrt(2) ^ 2"
    """
    return await asyncio.to_thread(_calculate, expression)


def _calculate(expression: str) -> str:
    return f"{expression} = {evaluate(expression)}"


@tool
async def current_time(timezone: str = "UTC") -> str:
    """The current date and time.

    Args:
        timezone: "UTC" (the only zone this tool knows)
    """
    if timezone.upper() != "UTC":
        raise ValueError(f"unknown timezone {timezone!r}; only UTC is known")
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _corpus() -> list[tuple[str, str]]:
    text = resources.files("wsagent").joinpath("data/notes.md").read_text(encoding="utf-8")
    sections = []
    for block in text.split("\n## ")[1:]:
        title, _, body = block.partition("\n")
        sections.append((title.strip(), " ".join(body.split())))
    return sections


@tool
async def search_notes(query: str) -> str:
    """Search wsagent's notes on streaming, WebSockets and agents; returns the best matches.

    Args:
        query: words to look for
    """
    words = {w for w in re.findall(r"[a-z0-9]+", query.lower()) if len(w) > 2}
    scored = []
    for title, body in _corpus():
        haystack = f"{title} {body}".lower()
        score = sum(haystack.count(w) for w in words)
        if score:
            scored.append((score, title, body))
    scored.sort(key=lambda item: -item[0])
    if not scored:
        return f"no notes match {query!r}"
    return "\n".join(f"{title}: {body[:300]}" for _, title, body in scored[:2])


BUILTIN_TOOLS: tuple[Tool, ...] = (calculator, current_time, search_notes)
