"""``python -m wsagent.client``, the terminal client (its help: :mod:`.cli`).

* :mod:`.display`: how a run is shown (text, a live dashboard, raw JSON);
* :mod:`.stream`: :class:`StreamClient`, one run with reconnect, resume and cancel;
* :mod:`.person`: a person's answers to the run's approval requests (asked on the terminal, or by a flag);
* :mod:`.cli`: the command line.
"""

from __future__ import annotations

from .cli import main
from .stream import RunFailed, StreamClient

__all__ = ["RunFailed", "StreamClient", "main"]
