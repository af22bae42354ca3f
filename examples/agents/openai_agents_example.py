"""An OpenAI Agents SDK agent served by wsagent (``pip install ".[openai-agents]"``, see docs/agents.md):

    python -m wsagent.serve --agents examples/agents/openai_agents_example.py:AGENTS

then ``{"type": "run", "id": "r1", "prompt": "What is 6 * 7?", "agent": "openai-agents"}`` on ``/ws/chat``.
The agent's model is wsagent's own upstream (the built-in simulator unless you set one).

``"agent": "openai-agents-approval"`` is the same agent with a calculator made with ``needs_approval=True``:
before it runs, wsagent sends an ``approval_request`` and the run waits for
``{"type": "approve", "id": "r1", "call_id": ..., "approved": true}`` (``false`` rejects the call, and the
model is told).
"""

from __future__ import annotations

import functools

from agents import Agent, FunctionTool, ModelSettings, OpenAIChatCompletionsModel, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

from wsagent.frameworks import openai_agents
from wsagent.producers import AgentRequest
from wsagent.tools import evaluate

set_tracing_disabled(True)  # no traces are sent to OpenAI's servers


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: the expression, such as 17 * 23
    """
    return str(evaluate(expression))


calculator = function_tool(calculate, name_override="calculator")
calculator_with_approval = function_tool(calculate, name_override="calculator", needs_approval=True)


def make(request: AgentRequest, tool: FunctionTool = calculator) -> Agent:
    client = AsyncOpenAI(base_url=request.base_url, api_key=request.api_key or "unused")
    return Agent(name="openai-agents", instructions="You are a helpful assistant. Use a tool when it helps.",
                 tools=[tool], model=OpenAIChatCompletionsModel(model=request.model, openai_client=client),
                 model_settings=ModelSettings(include_usage=True))


AGENTS = {"openai-agents": openai_agents(make),
          "openai-agents-approval": openai_agents(functools.partial(make, tool=calculator_with_approval))}
