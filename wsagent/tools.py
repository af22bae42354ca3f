"""``wsagent.tools``: tools for the built-in agent (``@tool``, ``evaluate``...), where README documents them.

The code lives in :mod:`wsagent.core.tools`;
this path is the public one, and stays.
"""

from .core.tools import *  # noqa: F403
from .core.tools import __all__ as __all__
