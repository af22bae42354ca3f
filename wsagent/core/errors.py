"""Typed errors shared by the upstream client, the relay and the handlers.

Each error carries a stable ``code`` that clients can switch on, a message fit
for a person, and ``retryable``: whether sending the same request again may
help. The relay turns them into ``error`` events without inspecting them.
"""

from __future__ import annotations


class WsAgentError(Exception):
    """Base class: an error with a stable code and a retry hint."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable


class UpstreamError(WsAgentError):
    """The model server refused, failed, or broke the stream.

    ``status`` is the HTTP status when there was one; ``upstream_code`` is the
    upstream's own error code (a string or an integer, as servers differ).
    """

    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        status: int | None = None,
        upstream_code: str | int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, retryable=retryable)
        self.status = status
        self.upstream_code = upstream_code
        self.retry_after = retry_after

    def attempts(self, count: int, deadline: float | None = None) -> None:
        """Say how many requests were made, and whether the retry deadline ended them: the client
        sees why it waited. Inside the message's closing parenthesis if it has one."""
        said = f"{count} attempt{'s' if count != 1 else ''}"
        if deadline:
            said += f"; gave up at the {deadline:g} s retry deadline"
        if self.message.endswith(")"):
            self.message = f"{self.message[:-1]}; {said})"
        else:
            self.message = f"{self.message} ({said})"
        self.args = (self.message,)


def error_for_status(status: int, message: str, upstream_code: str | int | None = None,
                     retry_after: float | None = None) -> UpstreamError:
    """Map an HTTP status from the model server to a typed error."""
    if status in (401, 403):
        code, retryable = "upstream_auth", False
    elif status == 429:
        code, retryable = "upstream_rate_limited", True
    elif status in (408, 409) or status >= 500:
        code, retryable = "upstream_unavailable", True
    else:
        code, retryable = "upstream_bad_request", False
    return UpstreamError(
        f"upstream HTTP {status}: {message}",
        code=code,
        retryable=retryable,
        status=status,
        upstream_code=upstream_code,
        retry_after=retry_after,
    )


class ProtocolViolation(WsAgentError):
    """A client sent something the protocol does not allow."""

    code = "bad_request"


class ClusterUnavailable(WsAgentError):
    """A request needs the other nodes, and the cluster's Redis cannot be reached now; try again shortly."""

    code = "cluster_unavailable"
    retryable = True


#: Why a run's producer is cancelled when another node took the run over (``Task.cancel``'s message): whatever
#: it reads upstream goes on there, so it is closed without being cancelled upstream.
TAKEN_OVER = "taken over by another node"
