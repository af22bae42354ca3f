"""swarms agents served by wsagent (``pip install ".[swarms]"``, see docs/agents.md):

    python -m wsagent.serve --agents examples/agents/swarms_example.py:AGENTS

then ``{"type": "run", "id": "r1", "prompt": "What is 6 * 7?", "agent": "swarms"}`` on ``/ws/chat``
(``swarms-detailed``: swarms' detailed streaming, with usage; ``swarms-panel``: a ConcurrentWorkflow).
swarms calls back from its own thread: wsagent hands the tokens over through a bounded bridge.
"""

from __future__ import annotations

from typing import Any

from swarms import Agent, ConcurrentWorkflow

from wsagent.frameworks import SwarmsRun, swarms_agent, swarms_workflow
from wsagent.producers import AgentRequest
from wsagent.tools import evaluate


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression (str): the expression, such as 17 * 23

    Returns:
        str: the result
    """
    return str(evaluate(expression))


def agent(request: AgentRequest, run: SwarmsRun, name: str = "swarms",
          prompt: str = "You are a helpful assistant. Use a tool when it helps.") -> Any:
    observed = run.observed if name == "swarms" else run.observed_as(name)
    return Agent(agent_name=name, system_prompt=prompt, model_name=f"openai/{request.model}",
                 llm_args=run.llm_args,  # the run's own HTTP client: a cancel closes the model's connection
                 max_loops=2, tools=[observed(calculator)], print_on=False, verbose=False, retry_attempts=1)


def panel(request: AgentRequest, run: SwarmsRun) -> Any:
    return ConcurrentWorkflow(agents=[agent(request, run, name, f"You are the {name.replace('-', ' ')}.")
                                      for name in ("market-researcher", "risk-analyst")], show_dashboard=False)


AGENTS = {
    "swarms": swarms_agent(agent),
    "swarms-detailed": swarms_agent(agent, detailed=True),
    "swarms-panel": swarms_workflow(panel),
}
