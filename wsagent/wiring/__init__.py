"""The wiring: the route table (``routes``, ``router``), the server that serves them (``server``), systemd
notifications, and the ``--workers`` supervisor. ``python -m wsagent.serve`` (the top-level ``serve``) runs it.
"""
