"""A LangGraph graph with a tool node, served by wsagent (``pip install ".[langgraph]"``, see docs/agents.md):

    python -m wsagent.serve --agents examples/agents/langgraph_example.py:AGENTS

then ``{"type": "run", "id": "r1", "prompt": "What is 6 * 7?", "agent": "langgraph"}`` on ``/ws/chat``.

``"agent": "langgraph-approval"`` is the same graph with a calculator that asks a person first: it calls
``interrupt()`` with the call (its name, arguments and tool call id), wsagent sends an ``approval_request``,
and the run waits for ``{"type": "approve", "id": "r1", "call_id": ..., "approved": true}``. The graph
resumes with ``{"approved": ..., "reason": ...}`` as ``interrupt()``'s value; denied, the tool tells the model
so instead of computing. Interrupts need a checkpointer: the graph is compiled with an ``InMemorySaver``
(the adapter gives each run a thread of its own).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

from langchain_core.tools import BaseTool, InjectedToolCallId, tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import interrupt

from wsagent.frameworks import langgraph
from wsagent.producers import AgentRequest, Decision
from wsagent.tools import evaluate


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression, such as 17 * 23."""
    return str(evaluate(expression))


@tool("calculator")
def calculator_with_approval(expression: str, call_id: Annotated[str, InjectedToolCallId]) -> str:
    """Evaluate an arithmetic expression, such as 17 * 23."""
    answer = interrupt({"name": "calculator", "arguments": {"expression": expression}, "call_id": call_id})
    if not answer["approved"]:
        return Decision(False, answer["reason"]).observation("calculator")
    return str(evaluate(expression))


def make(request: AgentRequest, calculator_tool: BaseTool = calculator) -> Any:
    llm = ChatOpenAI(base_url=request.base_url, api_key=request.api_key or "unused", model=request.model,
                     streaming=True, stream_usage=True).bind_tools([calculator_tool])

    async def model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", model)
    graph.add_node("tools", ToolNode([calculator_tool]))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    return graph.compile(checkpointer=InMemorySaver())


AGENTS = {"langgraph": langgraph(make),
          "langgraph-approval": langgraph(functools.partial(make, calculator_tool=calculator_with_approval))}
