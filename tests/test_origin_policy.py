"""The Origin policy without a server (over real servers and browsers: test_auth, test_hardening)."""

from __future__ import annotations

import pytest

from wsagent.transport.origin_policy import OriginPolicy


@pytest.mark.parametrize(("origin", "allowed"), [
    ("http://localhost:8000", True), ("http://127.0.0.1:8000", True), ("http://[::1]:8000", True),
    ("http://localhost:8001", False),  # another port: another server's page
    ("https://evil.example:8000", False),  # a DNS-rebinding page names itself
    ("http://10.0.0.5:8000", False),  # bound to loopback alone: no other address served this page
    ("null", False), ("file://", False), ("http://localhost:99999", False), ("ws://localhost:8000", False),
    ("https://app.example.com", True),  # listed
])
def test_own_pages_and_listed_origins_may_connect(origin: str, allowed: bool) -> None:
    policy = OriginPolicy(["https://app.example.com"], "127.0.0.1", ["127.0.0.1"], 8000)
    assert policy.allows(origin) is allowed


def test_bound_to_every_interface_any_address_with_the_port_is_its_own() -> None:
    policy = OriginPolicy((), "0.0.0.0", ["0.0.0.0"], 8000)
    assert policy.wildcard and policy.allows("http://10.0.0.5:8000") and not policy.allows("http://evil.example:8000")
    assert OriginPolicy(["*"]).allows("https://anything.example")
