"""``wsagent.frameworks``: the adapters for swarms, LangGraph and the OpenAI Agents SDK, where README documents them.

The code lives in :mod:`wsagent.upstream.agents.frameworks`;
this path is the public one, and stays.
"""

from .upstream.agents.frameworks import *  # noqa: F403
from .upstream.agents.frameworks import __all__ as __all__
