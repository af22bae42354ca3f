"""A LangGraph graph with a tool node, served by wsagent (``pip install ".[langgraph]"``, see docs/agents.md):

    python -m wsagent.serve --agents examples/agents/langgraph_example.py:AGENTS

then ``{"type": "run", "id": "r1", "prompt": "What is 6 * 7?", "agent": "langgraph"}`` on ``/ws/chat``.
"""

from __future__ import annotations

from typing import Any

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from wsagent.frameworks import langgraph
from wsagent.producers import AgentRequest
from wsagent.tools import evaluate


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression, such as 17 * 23."""
    return str(evaluate(expression))


def make(request: AgentRequest) -> Any:
    llm = ChatOpenAI(base_url=request.base_url, api_key=request.api_key or "unused", model=request.model,
                     streaming=True, stream_usage=True).bind_tools([calculator])

    async def model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", model)
    graph.add_node("tools", ToolNode([calculator]))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    return graph.compile()


AGENTS = {"langgraph": langgraph(make)}
