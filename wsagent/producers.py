"""``wsagent.producers``: producers of your own (an async generator, a thread, a callback), where README documents them.

The code lives in :mod:`wsagent.upstream.agents.producers`;
this path is the public one, and stays.
"""

from .upstream.agents.producers import *  # noqa: F403
from .upstream.agents.producers import __all__ as __all__
