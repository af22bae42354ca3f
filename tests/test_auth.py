"""Authentication and abuse limits: every refusal with its exact close code and reason."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wsagent.wiring.server import WsAgentServer

from .helpers import SECRET, ServerFactory, recv_json, run_events, token, ws_connect


async def closed_with(server: WsAgentServer, path: str, **kwargs: Any) -> tuple[int, str]:
    async with ws_connect(server, path, **kwargs) as ws:
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


@pytest.fixture
async def secured(make_server: ServerFactory) -> WsAgentServer:
    return await make_server(jwt_secret=SECRET, jwt_leeway=0)


async def test_tutorial_token_in_query_is_accepted(secured: WsAgentServer) -> None:
    async with ws_connect(secured, f"/ws/secure?token={token()}") as ws:
        await ws.send(json.dumps({"type": "run", "id": "r", "prompt": "hello sim:tokens=3"}))
        assert (await run_events(ws, "r"))[-1]["type"] == "done"
        assert secured.metrics.runs.get("done") == 1


@pytest.mark.parametrize(("name", "make"), [
    ("missing", lambda: None),
    ("malformed", lambda: "not.a.jwt"),
    ("bad signature", lambda: token(key="another-secret-that-is-long-enough-0123")),
    ("expired", lambda: token(ttl=-10)),
    ("not yet valid", lambda: token({"nbf": int(time.time()) + 600})),
    ("no exp", lambda: jwt.encode({"user_id": "alice"}, SECRET, algorithm="HS256")),
    ("alg none", lambda: jwt.encode({"user_id": "alice", "exp": int(time.time()) + 60}, None,  # type: ignore[arg-type]
                                     algorithm="none")),  # (no key for "none", as an attacker sends it)
    ("no user", lambda: token({"user_id": None})),
])
async def test_bad_tokens_close_4001(secured: WsAgentServer, name: str, make: Any) -> None:
    value = make()
    path = "/ws/secure" if value is None else f"/ws/secure?token={value}"
    assert await closed_with(secured, path) == (4001, "Invalid token")


async def test_audience_and_issuer(make_server: ServerFactory) -> None:
    server = await make_server(jwt_secret=SECRET, jwt_audience="wsagent", jwt_issuer="https://id.example")
    good = token({"aud": "wsagent", "iss": "https://id.example"})
    async with ws_connect(server, f"/ws/secure?token={good}") as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}
    for claims in ({"aud": "other", "iss": "https://id.example"}, {"aud": "wsagent", "iss": "https://evil"}, {}):
        assert await closed_with(server, f"/ws/secure?token={token(claims)}") == (4001, "Invalid token")


async def test_sub_claim_and_configured_claim(make_server: ServerFactory) -> None:
    server = await make_server(jwt_secret=SECRET)
    async with ws_connect(server, f"/ws/secure?token={token({'user_id': None, 'sub': 'bob'})}"):
        conn = next(iter(server.manager))
        assert conn.user == "bob"
    custom = await make_server(jwt_secret=SECRET, jwt_user_claim="email")
    assert await closed_with(custom, f"/ws/secure?token={token()}") == (4001, "Invalid token")
    async with ws_connect(custom, f"/ws/secure?token={token({'email': 'c@x'})}"):
        assert next(iter(custom.manager)).user == "c@x"


async def test_header_and_subprotocol(secured: WsAgentServer) -> None:
    async with ws_connect(secured, "/ws/secure", additional_headers={"Authorization": f"Bearer {token()}"}) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}
    async with ws_connect(secured, "/ws/secure", subprotocols=["wsagent", f"bearer.{token()}"]) as ws:
        assert ws.subprotocol == "wsagent"
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}


def _keys(tmp_path: Path, private: Any) -> tuple[Any, Path]:
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "public.pem"
    path.write_bytes(public)
    return private, path


async def test_rs256_es256_and_no_confusion(make_server: ServerFactory, tmp_path: Path) -> None:
    rsa_key, rsa_pub = _keys(tmp_path, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    server = await make_server(jwt_algorithms="RS256", jwt_public_key_file=str(rsa_pub))
    async with ws_connect(server, f"/ws/secure?token={token(key=rsa_key, algorithm='RS256')}") as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}
    # HS/RS confusion: an HS256 token "signed" with the public key must be refused.
    forged = jwt.api_jws.PyJWS()
    forged._algorithms["HS256"].prepare_key = lambda key: key  # type: ignore[method-assign]
    fake = forged.encode(json.dumps({"user_id": "mallory", "exp": int(time.time()) + 60}).encode(),
                         rsa_pub.read_bytes(), algorithm="HS256")
    assert await closed_with(server, f"/ws/secure?token={fake}") == (4001, "Invalid token")
    ec_dir = tmp_path / "ec"
    ec_dir.mkdir()
    ec_key, ec_pub = _keys(ec_dir, ec.generate_private_key(ec.SECP256R1()))
    server = await make_server(jwt_algorithms="ES256", jwt_public_key_file=str(ec_pub))
    async with ws_connect(server, f"/ws/secure?token={token(key=ec_key, algorithm='ES256')}") as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}


async def test_secret_from_file(make_server: ServerFactory, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    server = await make_server(jwt_secret_file=str(secret_file))
    async with ws_connect(server, f"/ws/secure?token={token()}") as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}


async def test_forbidden_route_and_client_id_4003(make_server: ServerFactory) -> None:
    server = await make_server(jwt_secret=SECRET, require_auth=True)
    limited = token({"routes": ["/ws/chat"]})
    assert await closed_with(server, f"/ws/secure?token={limited}") == (4003, "Forbidden route")
    assert await closed_with(server, f"/ws/bob?token={token()}") == (4003, "Forbidden client id")
    async with ws_connect(server, f"/ws/alice?token={token()}") as ws:
        await ws.send(json.dumps({"type": "broadcast", "content": "mine"}))
        assert (await recv_json(ws))["from"] == "alice"
    assert await closed_with(server, "/ws") == (4001, "Invalid token")


async def test_token_expiring_on_a_live_socket(secured: WsAgentServer) -> None:
    assert await closed_with(secured, f"/ws/secure?token={token(ttl=2)}") == (4001, "Token expired")


async def test_refresh_before_expiry_keeps_the_socket(secured: WsAgentServer) -> None:
    async with ws_connect(secured, f"/ws/secure?token={token(ttl=1)}") as ws:
        await ws.send(json.dumps({"type": "auth", "token": token({"user_id": "mallory"})}))
        assert (await recv_json(ws))["code"] == "forbidden"
        await ws.send(json.dumps({"type": "auth", "token": "garbage"}))
        assert (await recv_json(ws))["code"] == "invalid_token"
        await ws.send(json.dumps({"type": "auth", "token": token(ttl=3600)}))
        reply = await recv_json(ws)
        assert reply["type"] == "auth" and reply["status"] == "ok" and reply["user"] == "alice"
        # A stream that outlives the first token (about 2 s at 20 tokens/s) still ends with done.
        await ws.send(json.dumps({"type": "run", "id": "long", "prompt": "x sim:rate=20 sim:tokens=40"}))
        events = await run_events(ws, "long")
        assert events[-1]["type"] == "done" and time.time() > reply["expires"] - 3600 + 1


async def test_tokens_never_logged(secured: WsAgentServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="wsagent")
    value = token()
    async with ws_connect(secured, f"/ws/secure?token={value}") as ws:
        await ws.send(json.dumps({"type": "ping"}))
        await recv_json(ws)
    await closed_with(secured, f"/ws/secure?token={value}x")
    assert value not in caplog.text and SECRET not in caplog.text
    assert "open " in caplog.text and "/ws/secure from" in caplog.text


async def test_origins(make_server: ServerFactory) -> None:
    server = await make_server()
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(server, "/ws", origin="http://evil.example"):
            pass
    assert info.value.response.status_code == 403
    async with ws_connect(server, "/ws", origin=f"http://127.0.0.1:{server.port}") as ws:
        await ws.send("same host")
        assert await ws.recv() == "SAME HOST"
    listed = await make_server(allowed_origins="https://app.example")
    async with ws_connect(listed, "/ws", origin="https://app.example") as ws:
        await ws.send("ok")
        assert await ws.recv() == "OK"
    async with ws_connect(listed, "/ws", origin=f"http://127.0.0.1:{listed.port}") as ws:  # its own page, always
        await ws.send("own")
        assert await ws.recv() == "OWN"
    with pytest.raises(InvalidStatus):
        async with ws_connect(listed, "/ws", origin="https://other.example"):
            pass


async def test_connections_per_ip_and_per_user(make_server: ServerFactory) -> None:
    server = await make_server(max_connections_per_ip=2, jwt_secret=SECRET)
    async with ws_connect(server, "/ws"), ws_connect(server, "/ws"):
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(server, "/ws"):
                pass
        assert info.value.response.status_code == 429
    per_user = await make_server(max_connections_per_user=1, jwt_secret=SECRET)
    async with ws_connect(per_user, f"/ws/secure?token={token()}"):
        refusal = await closed_with(per_user, f"/ws/secure?token={token()}")
        assert refusal == (4029, "Too many connections for this user")


async def test_message_rate_limit_warns_then_closes_4029(make_server: ServerFactory) -> None:
    server = await make_server(messages_per_second=1, message_burst=3)
    async with ws_connect(server, "/ws") as ws:
        for n in range(20):
            await ws.send(f"m{n}")
        replies = []
        with pytest.raises(ConnectionClosed) as info:
            while True:
                replies.append(await ws.recv())
        assert replies[:3] == ["M0", "M1", "M2"]
        assert any(r.startswith("[ERROR] over 1 messages per second") for r in replies)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4029


@pytest.mark.parametrize(("overrides", "prompt"), [
    ({"run_max_tokens": 5}, "x sim:tokens=50"),
    ({"run_max_seconds": 0.3}, "x sim:rate=20 sim:tokens=1000"),
])
async def test_run_budgets(make_server: ServerFactory, overrides: dict[str, Any], prompt: str) -> None:
    server = await make_server(**overrides)
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "b", "prompt": prompt}))
        events = await run_events(ws, "b")
        assert events[-1]["type"] == "error" and events[-1]["code"] == "budget_exceeded"
        assert sum(e["type"] == "token" for e in events) <= 5 or "run_max_seconds" in overrides


async def test_concurrent_runs_per_user(make_server: ServerFactory) -> None:
    server = await make_server(jwt_secret=SECRET, max_runs_per_user=1)
    async with ws_connect(server, f"/ws/secure?token={token()}") as one, \
            ws_connect(server, f"/ws/secure?token={token()}") as two:
        await one.send(json.dumps({"type": "run", "id": "a", "prompt": "x sim:rate=20 sim:tokens=1000"}))
        assert (await recv_json(one))["type"] == "start"
        await two.send(json.dumps({"type": "run", "id": "b", "prompt": "y"}))
        refusal = await recv_json(two)
        assert refusal["code"] == "too_many_runs" and "per user" in refusal["message"]
        await one.send(json.dumps({"type": "cancel", "id": "a"}))
        assert (await run_events(one, "a"))[-1]["type"] == "cancelled"


async def test_resume_is_only_for_the_runs_own_user(make_server: ServerFactory) -> None:
    server = await make_server(jwt_secret=SECRET, resume_grace=5)
    async with ws_connect(server, f"/ws/secure?token={token()}") as alice:
        await alice.send(json.dumps({"type": "run", "id": "mine", "prompt": "x sim:rate=20 sim:tokens=100"}))
        assert (await recv_json(alice))["type"] == "start"
        async with ws_connect(server, f"/ws/secure?token={token({'user_id': 'mallory'})}") as mallory:
            for kind in ("attach", "resume"):
                await mallory.send(json.dumps({"type": kind, "id": "mine", "after": 0}))
                assert (await recv_json(mallory))["code"] == "unknown_run"
        await asyncio.wait_for(alice.send(json.dumps({"type": "cancel", "id": "mine"})), 5)


#: Claims of the wrong JSON type. Each used to be read as "no restriction" (``routes``), "no such client id"
#: (``client_ids``) or "never expires" (an ``exp`` that PyJWT accepts as a numeric string).
MALFORMED_CLAIMS: list[tuple[str, dict[str, Any]]] = [
    ("routes as a string", {"routes": "/ws/chat"}),
    ("routes as an object", {"routes": {"/ws/chat": True}}),
    ("routes as null", {"routes": None}),
    ("routes listing a number", {"routes": ["/ws/secure", 1]}),
    ("client_ids as a string", {"client_ids": "bob"}),
    ("client_ids as an object", {"client_ids": {"bob": True}}),
    ("exp as a string", {"exp": str(int(time.time()) + 3600)}),
    ("exp as a boolean", {"exp": True}),
    ("nbf as a string", {"nbf": str(int(time.time()) - 10)}),
    # Two users whose names differ only in a lone surrogate would be one user once the surrogate is
    # replaced, and as it is the name cannot be written to a socket, a log or a Redis key: refused.
    ("a user with a lone surrogate", {"user_id": "alice\ud800"}),
    ("exp as an integer no float holds", {"exp": 10**400}),
]


@pytest.mark.parametrize("path", ["/ws/ai-sdk", "/ws/secure", "/ws/alice", "/ws/bob"])
@pytest.mark.parametrize(("name", "claims"), MALFORMED_CLAIMS)
async def test_malformed_claims_close_4001(secured: WsAgentServer, path: str, name: str,
                                          claims: dict[str, Any]) -> None:
    """A claim of the wrong type makes the token invalid, on every route, whatever the claim would allow."""
    value = token({"client_ids": ["bob"], **claims})
    async with ws_connect(secured, f"{path}?token={value}") as ws:
        await asyncio.wait_for(ws.wait_closed(), 5)  # a refusal comes right after the handshake
    assert (ws.close_code, ws.close_reason) == (4001, "Invalid token"), name
    assert not secured.manager.open_by_route()


@pytest.mark.parametrize(("name", "claims"), MALFORMED_CLAIMS)
async def test_malformed_claims_refused_in_band(secured: WsAgentServer, name: str, claims: dict[str, Any]) -> None:
    async with ws_connect(secured, f"/ws/secure?token={token()}") as ws:
        await ws.send(json.dumps({"type": "auth", "token": token(claims)}))
        reply = await recv_json(ws)
        assert reply["type"] == "error" and reply["code"] == "invalid_token", name
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}


async def test_well_formed_claims_still_limit(make_server: ServerFactory) -> None:
    server = await make_server(jwt_secret=SECRET)
    both = token({"routes": ["/ws/secure", "/ws/{client_id}"], "client_ids": ["bob"]})
    for path in ("/ws/secure", "/ws/bob", "/ws/alice"):
        async with ws_connect(server, f"{path}?token={both}") as ws:
            await ws.send(json.dumps({"type": "ping"}))
            assert ws.close_code is None
    assert await closed_with(server, f"/ws/ai-sdk?token={both}") == (4003, "Forbidden route")
    assert await closed_with(server, f"/ws/carol?token={both}") == (4003, "Forbidden client id")
    assert await closed_with(server, f"/ws/secure?token={token({'routes': []})}") == (4003, "Forbidden route")
