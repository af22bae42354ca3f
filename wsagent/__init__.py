"""wsagent: stream LLM tokens and agent thoughts over WebSockets, in pure asyncio.

The Python API for embedding: :class:`Agent`, :class:`ConcurrentWorkflow`,
:class:`SequentialWorkflow` over an :class:`UpstreamClient`; the server is
:class:`WsAgentServer` (``python -m wsagent.serve`` runs it).
"""

from .agent import Agent, ConcurrentWorkflow, SequentialWorkflow
from .config import Settings
from .errors import UpstreamError, WsAgentError
from .server import WsAgentServer
from .tools import tool
from .upstream import UpstreamClient, UpstreamConfig

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
