"""The model client for OpenAI-compatible ``POST {base}/chat/completions``, or
``POST {base}/responses`` (the Responses API, ``UpstreamConfig(api="responses")``).

The decoding lives in :mod:`wsagent.core.sse`, :mod:`wsagent.core.chunks` and
:mod:`wsagent.core.responses_api`, the connections in :mod:`wsagent.upstream.http`;
this module only asks, applies timeouts
and retries, and makes sure that a consumer that stops listening closes the
TCP connection to the model server at once, so it stops generating tokens for
nobody.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from ..core.chunks import END, ChunkInterpreter, ModelEvent, Position, StreamInterpreter, completion_to_events
from ..core.errors import TAKEN_OVER, UpstreamError, error_for_status
from ..core.events import json_bytes, well_formed
from ..core.http1 import request_head
from ..core.logs import printable
from ..core.metrics import Metrics
from ..core.producing import still_producing
from ..core.responses_api import ResponsesInterpreter, response_to_events, responses_request
from ..core.sse import DEFAULT_MAX_EVENT_SIZE, SSEDecoder, SSEError
from .http import Broken, ConnectFailed, Failable, Pool, ProtocolError, Response, Truncated

__all__ = ["UpstreamClient", "UpstreamConfig", "Resume", "CONTINUE", "parse_retry_after", "DIALECTS", "as_read"]

#: The upstream dialects (``UpstreamConfig.api``) and how the startup line names them.
log = logging.getLogger("wsagent.upstream")

DIALECTS = {"chat": "OpenAI chat completions", "responses": "OpenAI Responses API"}

_RETRY_STATUSES = frozenset({408, 409, 429})


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    base_url: str
    api_key: str | None = None
    api: str = "chat"
    model: str = "wsagent-sim"
    connect_timeout: float = 10.0
    first_byte_timeout: float = 60.0
    read_timeout: float = 60.0
    max_retries: int = 2
    retry_deadline: float = 30.0
    backoff_base: float = 0.5
    backoff_cap: float = 8.0
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE
    include_usage: bool = True
    receive_buffer: int = 262144
    background: bool = False  # the Responses API's background responses: re-attached when a stream drops


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


#: The most one upstream read hands on at once. A read that joins whatever was buffered while the relay waited for
#: a slow client (630 KiB in 1,570 network chunks, measured with aiohttp's ``readany``) copies all of it, then
#: parses every event from it at once, three times the buffer at the peak. Reads of at most this much keep the copy
#: and the parsed batch this small; a relay that keeps up reads one network chunk at a time either way.
READ_BYTES = 65536

#: What is read of an error answer's body: a 500 with a 300 MB body once took the server from 60 to 345 MiB.
ERROR_BODY_BYTES = 65536
#: What of the upstream's own error message reaches a client.
ERROR_MESSAGE_CHARS = 500


async def _read_at_most(response: Response, limit: int, partial: bool = False) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the body, and whether that was all of it. ``partial``: a body that breaks off (or
    stalls past its timeout) is what came of it, not an error (an error answer's message)."""
    parts: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            data = await response.read(limit + 1 - size)
            if not data:
                return b"".join(parts), True
            parts.append(data)
            size += len(data)
    except (Truncated, Broken, ProtocolError, UpstreamError):
        if not partial:
            raise
    return b"".join(parts)[:limit], False


def _error_message(body: bytes) -> tuple[str, str | int | None]:
    """The upstream's own message and code, from an OpenAI-shaped error body or plain text, cut to
    :data:`ERROR_MESSAGE_CHARS`."""
    text = body.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        return (text[:ERROR_MESSAGE_CHARS] or "no body"), None
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):  # JSON may escape a lone surrogate: made valid text, as the interpreters make it
        code = error.get("code", error.get("type"))
        message = well_formed(str(error.get("message") or text)[:ERROR_MESSAGE_CHARS])
        return message, well_formed(code) if isinstance(code, str) else code if isinstance(code, int) else None
    return well_formed(str(error)[:ERROR_MESSAGE_CHARS]), None


class _ReadWatchdog:
    """A request's timeouts, one timer for all of them: the wait for the answer's head once the request is written
    (``first_byte_timeout``; the pool's connect has its own), then for the body's first bytes and between its bytes
    (``first_byte_timeout``, ``read_timeout``). ``asyncio.timeout`` around the request and a timer for the body
    took 55,000 instructions of a one-token run's 1,154,192 (callgrind).

    ``deadline`` is finite only while the relay waits for upstream bytes (a relay
    paused by a slow client is not an upstream that stopped sending); each read
    costs two float stores, and the one timer re-arms itself once per period.
    When a deadline passes, the waiting read fails with ``upstream_timeout``.

    The timer first fires after the shorter of the two timeouts, and from then on
    at the deadline or a period later, whichever is sooner: a deadline only moves
    forward by at most a period at a time, so each is checked when it is due.
    (Armed at the first-byte deadline, a stall after the first bytes was reported
    then: at 9 s with ``--read-timeout 2 --first-byte-timeout 9``.)
    """

    __slots__ = ("loop", "reader", "deadline", "period", "handle", "message", "first")

    def __init__(self, loop: asyncio.AbstractEventLoop, first: float, period: float) -> None:
        self.loop = loop
        self.reader: Failable | None = None
        self.first = first
        self.period = period
        self.message = ""
        self.deadline = math.inf
        self.handle: asyncio.TimerHandle | None = None

    def attach(self, reader: Failable) -> None:
        """The request is written on ``reader`` (a connection): its answer's head is due within ``first``."""
        self.watch(reader, self.first, f"the model server did not answer within {self.first:g} s")

    def watch(self, reader: Failable, within: float, message: str) -> None:
        """From now on, ``reader`` fails with ``message`` unless bytes come ``within`` seconds."""
        self.reader = reader
        self.message = message
        now = self.loop.time()
        self.deadline = deadline = now + within
        handle = self.handle
        if handle is None:
            self.handle = self.loop.call_at(now + min(within, self.period), self._check)
        elif handle.when() > deadline:
            handle.cancel()
            self.handle = self.loop.call_at(deadline, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        if now < self.deadline:
            self.handle = self.loop.call_at(min(self.deadline, now + self.period), self._check)
        elif self.reader is not None:
            self.handle = None
            self.reader.set_exception(UpstreamError(self.message, code="upstream_timeout", retryable=True))

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


#: Where a chat completion goes on (``--takeover continue``): after its answer so far, which the cluster keeps
#: with the request (a run continued this way needs no other checkpoint).
CONTINUE = "continue"


@dataclass(frozen=True, slots=True)
class Resume:
    """Where :meth:`UpstreamClient.resume` goes on from: a checkpoint (a :class:`~wsagent.core.chunks.Position`'s
    state), and for ``CONTINUE`` the original request's body (JSON) and the answer streamed so far."""

    checkpoint: str
    request: str | None = None
    answer: str = ""


def _state(response_id: str, after: int) -> str:
    """A :class:`~wsagent.core.chunks.Position`'s state: the response, and its last event read."""
    return json.dumps(["responses", response_id, after])


def _position(state: str) -> tuple[str, int]:
    """The response and sequence number in a :func:`_state` (``ValueError`` for anything else)."""
    try:
        api, response_id, after = json.loads(state)
    except (ValueError, TypeError):
        raise ValueError(f"not a position: {state[:100]!r}") from None
    if api != "responses" or not isinstance(response_id, str) or type(after) is not int or not response_id:
        raise ValueError(f"not a position: {state[:100]!r}")
    return response_id, after


_T = TypeVar("_T")


def as_read(batch: list[ModelEvent]) -> list[ModelEvent]:
    """The converter that keeps a read's model events as they are (:meth:`UpstreamClient.batches`)."""
    return batch


def _interpret(decoder: SSEDecoder, interpreter: StreamInterpreter,
               data: bytes) -> tuple[list[ModelEvent], Exception | None]:
    """The events one read completed, and the error that stopped them, if any: the events before
    an error in the stream are delivered before it is raised."""
    batch: list[ModelEvent] = []
    try:
        for sse in decoder.feed(data):
            batch += interpreter.feed(sse)
            if interpreter.done:
                break
    except (SSEError, UpstreamError) as exc:
        return batch, exc
    return batch, None


class UpstreamClient:
    """Stream completions (chat completions, or the Responses API) from one OpenAI-compatible server.

    One :class:`~wsagent.upstream.http.Pool` of connections is shared by every run of the process;
    call :meth:`close` at shutdown.
    """

    def __init__(self, config: UpstreamConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        if config.api not in DIALECTS:
            raise ValueError(f"unknown upstream api {config.api!r}: one of {', '.join(DIALECTS)}")
        self._responses = config.api == "responses"
        self._url = config.base_url.rstrip("/") + ("/responses" if self._responses else "/chat/completions")
        parts = urlsplit(config.base_url)
        self._pool = Pool(config.base_url, config.connect_timeout, config.receive_buffer)
        self._where = self._pool.where
        fields = {"Accept": "text/event-stream", "Accept-Encoding": "identity", "User-Agent": "wsagent"}
        if config.api_key:
            fields["Authorization"] = f"Bearer {config.api_key}"
        elif parts.username is not None:  # http://user:password@host/v1, as aiohttp's client sent it
            userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            fields["Authorization"] = f"Basic {base64.b64encode(userinfo.encode()).decode()}"
        self._fields = fields
        #: The head of every request for a new answer, up to its length (a request is this, a length and a body).
        self._post = request_head("POST", self._target(self._url), self._pool.authority,
                                  {**fields, "Content-Type": "application/json"})
        #: The model server's URL as it may be shown (no credentials, no query).
        self.url = urlunsplit((parts.scheme, self._where if parts.port else parts.hostname or "", parts.path, "", ""))
        self.last_success: float | None = None
        self.last_failure: tuple[float, str, str] | None = None  # when, its code and message
        self._background = self._responses and config.background
        self._cancels: set[asyncio.Task[None]] = set()  # background responses being cancelled upstream

    @staticmethod
    def _target(url: str) -> str:
        """A URL's request target: its path and query."""
        parts = urlsplit(url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    async def close(self) -> None:
        if self._cancels:  # (each bounded by the connect timeout)
            await asyncio.gather(*self._cancels, return_exceptions=True)
        self._pool.close()

    def build_body(
        self,
        messages: Sequence[dict[str, Any]],
        model: str | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = dict(params or {})
        body["model"] = model or self.config.model
        body["messages"] = list(messages)
        body["stream"] = True
        if self.config.include_usage:
            body["stream_options"] = {"include_usage": True}
        if tools:
            body["tools"] = list(tools)
        if not self._responses:
            return body
        request = responses_request(body)
        if self._background:  # the response goes on upstream, stored, whatever becomes of this connection
            request["background"] = True
            request["store"] = True
        return request

    async def stream(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        model: str | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        params: dict[str, Any] | None = None,
    ) -> AsyncGenerator[ModelEvent, None]:
        """Yield :data:`ModelEvent` s as the model writes them.

        Use it under :func:`contextlib.aclosing` (or cancel the consuming task):
        leaving early closes the upstream connection rather than returning a
        half-read one to the pool.
        """
        async with aclosing(self.batches(as_read, messages, model=model, tools=tools, params=params)) as batches:
            async for batch in batches:
                for event in batch:
                    if event is not END:
                        yield event

    def batches(
        self,
        convert: Callable[[list[ModelEvent]], list[_T]],
        messages: Sequence[dict[str, Any]],
        *,
        model: str | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        params: dict[str, Any] | None = None,
        checkpoints: bool = False,
    ) -> AsyncGenerator[list[_T], None]:
        """Like :meth:`stream`, a list per network read: the relay's hot path. Each read's events go through
        ``convert`` in the same generator step (:func:`as_read` keeps them; a run's events,
        :func:`~wsagent.upstream.completion.model_batches`: no second generator between the two). The read
        that completed the stream ends with :data:`~wsagent.core.chunks.END`.

        With ``checkpoints`` (a background response), each read ends (before ``END``) with a
        :class:`~wsagent.core.chunks.Position`: where :meth:`resume` goes on, on any node."""
        body = self.build_body(messages, model, tools, params)  # (here: a bad request fails at the call)
        return self._relay(json_bytes(body), None, None, checkpoints and self._background, convert)

    def resume(self, convert: Callable[[list[ModelEvent]], list[_T]],
               resume: Resume) -> AsyncGenerator[list[_T], None]:
        """The rest of an answer another process began, from its last :class:`~wsagent.core.chunks.Position`:
        a background response read again after its last event (nothing read twice), or (``CONTINUE``) the
        original request sent again with the partial answer as a final assistant message that the model
        server continues (vLLM's ``continue_final_message``; llama.cpp continues a trailing assistant message
        by itself), so only what was not yet streamed is generated. As :meth:`batches` with ``checkpoints``."""
        if resume.checkpoint == CONTINUE:
            body = json.loads(resume.request or "{}")
            body["messages"] = [*body.get("messages", []), {"role": "assistant", "content": resume.answer}]
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
            return self._relay(json_bytes(body), None, None, False, convert)
        response_id, after = _position(resume.checkpoint)
        interpreter = ResponsesInterpreter()
        interpreter.response_id, interpreter.sequence = response_id, after
        return self._relay(None, self._stream_url(response_id, after), interpreter, True, convert)

    async def _relay(self, payload: bytes | None, url: str | None, responses: ResponsesInterpreter | None,
                     checkpoints: bool, convert: Callable[[list[ModelEvent]], list[_T]],
                     ) -> AsyncGenerator[list[_T], None]:
        """POST ``payload`` (or GET ``url``) and yield what each read completed, through ``convert``;
        ``responses`` interprets a Responses API stream (a new one if None)."""
        started = time.monotonic()
        try:
            response, watchdog = await self._open(payload, url)
        except UpstreamError as exc:
            self._failed(exc)
            raise
        cfg = self.config
        finished = handed_over = False
        interpreter: StreamInterpreter | None = None
        stopped = "upstream stopped sending"
        try:
            watchdog.watch(response, cfg.first_byte_timeout, stopped)
            coding = response.headers.get("content-encoding", "identity").lower()
            if coding not in ("identity", ""):  # (Accept-Encoding asks for none: a compressed stream waits to fill)
                raise UpstreamError(f"the model server compressed its answer ({printable(coding[:40])}) although "
                                    "asked not to", code="upstream_protocol", retryable=False)
            content_type = response.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                events = await self._not_streamed(response)
                finished = True
                yield convert([*events, END])
                return
            decoder = SSEDecoder(cfg.max_event_size)
            if self._responses:
                interpreter = responses = responses or ResponsesInterpreter()
            else:
                interpreter = ChunkInterpreter()
            loop = asyncio.get_running_loop()
            reattached = 0
            while True:
                try:
                    while not interpreter.done:
                        data = await response.read(READ_BYTES)
                        if not data:
                            break
                        watchdog.deadline = math.inf
                        batch, error = _interpret(decoder, interpreter, data)
                        if checkpoints and responses is not None and responses.response_id is not None:
                            batch.append(Position(_state(responses.response_id, responses.sequence)))
                        if interpreter.done and error is None:  # complete: whoever reads it may stop here
                            finished = True
                            batch.append(END)
                        if batch:
                            if started:
                                if self.metrics is not None:
                                    self.metrics.upstream_ttft.observe(time.monotonic() - started)
                                started = 0.0
                            yield convert(batch)
                        if error is not None:
                            raise error
                        watchdog.deadline = loop.time() + cfg.read_timeout
                except (Truncated, Broken):
                    where = self._reattach_at(interpreter, reattached)
                    if where is None:
                        raise
                    response.close()  # the broken stream; its response goes on upstream
                    watchdog.stop()
                    reattached += 1
                    response, watchdog = await self._open(None, where)
                    watchdog.watch(response, cfg.first_byte_timeout, stopped)
                    decoder = SSEDecoder(cfg.max_event_size)  # a new stream begins at an event's beginning
                    continue
                break
            if not interpreter.done:
                tail = interpreter.end(decoder.close())
                finished = True
                yield convert([*tail, END])
        except UpstreamError as exc:
            self._failed(exc)
            raise
        except SSEError as exc:
            raise self._failed(UpstreamError(str(exc), code="upstream_protocol", retryable=False)) from None
        except Truncated:
            raise self._failed(UpstreamError("the model server closed the stream before it ended",
                                             code="upstream_truncated", retryable=True)) from None
        except Broken:
            raise self._failed(UpstreamError("the connection to the model server broke mid-stream",
                                             code="upstream_connection", retryable=True)) from None
        except ProtocolError as exc:
            raise self._failed(UpstreamError(f"the model server's answer broke HTTP/1.1: {exc}",
                                             code="upstream_protocol", retryable=False)) from None
        except asyncio.CancelledError as exc:
            handed_over = TAKEN_OVER in exc.args  # another node reads the response now
            raise
        finally:
            watchdog.stop()
            if finished:
                self.last_success = time.monotonic()
                response.release()
            else:
                response.close()
                if (self._background and isinstance(interpreter, ResponsesInterpreter) and interpreter.response_id
                        and not handed_over):
                    self._cancel_upstream(interpreter.response_id)  # nobody reads it: it must not go on

    def _failed(self, error: UpstreamError) -> UpstreamError:
        """``error``, kept as the last failure (``/healthz`` shows it)."""
        self.last_failure = (time.monotonic(), error.code, error.message)
        return error

    def _reattach_at(self, interpreter: StreamInterpreter, reattached: int) -> str | None:
        """Where a background response's broken stream is read again (after the last event interpreted), or
        None: not a background response, its id not known yet, or its re-attachments spent (``max_retries``)."""
        if not self._background or not isinstance(interpreter, ResponsesInterpreter):
            return None
        if interpreter.response_id is None or reattached >= self.config.max_retries:
            return None
        return self._stream_url(interpreter.response_id, interpreter.sequence)

    def _stream_url(self, response_id: str, after: int) -> str:
        return f"{self._url}/{quote(response_id, safe='')}?stream=true&starting_after={after}"

    def cancel_response(self, state: str) -> None:
        """Cancel upstream the background response of a :class:`~wsagent.core.chunks.Position`'s ``state`` (a run
        taken over that ended before it read anything: nobody will)."""
        self._cancel_upstream(_position(state)[0])

    def _cancel_upstream(self, response_id: str) -> None:
        """``POST /responses/{id}/cancel``, off the cancel's path (a run's cancel never waits for it); bounded by
        the connect and first-byte timeouts, and awaited by :meth:`close`."""
        task = asyncio.get_running_loop().create_task(self._cancel(response_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, response_id: str) -> None:
        if not await still_producing():  # another node took the run over: it reads this response now
            log.info("background response %s not cancelled: another node produces its run", printable(response_id))
            return
        cfg = self.config
        head = request_head("POST", self._target(f"{self._url}/{quote(response_id, safe='')}/cancel"),
                            self._pool.authority, self._fields)
        try:
            async with asyncio.timeout(cfg.connect_timeout + cfg.first_byte_timeout):
                response = await self._pool.request(head + b"0\r\n\r\n")
                whole = False
                try:
                    whole = (await _read_at_most(response, ERROR_BODY_BYTES))[1]
                finally:
                    if whole:
                        response.release()
                    else:
                        response.close()
        except (TimeoutError, ConnectFailed, Broken, Truncated, ProtocolError) as exc:
            log.warning("could not cancel background response %s upstream: %s", printable(response_id),
                        type(exc).__name__)

    async def _open(self, payload: bytes | None, url: str | None = None) -> tuple[Response, _ReadWatchdog]:
        """POST ``payload`` (or, with None, GET ``url``: a background response's stream, again) and return a 200
        response and the timer that watches it, retrying what may be retried before any body byte."""
        cfg = self.config
        if payload is None:
            request = request_head("GET", self._target(url or self._url), self._pool.authority,
                                   self._fields) + b"0\r\n\r\n"
        else:
            request = b"%s%d\r\n\r\n%s" % (self._post, len(payload), payload)
        loop = asyncio.get_running_loop()
        began = loop.time()
        attempt = 0
        while True:
            delay: float | None
            watchdog = _ReadWatchdog(loop, cfg.first_byte_timeout, cfg.read_timeout)
            try:
                response = await self._pool.request(request, watchdog)
            except BaseException as exc:
                watchdog.stop()
                if not isinstance(exc, (UpstreamError, TimeoutError, ConnectFailed, Broken, ProtocolError)):
                    raise
                error, delay = self._unanswered(exc)
            else:
                if self.metrics is not None:
                    self.metrics.upstream_requests[str(response.status)] += 1
                if response.status == 200:
                    return response, watchdog
                raw, whole = b"", False
                try:
                    watchdog.watch(response, cfg.first_byte_timeout, "the model server stopped sending its error")
                    raw, whole = await _read_at_most(response, ERROR_BODY_BYTES, partial=True)
                finally:
                    watchdog.stop()
                    if whole:
                        response.release()
                    else:  # the rest is never read: the connection cannot go back to the pool
                        response.close()
                message, upstream_code = _error_message(raw)
                location = response.headers.get("location")
                if 300 <= response.status < 400 and location:  # (not followed: a POST's body is not sent twice)
                    message += f" (redirected to {printable(location[:200])}: make that the upstream URL)"
                if response.status in (404, 405):  # most often a base URL without its /v1
                    message += (f" (POST {self._url}: the upstream URL must be the API's base, such as "
                                "http://host:8000/v1, ending where /chat/completions or /responses follows)")
                delay = parse_retry_after(response.headers)
                error = error_for_status(response.status, message, upstream_code, delay)
                should = response.headers.get("x-should-retry")
                if should == "true":
                    error.retryable = True
                elif should == "false":
                    error.retryable = False
                elif response.status not in _RETRY_STATUSES and response.status < 500:
                    error.retryable = False
            if self.metrics is not None and error.status is None:
                self.metrics.upstream_requests[error.code] += 1
            if delay is None:
                delay = random.uniform(0, min(cfg.backoff_cap, cfg.backoff_base * 2**attempt))
            delay = min(delay, 60.0)
            late = loop.time() + delay - began > cfg.retry_deadline
            if not error.retryable or attempt >= cfg.max_retries or late:
                cut = late and error.retryable and attempt < cfg.max_retries
                if attempt or cut:
                    error.attempts(attempt + 1, cfg.retry_deadline if cut else None)
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    def _unanswered(self, exc: UpstreamError | TimeoutError | ConnectFailed | Broken | ProtocolError,
                    ) -> tuple[UpstreamError, float | None]:
        """A request that got no answer's head: its error, and how soon it may go again (None: after a backoff)."""
        if isinstance(exc, UpstreamError):  # the watchdog's
            return exc, None
        if isinstance(exc, TimeoutError):  # the connect's own
            return UpstreamError(f"cannot connect to the model server at {self._where} (no connection within "
                                 f"{self.config.connect_timeout:g} s)", code="upstream_timeout", retryable=True), None
        if isinstance(exc, ConnectFailed):
            return UpstreamError(f"cannot connect to the model server at {exc.where} ({exc.reason})",
                                 code="upstream_connection", retryable=not exc.lasting), None
        if isinstance(exc, Broken):  # (stale: closed, idle, as the request was written: no reason to wait)
            return UpstreamError(f"cannot reach the model server at {self._where}: {exc}", code="upstream_connection",
                                 retryable=True), 0.0 if exc.stale else None
        return UpstreamError(f"the model server at {self._where} did not answer in HTTP/1.1: {exc}",
                             code="upstream_protocol", retryable=False), None

    async def _not_streamed(self, response: Response) -> list[ModelEvent]:
        """A 200 that is not an event stream: a JSON error, or a whole completion (read up to the
        size of one event, ``max_event_size``)."""
        raw, whole = await _read_at_most(response, self.config.max_event_size)
        if not whole:
            raise UpstreamError(f"upstream answered a body over {self.config.max_event_size} bytes, not an event "
                                "stream", code="upstream_protocol", retryable=False)
        try:
            body = json.loads(raw)
        except RecursionError:  # the decoder's bound on depth (about a thousand); 200,000 deep was a traceback
            raise UpstreamError("upstream answered JSON nested too deeply, not an event stream",
                                code="upstream_protocol", retryable=False) from None
        except ValueError:
            raise UpstreamError(
                f"upstream answered {response.headers.get('content-type', 'no content type')!r}, "
                f"not an event stream: {raw[:200]!r}",
                code="upstream_protocol",
                retryable=False,
            ) from None
        if isinstance(body, dict) and body.get("object") == "response":
            return response_to_events(body)
        if isinstance(body, dict) and "error" in body and not body.get("choices"):
            message, upstream_code = _error_message(raw)
            raise UpstreamError(message, code="upstream_stream_error", retryable=True, upstream_code=upstream_code)
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise UpstreamError("upstream answered JSON that is not a completion", code="upstream_protocol",
                                retryable=False)
        return completion_to_events(body)
