"""The tutorial's routes, wire-compatible with its clients.

``/ws`` (uppercase echo), ``/ws/agent`` (words, then ``[DONE]``),
``/ws/agent-thoughts`` (thinking, action, observation, answer, then
``{"type": "done"}``), ``/ws/robust`` (the same with an idle ping and error
messages) and ``/ws/{client_id}`` (a client-addressed stream plus broadcast).

Every prompt is a run like any other (budgets, limits, metrics, transcripts,
the ``run`` log line); the route only picks its renderer
(:mod:`wsagent.core.render`). Prompts are answered in order; the handler keeps
reading meanwhile, so a client that leaves is noticed at once and its run is
cancelled, which closes the upstream request.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from ..core.errors import ClusterUnavailable, ProtocolViolation
from ..core.events import Producer, encode_message, json_object
from ..core.render import Renderer, Thoughts, Words
from ..engine.run import Run
from ..transport.connections import Connection, utf8_size
from ..upstream.agents.builtin import assistant
from ..upstream.completion import model_batches
from .app import App

__all__ = ["echo_upper", "agent_words", "agent_thoughts", "robust", "client_addressed"]

_QUEUED_PROMPTS = 8
#: ``/ws/agent-thoughts?agent=<name>`` names no agent the server has.
CLOSE_BAD_AGENT = 1008


def _text_refusal(code: str, message: str, refused: str | bytes) -> str:
    return f"[ERROR] {message}"


def _json_refusal(code: str, message: str, refused: str | bytes) -> str:
    return encode_message("error", code=code, message=message)


async def echo_upper(app: App, conn: Connection) -> None:
    async for message in app.incoming(conn, _text_refusal):
        if message is None:
            continue
        conn.put("[ERROR] /ws takes text frames" if isinstance(message, bytes) else message.upper())


async def _prompts(
    app: App,
    conn: Connection,
    producer: Callable[[str], Producer],
    renderer: Callable[[], Renderer],
    *,
    model: str | None = None,
    idle_ping: float | None = None,
    refuse: Callable[[str, str, str | bytes], str] = _text_refusal,
    intercept: Callable[[str], Awaitable[bool]] | None = None,
) -> None:
    """Each prompt becomes a run rendered by ``renderer``, started once the previous one has ended.
    ``intercept`` may take a message that is not a prompt (True: handled)."""
    previous: Run | None = None
    count = 0
    async for message in app.incoming(conn, refuse, idle_ping):
        if message is None:
            conn.put(encode_message("ping"))
            continue
        if isinstance(message, bytes):
            conn.put(refuse("bad_request", "send prompts as text frames", message))
            continue
        if intercept is not None and await intercept(message):
            continue
        refusal = await app.admit(conn, _QUEUED_PROMPTS)
        if refusal is not None:
            conn.put(refuse(*refusal, message))
            continue
        while True:  # a user's ids are shared by their sockets, on every node: the next free one
            count += 1
            try:
                run = await app.new_run(conn, f"{conn.id}-{count}")
                break
            except ProtocolViolation:
                continue
        run.askable = False  # these clients cannot answer: a call that needs approval is denied
        run.subscribe(conn.outbox, 0, renderer(), primary=True)
        app.start(conn, run, functools.partial(producer, message), model=model, after=previous)
        previous = run


def _model(app: App) -> Callable[[str], Producer]:
    return lambda prompt: model_batches(app.upstream, [{"role": "user", "content": prompt}])


def _agent(app: App, conn: Connection) -> Callable[[str], Producer]:
    """The built-in agent, or the one ``?agent=<name>`` names (``--agents``)."""
    assert conn.ws.request is not None
    names = parse_qs(urlsplit(conn.ws.request.path).query).get("agent")
    if not names or names[0] == "assistant":
        return lambda prompt: assistant(app.upstream, None, app.settings.approval_tools).batches(prompt)
    app.check_agent(names[0])  # refused before any prompt
    return lambda prompt: app.agent_producer(names[0], [{"role": "user", "content": prompt}], {})


async def agent_words(app: App, conn: Connection) -> None:
    await _prompts(app, conn, _model(app), Words, model=app.upstream.config.model)


async def agent_thoughts(app: App, conn: Connection) -> None:
    await _thoughts(app, conn, None)


async def robust(app: App, conn: Connection) -> None:
    await _thoughts(app, conn, app.settings.idle_ping or None)


async def _thoughts(app: App, conn: Connection, idle_ping: float | None) -> None:
    try:
        agent = _agent(app, conn)
    except ProtocolViolation as exc:  # an error the page can show, then a close it can act on
        conn.put(encode_message("error", message=exc.message))
        conn.close_soon(CLOSE_BAD_AGENT, "Unknown agent", flush=True)
        await conn.ws.wait_closed()
        return
    await _prompts(app, conn, agent, Thoughts, idle_ping=idle_ping, refuse=_json_refusal)


async def client_addressed(app: App, conn: Connection) -> None:
    """``/ws/{client_id}``: a prompt streams back to this client, word by word;
    ``{"type": "broadcast", "content": ...}`` reaches every client-addressed connection, and
    ``{"type": "send", "to": id, "content": ...}`` the one client holding ``id``, on every node."""
    client_id = conn.params["client_id"]
    if not await app.manager.claim_client_id(conn, client_id):
        await conn.ws.close(4009, "client id already connected")
        return

    async def message_for_others(message: str) -> bool:
        request = json_object(message)
        kind = request.get("type") if request is not None else None
        if request is None or kind not in ("broadcast", "send"):
            return False
        content = request.get("content")
        to = request.get("to")
        limit = app.settings.max_broadcast_bytes
        if not isinstance(content, str):
            conn.put(encode_message("error", message=f"{kind} needs a string content"))
        elif utf8_size(content) > limit:
            conn.put(encode_message("error", message=f"{kind} too large: {utf8_size(content)} bytes, "
                                                     f"at most {limit} (--max-broadcast-bytes)"))
        elif kind == "send" and not isinstance(to, str):
            conn.put(encode_message("error", message="send needs 'to': the client id to send to"))
        else:
            try:
                if kind == "broadcast":
                    await app.broker.broadcast(encode_message("broadcast", **{"from": client_id, "content": content}))
                elif not await app.broker.send_to(str(to), encode_message("personal", **{"from": client_id,
                                                                                          "content": content})):
                    conn.put(encode_message("error", code="unknown_client", message=f"no client {to!r} is connected"))
            except ClusterUnavailable as exc:
                conn.put(encode_message("error", code=exc.code, message=exc.message, retryable=True))
        return True

    await _prompts(app, conn, _model(app), Words, model=app.upstream.config.model, intercept=message_for_others)
