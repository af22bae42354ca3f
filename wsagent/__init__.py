"""wsagent: stream LLM tokens and agent thoughts over WebSockets, in pure asyncio.

The Python API for embedding: :class:`Agent`, :class:`ConcurrentWorkflow`,
:class:`SequentialWorkflow` over an :class:`UpstreamClient`; the server is
:class:`WsAgentServer` (``python -m wsagent.serve`` runs it).

Names are loaded on first use, so ``import wsagent.sse`` loads the SSE decoder
and nothing of the server, aiohttp or pyjwt.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import Agent, ConcurrentWorkflow, SequentialWorkflow
    from .config import Settings
    from .errors import UpstreamError, WsAgentError
    from .server import WsAgentServer
    from .tools import tool
    from .upstream import UpstreamClient, UpstreamConfig

_WHERE = {
    "Agent": "agent",
    "ConcurrentWorkflow": "agent",
    "SequentialWorkflow": "agent",
    "Settings": "config",
    "UpstreamClient": "upstream",
    "UpstreamConfig": "upstream",
    "UpstreamError": "errors",
    "WsAgentError": "errors",
    "WsAgentServer": "server",
    "tool": "tools",
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
