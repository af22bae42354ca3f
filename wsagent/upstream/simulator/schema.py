"""A JSON answer in the shape a request's ``response_format`` asks for; no I/O."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["formatted"]


def formatted(response_format: Any, text: str) -> str | None:
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
