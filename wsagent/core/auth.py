"""JWT authentication (pyjwt) and the per-client abuse limits.

Refusals are close codes a browser can read, not bare HTTP errors: the server
accepts the upgrade, then closes with 4001 (missing, malformed, badly signed,
expired, not yet valid, wrong audience or issuer, or a claim of the wrong type:
``routes`` or ``client_ids`` not a list of strings, ``exp``, ``nbf`` or ``iat``
not a number) or 4003 (a valid token that may not use this route or this
client id).

Where a token comes from, in this order: ``?token=`` in the URL, an
``Authorization: Bearer`` header, or a ``Sec-WebSocket-Protocol`` entry
``bearer.<token>`` (a browser offers ``["wsagent", "bearer.<token>"]`` and the
server selects ``wsagent``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import jwt
from websockets.http11 import Request

from .config import Settings
from .events import well_formed

__all__ = ["AuthError", "Identity", "Authenticator", "TokenBucket", "SUBPROTOCOL", "token_from_request",
           "CLOSE_INVALID_TOKEN", "CLOSE_FORBIDDEN", "CLOSE_RATE_LIMIT"]

CLOSE_INVALID_TOKEN = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_RATE_LIMIT = 4029
SUBPROTOCOL = "wsagent"
_BEARER_PROTOCOL = "bearer."
_ASYMMETRIC = ("RS", "ES", "PS", "Ed")


class AuthError(Exception):
    def __init__(self, code: int, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Identity:
    user: str
    expires: float
    claims: dict[str, Any]

    def may_use(self, route_pattern: str, params: dict[str, str]) -> None:
        """Raise 4003 if the token's claims keep it off this route or client id."""
        routes = _string_list(self.claims, "routes")  # fails closed: a malformed claim is an invalid token
        if routes is not None and route_pattern not in routes:
            raise AuthError(CLOSE_FORBIDDEN, "Forbidden route")
        client_id = params.get("client_id")
        if client_id is not None:
            allowed = _string_list(self.claims, "client_ids")
            if client_id != self.user and not (allowed is not None and client_id in allowed):
                raise AuthError(CLOSE_FORBIDDEN, "Forbidden client id")


def _string_list(claims: dict[str, Any], name: str) -> list[str] | None:
    """The claim ``name``, which must be a list of strings if it is there at all (4001 if not: a string, an
    object or ``null`` where a list belongs is never read as "no restriction")."""
    if name not in claims:
        return None
    value = claims[name]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AuthError(CLOSE_INVALID_TOKEN, "Invalid token", f"the {name} claim must be a list of strings")
    return value


def _number(claims: dict[str, Any], name: str) -> float | None:
    """The time claim ``name`` as a number (PyJWT also takes a numeric string, which was read as "never")."""
    if name not in claims:
        return None
    value = claims[name]
    try:  # (an int of 400 digits overflows a float: no time either)
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise AuthError(CLOSE_INVALID_TOKEN, "Invalid token", f"the {name} claim must be a number")
    return number


def token_from_request(request: Request) -> str | None:
    _, _, query = request.path.partition("?")
    if query:
        values = parse_qs(query).get("token")
        if values and values[0]:
            return values[0]
    authorization = request.headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    for header in request.headers.get_all("Sec-WebSocket-Protocol"):
        for entry in header.split(","):
            entry = entry.strip()
            if entry.startswith(_BEARER_PROTOCOL) and len(entry) > len(_BEARER_PROTOCOL):
                return entry[len(_BEARER_PROTOCOL):]
    return None


class Authenticator:
    """Verifies tokens with an explicit algorithm allowlist (``none`` can never be on it)."""

    def __init__(self, settings: Settings) -> None:
        self.algorithms = [a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()]
        if not self.algorithms or any(a.lower() == "none" for a in self.algorithms):
            raise SystemExit("--jwt-algorithms must list real algorithms; 'none' is never accepted")
        symmetric = [a for a in self.algorithms if a.startswith("HS")]
        asymmetric = [a for a in self.algorithms if a.startswith(_ASYMMETRIC)]
        if symmetric and asymmetric:
            raise SystemExit("--jwt-algorithms cannot mix HS* with RS/ES/PS/EdDSA (algorithm confusion)")
        self.key: str | bytes | None = None
        if asymmetric:
            if settings.jwt_public_key_file:
                with open(settings.jwt_public_key_file, "rb") as handle:
                    self.key = handle.read()
        elif settings.jwt_secret_file:
            with open(settings.jwt_secret_file, encoding="utf-8") as handle:
                self.key = handle.read().strip()
        elif settings.jwt_secret:
            self.key = settings.jwt_secret
        self.audience = settings.jwt_audience or None
        self.issuer = settings.jwt_issuer or None
        self.user_claim = settings.jwt_user_claim
        self.leeway = settings.jwt_leeway

    def verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError(CLOSE_INVALID_TOKEN, "Invalid token", "no token")
        if self.key is None:
            raise AuthError(CLOSE_INVALID_TOKEN, "Invalid token", "the server has no JWT key configured")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(CLOSE_INVALID_TOKEN, "Invalid token", f"{type(exc).__name__}: {exc}") from None
        user = claims.get(self.user_claim)
        if user is None and self.user_claim == "sub":
            user = claims.get("user_id")
        if not isinstance(user, (str, int)) or isinstance(user, bool) or user == "":
            raise AuthError(CLOSE_INVALID_TOKEN, "Invalid token", f"no {self.user_claim} claim")
        if isinstance(user, str) and well_formed(user) != user:  # JSON's "\ud800": no socket or key can hold it
            raise AuthError(CLOSE_INVALID_TOKEN, "Invalid token", f"the {self.user_claim} claim is not valid text")
        exp = _number(claims, "exp")
        for name in ("nbf", "iat"):
            _number(claims, name)
        for name in ("routes", "client_ids"):  # checked here, so a malformed one is refused on every route
            _string_list(claims, name)
        return Identity(str(user), math.inf if exp is None else exp + self.leeway, claims)


class TokenBucket:
    """Messages per second with a burst; ``allow`` is O(1) and allocation-free."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
