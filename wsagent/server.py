"""The asyncio server: handshake decisions, one handler task per connection, shutdown.

Everything before the upgrade happens in :meth:`WsAgentServer.process_request`
(plain HTTP answers, 404, 405, 503); everything after it in
:meth:`WsAgentServer.handler`, which looks the path up in the route table
(:mod:`wsagent.routes`) and hands the connection to that route's handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
import json
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import suppress
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from .agent import build_workflows, load_workflows
from .auth import (
    CLOSE_INVALID_TOKEN,
    CLOSE_RATE_LIMIT,
    SUBPROTOCOL,
    Authenticator,
    AuthError,
    TokenBucket,
    token_from_request,
)
from .compression import lazy_deflate
from .config import RELOADABLE, Settings
from .connections import Connection, ConnectionManager, StreamConnection, close_or_abort
from .events import encode_message, json_object
from .logs import Redactor
from .metrics import Metrics
from .metrics import render as render_metrics
from .relay import RunRegistry
from .router import Router
from .simulator import SimulatorServer, SimulatorSettings
from .tools import BUILTIN_TOOLS
from .upstream import UpstreamClient, UpstreamConfig

__all__ = ["WsAgentServer", "http_response", "WORKER_OF"]

log = logging.getLogger("wsagent.server")

#: Set in the environment of each worker that ``--workers`` starts (the supervisor's pid).
WORKER_OF = "WSAGENT_WORKER_OF"

HttpHandler = Callable[["WsAgentServer", ServerConnection, Request], Response]


def http_response(status: int, body: str | bytes, content_type: str = "text/plain; charset=utf-8",
                  extra: dict[str, str] | None = None) -> Response:
    """A complete plain HTTP response (the connection closes after it)."""
    data = body.encode() if isinstance(body, str) else body
    code = http.HTTPStatus(status)
    headers = Headers([
        ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())),
        ("Connection", "close"),
        ("Content-Length", str(len(data))),
        ("Content-Type", content_type),
    ])
    for key, value in (extra or {}).items():
        headers[key] = value
    return Response(code.value, code.phrase, headers, data)


class WsAgentServer:
    """wsagent's server. Use as ``async with WsAgentServer(settings) as server: ...``."""

    def __init__(self, settings: Settings | None = None, upstream: UpstreamClient | None = None,
                 sock: socket.socket | None = None) -> None:
        from .routes import HTTP_ROUTES, ROUTES

        self.settings = settings or Settings()
        self.router = Router(ROUTES)
        self.http_routes: dict[str, HttpHandler] = dict(HTTP_ROUTES)
        self.manager = ConnectionManager(self.settings.max_connections, self.settings.client_id_policy)
        self.auth = Authenticator(self.settings)
        self.origins = {o.strip() for o in self.settings.allowed_origins.split(",") if o.strip()}
        self.runs = RunRegistry()
        self.metrics = Metrics()
        self.upstream: UpstreamClient | None = upstream
        self.workflows: dict[str, Any] = {}
        self.simulator: SimulatorServer | None = None
        self.started = time.monotonic()
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = False
        self.sock = sock
        self.worker_header = str(os.getpid())

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> WsAgentServer:
        s = self.settings
        if self.upstream is None:
            base_url = s.upstream_url
            if not base_url:
                self.simulator = await SimulatorServer(
                    SimulatorSettings(rate=s.sim_rate, tokens=s.sim_tokens, model=s.model)).start()
                base_url = self.simulator.base_url
                log.info("no upstream configured: streaming from the built-in simulator at %s", base_url)
            self.upstream = UpstreamClient(metrics=self.metrics, config=UpstreamConfig(
                base_url=base_url,
                api_key=s.api_key,
                model=s.model,
                connect_timeout=s.connect_timeout,
                first_byte_timeout=s.first_byte_timeout,
                read_timeout=s.read_timeout,
                max_retries=s.max_retries,
                receive_buffer=s.upstream_receive_buffer,
            ))
        else:
            self.upstream.metrics = self.metrics
        self.workflows = self._load_workflows()
        listen: dict[str, Any] = {"sock": self.sock} if self.sock is not None else {
            "host": s.host, "port": s.port, "reuse_port": WORKER_OF in os.environ}
        self._server = await serve(
            self.handler,
            process_request=self.process_request,
            process_response=self.process_response,
            create_connection=StreamConnection,
            compression=None,
            extensions=lazy_deflate() if s.compression == "deflate" else None,
            open_timeout=s.open_timeout or None,
            ping_interval=s.ping_interval or None,
            ping_timeout=s.ping_timeout or None,
            close_timeout=s.close_timeout,
            max_size=s.max_message_size,
            max_queue=16,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            select_subprotocol=_select_subprotocol,
            logger=_library_logger(),
            **listen,
        )
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        log.info("wsagent listening on %s", self.url)
        return self

    def _load_workflows(self) -> dict[str, Any]:
        assert self.upstream is not None
        path = self.settings.workflows
        if path:
            return load_workflows(path, self.upstream, BUILTIN_TOOLS)
        spec = json.loads(resources.files("wsagent").joinpath("data/workflows.json").read_text(encoding="utf-8"))
        return build_workflows(spec, self.upstream, BUILTIN_TOOLS)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        assert self._server is not None
        host = self._server.sockets[0].getsockname()[0]
        return f"ws://{host}:{self.port}"

    def reload(self, new: Settings) -> list[str]:
        """Apply the settings that are safe to change live (SIGHUP); returns those that need a restart."""
        old = self.settings
        changed = {f.name for f in dataclasses.fields(Settings) if getattr(new, f.name) != getattr(old, f.name)}
        later = sorted(changed - RELOADABLE)
        applied = {name: getattr(new, name) for name in changed & RELOADABLE}
        auth = Authenticator(dataclasses.replace(old, **applied))
        self.settings = dataclasses.replace(old, **applied)
        self.auth = auth
        self.origins = {o.strip() for o in self.settings.allowed_origins.split(",") if o.strip()}
        self.manager.max_connections = self.settings.max_connections
        self.manager.client_id_policy = self.settings.client_id_policy
        self.workflows = self._load_workflows()
        logging.getLogger().setLevel(self.settings.log_level.upper())
        log.info("reloaded: %s changed%s", ", ".join(sorted(applied)) or "nothing",
                 f"; needs a restart: {', '.join(later)}" if later else "")
        return later

    async def __aenter__(self) -> WsAgentServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(drain=0)

    async def stop(self, drain: float | None = None) -> None:
        """Stop accepting, let in-flight streams finish for ``drain`` seconds, cancel the rest,
        close every client with 1001, and release the upstream."""
        if self._stopped:
            return
        self._stopped = True
        self.draining = True
        drain = self.settings.drain_timeout if drain is None else drain
        if self._server is not None:
            self._server.server.close()
            if drain > 0 and not self._idle.is_set():
                log.info("draining %d in-flight streams for up to %.1fs", self.inflight, drain)
                with suppress(TimeoutError):
                    async with asyncio.timeout(drain):
                        await self._idle.wait()
            for run in self.runs.active():
                run.cancel("server shutting down")
            with suppress(TimeoutError):
                async with asyncio.timeout(self.settings.close_timeout):
                    await asyncio.gather(*(conn.outbox.flush() for conn in self.manager))
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await self._sweeper
        if self.upstream is not None:
            await self.upstream.close()
        if self.simulator is not None:
            await self.simulator.stop()
        log.info("wsagent stopped")

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """``with server.busy():`` marks a stream in flight, for the drain on shutdown."""
        self.stream_started()
        try:
            yield
        finally:
            self.stream_ended()

    def stream_started(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def stream_ended(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def _sweep(self) -> None:
        interval = max(0.05, min(1.0, self.settings.slow_client_timeout / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            self.manager.sweep(loop.time(), self.settings.slow_client_timeout)

    # -- HTTP, before the upgrade ----------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if request.method != "GET":
            text = "" if request.method == "HEAD" else (
                f"{request.method} is not supported: wsagent answers GET only "
                "(a WebSocket upgrade, or GET /healthz).\n")
            return http_response(405, text, extra={"Allow": "GET"})
        http_handler = self.http_routes.get(path)
        if http_handler is not None:
            return http_handler(self, connection, request)
        if self.router.match(path) is None:
            return http_response(404, f"No WebSocket route at {path}.\n")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return http_response(426, f"{path} is a WebSocket endpoint: connect with a WebSocket client.\n",
                                 extra={"Upgrade": "websocket"})
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin, request.headers.get("Host", "")):
            return http_response(403, f"Origin {origin} may not connect; see --allowed-origins.\n")
        if self.draining:
            return http_response(503, "Server is shutting down.\n", extra={"Retry-After": "1"})
        if self.manager.full:
            return http_response(503, "Too many connections; try again later.\n", extra={"Retry-After": "1"})
        if self.manager.from_ip(_ip(connection.remote_address)) >= self.settings.max_connections_per_ip:
            return http_response(429, "Too many connections from your address.\n", extra={"Retry-After": "1"})
        return None

    def process_response(self, connection: ServerConnection, request: Request, response: Response) -> None:
        """Name the worker process that took the connection (``--workers``: which one drains it)."""
        response.headers["X-Wsagent-Worker"] = self.worker_header

    def origin_allowed(self, origin: str, host: str) -> bool:
        """Browsers send Origin; a page on another site may not use a browser's network position.

        With no list, only pages served by this server's own host:port may connect.
        """
        if "*" in self.origins or origin in self.origins:
            return True
        if self.origins:
            return False
        return urlsplit(origin).netloc.lower() == host.lower()

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.draining else "ok",
            "connections": len(self.manager),
            "runs_active": len(self.runs.active()),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "worker": os.getpid(),
        }

    # -- WebSocket, after the upgrade ------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        path = ws.request.path.partition("?")[0] if ws.request else "/"
        match = self.router.match(path)
        if match is None:  # process_request refused it already; defensive for custom routers
            return
        route, params = match
        remote = ws.remote_address
        remote_text = f"{remote[0]}:{remote[1]}" if isinstance(remote, tuple) else str(remote)
        conn = Connection(ws, path, params, remote_text, self.settings.outbox_bytes, self.settings.close_timeout,
                          route=route.pattern, ip=_ip(remote))
        if self.settings.socket_send_buffer:
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.socket_send_buffer)
        self.manager.register(conn, route.pattern)
        log.info("open %s %s from %s", conn.id, path, remote_text, extra={"conn": conn.id})
        try:
            refusal = self.authenticate(conn, route.pattern, route.auth or self.settings.require_auth)
            if refusal is not None:
                code, reason = refusal
                await close_or_abort(ws, code, reason, self.settings.close_timeout)
                return
            await route.handler(self, conn)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("handler for %s failed on %s", path, conn.id)
            await close_or_abort(ws, 1011, "internal error", self.settings.close_timeout)
        finally:
            if conn.expiry_timer is not None:
                conn.expiry_timer.cancel()
            await self.release(conn)
            await close_or_abort(ws, 1000, "", self.settings.close_timeout)
            conn.outbox.close()
            self.manager.unregister(conn)
            sent = ws.protocol.close_sent
            log.info("close %s %s from %s code=%s duration=%.3fs", conn.id, path, remote_text,
                     sent.code if sent is not None else ws.close_code, time.monotonic() - conn.opened,
                     extra={"conn": conn.id})

    def authenticate(self, conn: Connection, route: str, required: bool) -> tuple[int, str] | None:
        """Who the client is; a (close code, reason) if it may not stay. A token is checked whenever one is
        sent, and needed where the route (or ``--require-auth``) says so."""
        assert conn.ws.request is not None
        token = token_from_request(conn.ws.request)
        if token is None and not required:
            return None
        try:
            identity = self.auth.verify(token)
            identity.may_use(route, conn.params)
        except AuthError as exc:
            log.info("refused %s %s: %s (%s)", conn.id, conn.path, exc.reason, exc.detail)
            return exc.code, exc.reason
        if self.manager.set_user(conn, identity.user) > self.settings.max_connections_per_user:
            return CLOSE_RATE_LIMIT, "Too many connections for this user"
        self._expire_at(conn, identity.expires)
        return None

    def _expire_at(self, conn: Connection, expires: float) -> None:
        if conn.expiry_timer is not None:
            conn.expiry_timer.cancel()
            conn.expiry_timer = None
        conn.expires = expires
        if expires != math.inf:
            delay = max(0.0, expires - time.time())
            conn.expiry_timer = asyncio.get_running_loop().call_later(
                delay, conn.close_soon, CLOSE_INVALID_TOKEN, "Token expired")

    def refresh(self, conn: Connection, token: object) -> str:
        """``{"type": "auth", "token": ...}`` in band: a new token for the same user moves the expiry."""
        try:
            identity = self.auth.verify(token if isinstance(token, str) else None)
        except AuthError as exc:
            return encode_message("error", code="invalid_token", message=f"token refused: {exc.detail}")
        if conn.user is not None and identity.user != conn.user:
            return encode_message("error", code="forbidden", message="a refreshed token must be for the same user")
        if conn.user is None:
            self.manager.set_user(conn, identity.user)
        self._expire_at(conn, identity.expires)
        return encode_message("auth", status="ok", user=identity.user,
                              expires=None if identity.expires == math.inf else identity.expires)

    async def incoming(self, conn: Connection, refuse: Callable[[str, str], str],
                       idle: float | None = None) -> AsyncIterator[str | bytes | None]:
        """A connection's messages, rate limited, with in-band token refresh taken out.

        Yields ``None`` after ``idle`` seconds without a message. Over the rate, a
        message is refused with ``refuse(code, text)``; a client that keeps going
        past another burst's worth is closed with 4029.
        """
        ws = conn.ws
        bucket = TokenBucket(self.settings.messages_per_second, self.settings.message_burst)
        strikes = 0
        while True:
            if idle:
                try:
                    async with asyncio.timeout(idle):
                        message = await ws.recv()
                except TimeoutError:
                    yield None
                    continue
            else:
                message = await ws.recv()
            if not bucket.allow():
                strikes += 1
                if strikes > self.settings.message_burst:
                    conn.close_soon(CLOSE_RATE_LIMIT, "Rate limit exceeded", flush=True)
                    await ws.wait_closed()
                    return
                conn.outbox.put(refuse("rate_limited",
                                       f"over {self.settings.messages_per_second:g} messages per second"))
                continue
            strikes = 0
            if isinstance(message, str) and message[:1] == "{" and '"auth"' in message:
                request = json_object(message)
                if request is not None and request.get("type") == "auth":
                    conn.outbox.put(self.refresh(conn, request.get("token")))
                    continue
            yield message

    async def release(self, conn: Connection) -> None:
        """The client is gone: cancel what it owned, or keep it for a resume within the grace period."""
        for sub in conn.outbox.subscriptions:
            run = sub.run
            run.unsubscribe(sub)
            if run.owner is conn and not run.finished:
                if self.settings.resume_grace > 0 and not self.draining:
                    run.owner = None
                    run.orphan(self.settings.resume_grace)
                else:
                    run.cancel("client disconnected")


def _library_logger() -> logging.Logger:
    logger = logging.getLogger("wsagent.websockets")
    if not any(isinstance(f, Redactor) for f in logger.filters):
        logger.addFilter(Redactor())
    return logger


def _ip(remote: Any) -> str:
    return str(remote[0]) if isinstance(remote, tuple) else str(remote)


def _select_subprotocol(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Pick ``wsagent`` when offered; never echo a ``bearer.<token>`` entry back."""
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in offered else None


def healthz(server: WsAgentServer, connection: ServerConnection, request: Request) -> Response:
    return http_response(200, json.dumps(server.health()), "application/json")


def metrics(server: WsAgentServer, connection: ServerConnection, request: Request) -> Response:
    return http_response(200, render_metrics(server), "text/plain; version=0.0.4; charset=utf-8")
