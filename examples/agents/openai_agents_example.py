"""An OpenAI Agents SDK agent served by wsagent (``pip install ".[openai-agents]"``, see docs/agents.md):

    python -m wsagent.serve --agents examples/agents/openai_agents_example.py:AGENTS

then ``{"type": "run", "id": "r1", "prompt": "What is 6 * 7?", "agent": "openai-agents"}`` on ``/ws/chat``.
The agent's model is wsagent's own upstream (the built-in simulator unless you set one).
"""

from __future__ import annotations

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

from wsagent.frameworks import openai_agents
from wsagent.producers import AgentRequest
from wsagent.tools import evaluate

set_tracing_disabled(True)  # no traces are sent to OpenAI's servers


@function_tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: the expression, such as 17 * 23
    """
    return str(evaluate(expression))


def make(request: AgentRequest) -> Agent:
    client = AsyncOpenAI(base_url=request.base_url, api_key=request.api_key or "unused")
    return Agent(name="openai-agents", instructions="You are a helpful assistant. Use a tool when it helps.",
                 tools=[calculator], model=OpenAIChatCompletionsModel(model=request.model, openai_client=client),
                 model_settings=ModelSettings(include_usage=True))


AGENTS = {"openai-agents": openai_agents(make)}
