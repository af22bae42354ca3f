"""Agents: the built-in agent and workflows (``builtin``), agents of your own as producers (``producers``: an
async generator, a thread, a callback), and the adapters that make swarms, LangGraph and the OpenAI Agents SDK
producers (``frameworks``).
"""
