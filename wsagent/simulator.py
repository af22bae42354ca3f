"""``wsagent.simulator``: the simulated OpenAI-compatible model server, where README documents it
(``python -m wsagent.simulator`` runs it).

The code lives in :mod:`wsagent.upstream.simulator`;
this path is the public one, and stays.
"""

from .upstream.simulator import *  # noqa: F403
from .upstream.simulator import __all__ as __all__

if __name__ == "__main__":
    from .upstream.simulator.cli import main

    main()
