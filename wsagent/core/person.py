"""A person in the loop of a running agent: approvals before a tool runs, and messages that steer it.

A producer (the built-in agent, a workflow's agents, your own, a framework
adapter) never sees a socket or a run. It talks to the person through the
:class:`Person` of the run it produces for, found in a context variable the
run sets for its own task (and so for every task the producer starts):

* it yields an :class:`~wsagent.core.events.ApprovalRequest`, then awaits
  :func:`approval` with the same ``call_id``: the person's :class:`Decision`.
  Meanwhile the run waits in a phase of its own, with nothing open upstream;
* at each step boundary (before it asks the model again) it takes
  :func:`steering`: the messages a person sent meanwhile, in order, each
  delivered once, and yields a :class:`~wsagent.core.events.Steered` for each
  with the messages it sends the model.

Outside a run (an agent used as a library, a test), there is nobody to ask:
:func:`approval` denies, saying so, and :func:`steering` is empty.
"""

from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Decision", "Person", "approval", "steering", "attend", "NOBODY", "MAX_REASON"]

#: The longest reason a person may give with an answer (it reaches the model, the log and, in a cluster, Redis).
MAX_REASON = 1000


@dataclass(frozen=True, slots=True)
class Decision:
    """A person's answer to an approval request; ``reason`` is theirs (optional, free text)."""

    approved: bool
    reason: str | None = None

    def observation(self, name: str) -> str:
        """What the model is told of a denied call, in place of the tool's result."""
        because = f": {self.reason}" if self.reason else ""
        return f"The user denied the call to {name}{because}. Do not call it again unless asked to."


#: The decision when nobody can answer (no run, so no person).
NOBODY = Decision(False, "no person can be asked here (the agent is not running in a wsagent run)")


class Person(Protocol):
    """The person (or people) watching a run, as its producer sees them."""

    async def decide(self, call_id: str) -> Decision:
        """The answer to the approval request ``call_id`` the producer yielded: waits for it."""
        ...

    def heard(self) -> list[str]:
        """The steering messages sent since the last call, oldest first; each is returned once."""
        ...


#: A weak reference: every callback scheduled from the run's task (a timer of the HTTP client's, say) keeps a
#: copy of its context, and one that outlived the run would keep the run, its log and its sockets' state.
_current: contextvars.ContextVar[weakref.ref[Person] | None] = contextvars.ContextVar("wsagent_person", default=None)


def attend(person: Person | None) -> contextvars.Context:
    """A copy of the current context in which ``person`` is the one to ask (a run's task runs in it)."""
    context = contextvars.copy_context()
    context.run(_current.set, None if person is None else weakref.ref(person))
    return context


def _person() -> Person | None:
    ref = _current.get()
    return None if ref is None else ref()


async def approval(call_id: str) -> Decision:
    """The person's answer to the :class:`~wsagent.core.events.ApprovalRequest` with ``call_id`` that the
    caller has yielded (or is about to: the answer waits either way); :data:`NOBODY` outside a run."""
    person = _person()
    if person is None:
        return NOBODY
    return await person.decide(call_id)


def steering() -> list[str]:
    """Messages a person sent to steer the run since the last call (empty outside a run)."""
    person = _person()
    return [] if person is None else person.heard()
