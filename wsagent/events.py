"""``wsagent.events``: the events a producer yields and their wire frames, where README documents them.

The code lives in :mod:`wsagent.core.events`;
this path is the public one, and stays.
"""

from .core.events import *  # noqa: F403
from .core.events import __all__ as __all__
