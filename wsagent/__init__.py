"""wsagent: stream LLM tokens and agent thoughts over WebSockets, in pure asyncio.

The Python API for embedding: :class:`Agent`, :class:`ConcurrentWorkflow`,
:class:`SequentialWorkflow` over an :class:`UpstreamClient`; the server is
:class:`WsAgentServer` (``python -m wsagent.serve`` runs it).

Names are loaded on first use, so ``import wsagent.core.sse`` loads the SSE decoder
and nothing of the server, aiohttp or pyjwt.

The folders are the layers, bottom up: ``core`` (no I/O), ``upstream``, ``engine``,
``transport``, ``handlers``, ``wiring``; imports point down only. The modules at
the top are the public face: this API, ``serve`` and ``client`` (programs), and
the documented import paths ``events``, ``producers``, ``frameworks``, ``tools``
and ``simulator``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.config import Settings
    from .core.errors import UpstreamError, WsAgentError
    from .core.tools import tool
    from .upstream.agents.builtin import Agent, ConcurrentWorkflow, SequentialWorkflow
    from .upstream.model import UpstreamClient, UpstreamConfig
    from .wiring.server import WsAgentServer

_WHERE = {
    "Agent": "upstream.agents.builtin",
    "ConcurrentWorkflow": "upstream.agents.builtin",
    "SequentialWorkflow": "upstream.agents.builtin",
    "Settings": "core.config",
    "UpstreamClient": "upstream.model",
    "UpstreamConfig": "upstream.model",
    "UpstreamError": "core.errors",
    "WsAgentError": "core.errors",
    "WsAgentServer": "wiring.server",
    "tool": "core.tools",
}

__all__ = [
    "Agent",
    "ConcurrentWorkflow",
    "SequentialWorkflow",
    "Settings",
    "UpstreamClient",
    "UpstreamConfig",
    "UpstreamError",
    "WsAgentError",
    "WsAgentServer",
    "tool",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'wsagent' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
