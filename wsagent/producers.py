"""``wsagent.producers``: producers of your own (an async generator, a thread, a callback), where README documents them.

The code lives in :mod:`wsagent.upstream.producers`;
this path is the public one, and stays.
"""

from .upstream.producers import *  # noqa: F403
from .upstream.producers import __all__ as __all__
