"""The tutorial's routes, wire-compatible with its clients.

``/ws`` (uppercase echo), ``/ws/agent`` (words, then ``[DONE]``),
``/ws/agent-thoughts`` (thinking, action, observation, answer, then
``{"type": "done"}``), ``/ws/robust`` (the same with an idle ping and error
messages) and ``/ws/{client_id}`` (a client-addressed stream plus broadcast).

Each prompt is handled by a worker task while the handler keeps reading, so a
client that leaves is noticed at once and its upstream request is closed
(the worker is cancelled, and the stream's ``aclosing`` closes the socket).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from typing import TYPE_CHECKING

from websockets.exceptions import ConnectionClosed

from .agent import Agent
from .chunks import TextDelta
from .connections import Connection
from .errors import UpstreamError
from .events import Action, Answer, ErrorEvent, Event, Observation, Thinking, encode_message, json_object
from .tools import BUILTIN_TOOLS

if TYPE_CHECKING:
    from .server import WsAgentServer

__all__ = ["echo_upper", "agent_words", "agent_thoughts", "robust", "client_addressed"]

log = logging.getLogger("wsagent.tutorial")

_QUEUED_PROMPTS = 8
_SENTENCE_END = (".", "!", "?", "\n")


def _text_refusal(code: str, message: str) -> str:
    return f"[ERROR] {message}"


def _json_refusal(code: str, message: str) -> str:
    return encode_message("error", code=code, message=message)


async def echo_upper(server: WsAgentServer, conn: Connection) -> None:
    async for message in server.incoming(conn, _text_refusal):
        if message is None:
            continue
        if isinstance(message, bytes):
            await conn.send("[ERROR] /ws takes text frames")
        else:
            await conn.send(message.upper())


async def _prompts(
    server: WsAgentServer,
    conn: Connection,
    respond: Callable[[str], Awaitable[None]],
    *,
    idle_ping: float | None = None,
    refuse: Callable[[str, str], str] = _text_refusal,
) -> None:
    """Read prompts and answer them in order, in a worker task (see the module docstring)."""
    queue: asyncio.Queue[str] = asyncio.Queue(_QUEUED_PROMPTS)

    async def worker() -> None:
        while True:
            prompt = await queue.get()
            with server.busy():
                await respond(prompt)

    task = asyncio.get_running_loop().create_task(worker())
    try:
        async for message in server.incoming(conn, refuse, idle_ping):
            if message is None:
                conn.outbox.put(encode_message("ping"))
            elif task.done():
                break
            elif isinstance(message, bytes):
                conn.outbox.put(refuse("bad_request", "send prompts as text frames"))
            elif queue.full():
                conn.outbox.put(refuse("busy", f"too many prompts queued (at most {_QUEUED_PROMPTS})"))
            elif server.draining:
                conn.outbox.put(refuse("server_shutting_down", "server is shutting down"))
            else:
                queue.put_nowait(message)
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError, ConnectionClosed):
            await task


async def _words(server: WsAgentServer, prompt: str) -> AsyncIterator[str]:
    """The model's answer regrouped into whole words, each with its trailing space."""
    assert server.upstream is not None
    pending = ""
    async with aclosing(server.upstream.stream([{"role": "user", "content": prompt}])) as events:
        async for event in events:
            if type(event) is TextDelta and event.kind == "content" and not event.choice:
                pending += event.text
                *words, pending = pending.split(" ")
                for word in words:
                    if word:
                        yield word + " "
    if pending:
        yield pending + " "


async def agent_words(server: WsAgentServer, conn: Connection) -> None:
    async def respond(prompt: str) -> None:
        try:
            async for word in _words(server, prompt):
                await conn.send(word)
        except UpstreamError as exc:
            await conn.send(f"[ERROR] {exc.message}")
            return
        await conn.send("[DONE]")

    await _prompts(server, conn, respond)


def _agent(server: WsAgentServer) -> Agent:
    return Agent("assistant", "You are a helpful assistant. Use a tool when it helps.", None, BUILTIN_TOOLS,
                 max_loops=4, client=server.upstream)


async def _thoughts(events: AsyncIterator[Event]) -> AsyncIterator[tuple[str, str]]:
    """The tutorial's (type, content) pairs: whole sentences of thinking, answer token by token."""
    thought = ""
    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, Thinking):
                thought += event.content
                if thought.rstrip().endswith(_SENTENCE_END):
                    yield "thinking", thought.strip()
                    thought = ""
                continue
            if thought.strip():
                yield "thinking", thought.strip()
                thought = ""
            if isinstance(event, (Action, Observation, Answer)):
                yield event.type, event.content
            elif isinstance(event, ErrorEvent):
                yield "error", event.message


async def _stream_thoughts(server: WsAgentServer, conn: Connection, prompt: str) -> None:
    async for kind, content in _thoughts(_agent(server).stream(prompt)):
        key = "message" if kind == "error" else "content"
        await conn.send(json.dumps({"type": kind, key: content}))
    await conn.send('{"type": "done"}')


async def agent_thoughts(server: WsAgentServer, conn: Connection) -> None:
    await _prompts(server, conn, lambda prompt: _stream_thoughts(server, conn, prompt), refuse=_json_refusal)


async def robust(server: WsAgentServer, conn: Connection) -> None:
    await _prompts(server, conn, lambda prompt: _stream_thoughts(server, conn, prompt),
                   idle_ping=server.settings.idle_ping or None, refuse=_json_refusal)


async def client_addressed(server: WsAgentServer, conn: Connection) -> None:
    """``/ws/{client_id}``: a prompt streams back to this client through the manager;
    ``{"type": "broadcast", "content": ...}`` reaches every client-addressed connection."""
    client_id = conn.params["client_id"]
    if not server.manager.claim_client_id(conn, client_id):
        await conn.ws.close(4009, "client id already connected")
        return
    manager = server.manager

    async def respond(prompt: str) -> None:
        message = json_object(prompt)
        if message is not None and message.get("type") == "broadcast":
            content = message.get("content")
            if not isinstance(content, str):
                refusal = encode_message("error", message="broadcast needs a string content")
                await manager.send_personal(client_id, refusal)
                return
            manager.broadcast(encode_message("broadcast", **{"from": client_id, "content": content}))
            return
        try:
            async for word in _words(server, prompt):
                if not await manager.send_personal(client_id, word):
                    return
        except UpstreamError as exc:
            await manager.send_personal(client_id, f"[ERROR] {exc.message}")
            return
        await manager.send_personal(client_id, "[DONE]")

    await _prompts(server, conn, respond)
