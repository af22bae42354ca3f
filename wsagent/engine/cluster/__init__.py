"""Cluster mode: nodes that share runs, client ids and per-user counts through Redis.

One part per job, each with its state and its rules (docs/architecture.md draws them):

* :mod:`.names`: every key and channel in Redis, and how long each lives (no I/O);
* :mod:`.messages`: the typed control messages between nodes (no I/O);
* :mod:`.wire`: Redis spoken by hand, for the hot path;
* :mod:`.link`: the node's connections to Redis, and whether it answers;
* :mod:`.liveness`: heartbeats, which nodes are alive;
* :mod:`.replication`: the runs a node produces, written to Redis;
* :mod:`.follower`: the runs a node follows from others (a :class:`Mirror` each, with its transition table);
* :mod:`.clients`: client ids and per-user counts;
* :mod:`.broker`: :class:`RedisBroker`, the :class:`~wsagent.engine.broker.Broker` that holds a local broker
  and the parts.
"""

from .broker import RedisBroker, default_node_id
from .follower import Mirror
from .link import Link

__all__ = ["RedisBroker", "Mirror", "Link", "default_node_id"]
