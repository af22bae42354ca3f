"""``wsagent.frameworks``: the adapters for swarms, LangGraph and the OpenAI Agents SDK, where README documents them.

The code lives in :mod:`wsagent.upstream.frameworks`;
this path is the public one, and stays.
"""

from .upstream.frameworks import *  # noqa: F403
from .upstream.frameworks import __all__ as __all__
