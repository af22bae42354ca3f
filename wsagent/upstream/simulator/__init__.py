"""A simulated OpenAI-compatible model server, served over real HTTP: ``POST /v1/chat/completions`` and
``POST /v1/responses`` (the Responses API, in OpenAI's exact event format), the same answers on both; and the
Responses API's background responses (``"background": true``; ``GET /v1/responses/{id}``, with ``stream=true``
and ``starting_after``; ``POST /v1/responses/{id}/cancel``), generated once and kept in memory.

wsagent streams from it when no upstream is configured, so every path (SSE
parsing, relay, backpressure, cancellation, tool calls) runs for real on a
machine with no network and no model. Tests and benchmarks use it too, with
switches that inject the faults real servers produce.

Answers are deterministic for a given request. ``tool_choice`` and
``response_format`` are honoured as OpenAI does (a JSON answer conforms to the
request's schema), and a reply that is not streamed carries its reasoning. Switches are honoured only when
the simulator is started with them on (``SimulatorSettings(switches=True)``,
``python -m wsagent.simulator --switches``, ``python -m wsagent.serve
--sim-switches``): they are for tests and benchmarks, and anyone who can send
a prompt could otherwise use them (``sim:tokens=20000 sim:pad=20000`` once took
the server from 49 to 438 MiB). Then they come from a ``sim`` object in the
request body, or from ``sim:key=value`` words in the last user message (so a
person at a WebSocket client can try them), capped so that one answer holds at
most about 16 MiB:

===========================  ==========================================================
``tokens=N``                 answer length in tokens (default: the server's setting)
``rate=R``                   tokens per second (0: as fast as the socket takes them)
``reasoning=0|1``            stream reasoning deltas first (default 1)
``status=N``                 answer HTTP N with an OpenAI-shaped error body
``fail_times=K``             with ``status``: only the first K such requests fail
``fail_key=NAME``            with ``fail_times``: count failures under NAME, not the prompt (many prompts, one count)
``retry_after_ms=MS``        sent as the ``retry-after-ms`` header with ``status``
``should_retry=true|false``  sent as ``x-should-retry`` with ``status``
``error_after=N``            after N tokens, an ``{"error": ...}`` event in the stream
``error_done=1``             with ``error_after``: a ``[DONE]`` after the error
``stall_after=N``            after N tokens, send nothing more (the connection stays)
``drop_after=N``             after N tokens, reset the TCP connection (a background response goes on)
``newline=crlf``             line endings: ``lf`` (default), ``crlf`` or ``cr``
``comment_every=N``          a ``: ping`` comment every N tokens (not in a background response)
``long=N``                   one content delta of N characters
``pad=N``                    pad every content token to N characters (bulk tests)
``json=1``                   answer a whole ``chat.completion`` even when asked to stream
``hold=1``                   never answer (not even headers): a first-byte timeout
``tool=NAME``                call this tool (when offered) whatever the prompt says
``tool_loop=1``              call a tool again even after tool results
``bad_args=1``               tool call arguments that are not valid JSON
``stamp=1``                  each token is the monotonic time it was written at
``tag=NAME``                 count this stream's tokens, streams, disconnect time under NAME (``GET /stats?tag=NAME``)
``raw=TEXT``                 (body only) replay TEXT byte for byte as the stream
``raw_chunk=N``              with ``raw``: write it in pieces of N bytes
===========================  ==========================================================

One job a module:

* :mod:`.plan`: what the model says to a request (reasoning, text, tool calls), and the switches read from it;
* :mod:`.schema`: a JSON answer that conforms to the request's ``response_format``;
* :mod:`.chat_format` and :mod:`.responses_format`: the two wire formats;
* :mod:`.play`: an answer played out, paced, with the switches' faults, into a connection or a kept response;
* :mod:`.background`: background responses, kept, retrieved, resumed and cancelled;
* :mod:`.stats`: :class:`SimStats`, what the simulator saw (``GET /stats``);
* :mod:`.app`: the aiohttp app (its routes) and :class:`SimulatorServer`;
* :mod:`.settings`: :class:`SimulatorSettings`;
* :mod:`.cli`: ``python -m wsagent.simulator``.
"""

from __future__ import annotations

from .app import Simulator, SimulatorServer, make_app
from .cli import main
from .plan import MAX_CHARS, MAX_TOKENS
from .settings import SimulatorSettings
from .stats import BackgroundStat, SimStats

__all__ = ["MAX_CHARS", "MAX_TOKENS", "BackgroundStat", "SimStats", "Simulator", "SimulatorServer",
           "SimulatorSettings", "main", "make_app"]
