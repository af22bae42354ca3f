"""The engine: a run (its transition tables, its log, its subscriptions), the pump from a producer to a run,
transcripts, the ``Broker`` protocol with its in-process implementation (``broker``) and the cluster's, built
from parts (``cluster``). Imports the core and the upstream side, never a socket.
"""
