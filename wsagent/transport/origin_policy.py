"""Which pages may open a WebSocket to this server: the HTTP ``Origin`` header's policy (no I/O).

Browsers send ``Origin``; a page on another site may not use a browser's network
position. Pages served by this server itself may always connect: its own names
(``localhost``, the loopback addresses, this machine's host name, ``--host``)
and the address it is bound to, with its port; bound to every interface, any IP
address with its port (a page served from that address and port was served by
this server). Others only if ``--allowed-origins`` lists them (``null``, a page
opened from a file, included). The ``Host`` header is never trusted: a
DNS-rebinding page sends its own name as Host and as Origin.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["OriginPolicy"]


class OriginPolicy:
    """The policy of a server listening on ``port`` at the ``configured`` host (``--host``) and ``bound``
    addresses, with ``allowed`` (``--allowed-origins``, which SIGHUP may change)."""

    def __init__(self, allowed: Iterable[str] = (), configured: str = "", bound: Iterable[str] = (),
                 port: int = 0) -> None:
        self.allowed = frozenset(allowed)
        self.port = port
        names = {"localhost", "127.0.0.1", "::1", socket.gethostname().lower(), socket.getfqdn().lower()}
        self.wildcard = False  # bound to every interface
        for address in [configured, *bound]:
            if address in ("", "0.0.0.0", "::"):
                self.wildcard = True
            else:
                names.add(address.lower())
        self.own_names = frozenset(names)

    def allows(self, origin: str) -> bool:
        if "*" in self.allowed or origin in self.allowed:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.hostname is None:
            return False
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return False
        if port != self.port:
            return False
        host = parts.hostname.lower()
        return host in self.own_names or self.wildcard and _is_ip(host)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
