"""The route table: every path the server answers, in one place.

WebSocket routes first (static paths win over ``{param}`` patterns), then the
plain HTTP answers served on the same port before any upgrade.
"""

from __future__ import annotations

from ..handlers.ai_sdk import ai_sdk
from ..handlers.chat import chat
from ..handlers.pages import agents, favicon, index, static, workflows
from ..handlers.status import healthz, metrics
from ..handlers.tutorial import agent_thoughts, agent_words, client_addressed, echo_upper, robust
from .router import HttpHandler, Route

__all__ = ["ROUTES", "HTTP_ROUTES"]

ROUTES = (
    Route("/ws", echo_upper),
    Route("/ws/agent", agent_words),
    Route("/ws/agent-thoughts", agent_thoughts),
    Route("/ws/robust", robust),
    Route("/ws/chat", session=chat),
    Route("/ws/secure", session=chat, auth=True),
    Route("/ws/ai-sdk", session=ai_sdk),
    Route("/ws/{client_id}", client_addressed),
)

HTTP_ROUTES: dict[str, HttpHandler] = {
    "/": index,
    "/static/app.js": static,
    "/static/style.css": static,
    "/static/favicon.svg": static,
    "/favicon.ico": favicon,
    "/workflows": workflows,
    "/agents": agents,
    "/healthz": healthz,
    "/metrics": metrics,
}
