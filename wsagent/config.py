"""Every setting in one place: a flag, an environment variable, a default.

The table below is the single source: ``--help``, README's settings table and
the environment fallbacks are all derived from it, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .tuning import DEFAULT_GC_THRESHOLDS

log = logging.getLogger("wsagent.config")

__all__ = ["Settings", "build_parser", "load_settings", "settings_table", "read_env_file", "RELOADABLE"]


def _opt(default: Any, help: str, env: str | None = None, group: str = "server", repeat: bool = False) -> Any:
    """A setting. ``repeat``: the flag may be given several times (its values joined with commas, as the
    environment variable gives them)."""
    return field(default=default, metadata={"help": help, "env": env, "group": group, "repeat": repeat})


@dataclass
class Settings:
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "TCP port to listen on (0: any free port)")
    workers: int = _opt(1, "worker processes sharing the port with SO_REUSEPORT (needs a fixed --port)")
    redis_url: str | None = _opt(None, "join a cluster through this Redis (redis://host:6379/0; needs the cluster extra); unset: this process alone", group="cluster")
    node_id: str | None = _opt(None, "this node's name in the cluster (unset: host name, pid and 4 random hex digits, unique per process)", group="cluster")
    event_loop: str = _opt("auto", "the event loop: auto (uvloop when installed: pip install \".[fast]\"), uvloop, or asyncio")
    env_file: str | None = _opt(None, "KEY=VALUE file of WSAGENT_* settings, read at start and again on SIGHUP")
    max_connections: int = _opt(10000, "open WebSocket connections before new ones get HTTP 503")
    max_message_size: int = _opt(1048576, "largest incoming message in bytes; larger closes with 1009")
    compression: str = _opt("deflate", "permessage-deflate when clients offer it (deflate), or off")
    open_timeout: float = _opt(10.0, "seconds allowed for the opening handshake")
    close_timeout: float = _opt(5.0, "seconds allowed for the closing handshake before the TCP connection is dropped")
    ping_interval: float = _opt(20.0, "seconds between protocol pings (0: off)")
    ping_timeout: float = _opt(20.0, "seconds to wait for a pong before dropping the peer")
    idle_ping: float = _opt(60.0, "seconds of client silence before /ws/robust sends {\"type\": \"ping\"}")
    drain_timeout: float = _opt(10.0, "seconds in-flight streams may finish after SIGTERM before they are cancelled")
    client_id_policy: str = _opt("replace", "a second connection with a connected client id: replace (old gets 4009) or reject (new gets 4009)")
    outbox_bytes: int = _opt(1048576, "bytes queued for one client (broadcasts) before it is closed with 4008")
    max_broadcast_bytes: int = _opt(65536, "largest broadcast content in bytes (well below --outbox-bytes, so one broadcast never overflows a listener's outbox)")
    slow_client_timeout: float = _opt(30.0, "seconds a client may accept no data before it is closed with 4008")
    socket_send_buffer: int = _opt(262144, "kernel send buffer per client socket in bytes, so backpressure reaches the model sooner (0: kernel autotuning, up to 4 MiB)")

    upstream_url: str | None = _opt(None, "OpenAI-compatible base URL, e.g. https://api.openai.com/v1 (unset: built-in simulator)", "WSAGENT_UPSTREAM_URL", "upstream")
    api_key: str | None = _opt(None, "API key sent as a Bearer token to the upstream", "OPENAI_API_KEY", "upstream")
    upstream_api: str = _opt("chat", "the upstream's dialect: chat (POST {url}/chat/completions) or responses (POST {url}/responses, the OpenAI Responses API)", "WSAGENT_UPSTREAM_API", "upstream")
    model: str = _opt("wsagent-sim", "model name sent upstream when a run names none", "WSAGENT_MODEL", "upstream")
    connect_timeout: float = _opt(10.0, "seconds to connect to the upstream", group="upstream")
    first_byte_timeout: float = _opt(60.0, "seconds to wait for the upstream's first byte", group="upstream")
    read_timeout: float = _opt(60.0, "seconds allowed between two upstream reads (comments count)", group="upstream")
    max_retries: int = _opt(2, "retries of 408/409/429/5xx and connection errors before the first byte", group="upstream")
    retry_deadline: float = _opt(30.0, "seconds after which no retry starts, however many are left (behind a proxy that retries too)", group="upstream")
    upstream_receive_buffer: int = _opt(262144, "kernel receive buffer per upstream connection in bytes, so a paused relay holds the model back sooner (0: kernel autotuning)", group="upstream")
    sim_rate: float = _opt(50.0, "tokens per second of the built-in simulator (0: unthrottled)", group="upstream")
    sim_tokens: int = _opt(24, "answer length in tokens of the built-in simulator", group="upstream")
    allowed_models: str = _opt("", "models a client may ask for with 'model', comma-separated (the configured --model always); *: any", group="upstream")
    sim_switches: bool = _opt(False, "the built-in simulator honours sim:key=value fault switches in prompts (tests only: any client could use them)", group="upstream")

    max_runs_per_connection: int = _opt(8, "runs in flight on one socket", group="relay")
    run_buffer_bytes: int = _opt(65536, "bytes (characters) of one run its own client has not taken before the upstream read is paused", group="relay")
    replay_bytes: int = _opt(262144, "bytes (characters) of delivered events one run keeps for resume; each event is kept once", group="relay")
    ai_sdk_grace: float = _opt(30.0, "seconds a /ws/ai-sdk response goes on without its client, and is kept once it ended, for useChat's resume (a page reload)", group="relay")
    resume_grace: float = _opt(0.0, "seconds a run outlives a dropped client, waiting for a resume (0: cancel at once)", group="relay")
    replay_budget_bytes: int = _opt(64 * 1024 * 1024, "bytes all finished runs kept for resume may hold together (their logs, and 6 KiB each); the oldest is forgotten first", group="relay")
    replay_budget_per_user: int = _opt(8 * 1024 * 1024, "the same for one user's finished runs (an anonymous client's: its connection's)", group="relay")
    history_messages: int = _opt(20, "messages kept per connection in /ws/chat text mode", group="relay")
    history_chars: int = _opt(32000, "characters kept per connection in /ws/chat text mode", group="relay")
    agents: str = _opt("", "your own agents, served by name: module:attribute or path/file.py:attribute, a dict of name to factory (repeatable; see docs/agents.md)", group="relay", repeat=True)
    workflows: str | None = _opt(None, "JSON file of named workflows (unset: the examples shipped in the package)", group="relay")

    jwt_secret: str | None = _opt(None, "HS256 secret for JWTs (prefer the environment or a file; never logged)", group="auth")
    jwt_secret_file: str | None = _opt(None, "file holding the JWT secret (systemd credentials)", group="auth")
    jwt_public_key_file: str | None = _opt(None, "PEM public key for RS256/ES256 tokens", group="auth")
    jwt_algorithms: str = _opt("HS256", "comma-separated allowlist of JWT algorithms", group="auth")
    jwt_audience: str | None = _opt(None, "required aud claim", group="auth")
    jwt_issuer: str | None = _opt(None, "required iss claim", group="auth")
    jwt_user_claim: str = _opt("sub", "claim holding the user id (with sub, user_id is accepted too)", group="auth")
    jwt_leeway: float = _opt(30.0, "seconds of clock skew allowed on exp, nbf and iat", group="auth")
    require_auth: bool = _opt(False, "every WebSocket route needs a valid token (not only /ws/secure)", group="auth")
    allowed_origins: str = _opt("", "Origins allowed to connect, comma-separated; empty: same host only; *: any", group="auth")
    max_connections_per_ip: int = _opt(256, "open connections from one IP address (over it: HTTP 429)", group="auth")
    max_connections_per_user: int = _opt(32, "open connections of one user (over it: close 4029)", group="auth")
    messages_per_second: float = _opt(20.0, "messages a connection may send per second, sustained", group="auth")
    message_burst: int = _opt(40, "messages a connection may send at once before the rate applies", group="auth")
    max_runs_per_user: int = _opt(16, "runs in flight for one user across connections", group="auth")
    max_runs_per_ip: int = _opt(256, "runs in flight without a token from one IP address, on every route (behind a proxy all share its address: raise it; 0: no limit)", group="auth")
    run_max_seconds: float = _opt(600.0, "wall time budget of one run (0: none)", group="auth")
    run_max_tokens: int = _opt(32768, "streamed deltas budget of one run (0: none)", group="auth")

    gc_thresholds: str = _opt(",".join(map(str, DEFAULT_GC_THRESHOLDS)), "the cyclic garbage collector's thresholds after startup objects are frozen out of it (empty: CPython's 700,10,10)")

    log_level: str = _opt("INFO", "logging level", group="logging")
    log_format: str = _opt("text", "text or json (one object per line)", group="logging")
    transcripts_dir: str | None = _opt(None, "write each run's events as JSON lines with timestamps to this directory", group="logging")

    def model_allowed(self, model: str) -> bool:
        """A client may ask for the configured model, and for those ``--allowed-models`` lists."""
        allowed = {name.strip() for name in self.allowed_models.split(",") if name.strip()}
        return model == self.model or model in allowed or "*" in allowed


#: Settings SIGHUP may change on a running server; the others need a restart.
RELOADABLE = frozenset({
    "max_connections", "idle_ping", "drain_timeout", "client_id_policy", "outbox_bytes", "max_broadcast_bytes",
    "allowed_models",
    "slow_client_timeout", "max_runs_per_connection", "run_buffer_bytes", "replay_bytes", "resume_grace", "ai_sdk_grace",
    "replay_budget_bytes", "replay_budget_per_user",
    "history_messages", "history_chars", "workflows", "agents", "jwt_secret", "jwt_secret_file", "jwt_public_key_file",
    "jwt_algorithms", "jwt_audience", "jwt_issuer", "jwt_user_claim", "jwt_leeway", "require_auth",
    "allowed_origins", "max_connections_per_ip", "max_connections_per_user", "messages_per_second",
    "message_burst", "max_runs_per_user", "max_runs_per_ip", "run_max_seconds", "run_max_tokens", "transcripts_dir", "log_level",
})


def env_name(name: str) -> str:
    meta = _fields()[name].metadata
    return meta.get("env") or "WSAGENT_" + name.upper()


def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(Settings)}


def _kind(f: dataclasses.Field[Any]) -> type:
    default = f.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def _convert(kind: type, raw: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    return kind(raw)


def build_parser(prog: str = "python -m wsagent.serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Stream LLM tokens and agent thoughts over WebSockets.",
        epilog="Every flag falls back to the environment variable named in brackets.",
    )
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f)
        default = "unset" if f.default is None else f.default
        help_text = f"{f.metadata['help']} [{env_name(f.name)}] (default: {default})".replace("%", "%%")
        if kind is bool:
            groups[group_name].add_argument(flag, dest=f.name, default=None,
                                            action=argparse.BooleanOptionalAction, help=help_text)
        elif f.metadata["repeat"]:
            groups[group_name].add_argument(flag, dest=f.name, default=None, action="append",
                                            metavar=f.name.upper(), help=help_text)
        else:
            groups[group_name].add_argument(flag, dest=f.name, default=None, type=kind,
                                            metavar=f.name.upper(), help=help_text)
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over the environment, which wins over the defaults."""
    environ = dict(os.environ if environ is None else environ)
    args = build_parser().parse_args(argv)
    env_file = args.env_file or environ.get("WSAGENT_ENV_FILE")
    if env_file:
        environ = {**read_env_file(env_file), **environ}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        flag_value = getattr(args, f.name)
        if flag_value is not None:
            values[f.name] = ",".join(flag_value) if isinstance(flag_value, list) else flag_value
            continue
        raw = environ.get(env_name(f.name))
        if raw is not None and raw != "":
            try:
                values[f.name] = _convert(_kind(f), raw)
            except ValueError as exc:
                raise SystemExit(f"{env_name(f.name)}: {exc}") from None
    settings = Settings(**values)
    validate(settings)
    _warn_unknown(environ)
    return settings


#: ``WSAGENT_*`` names that are not settings of the server but are read elsewhere (the client, the
#: installer, ``--workers``, CI).
_OTHER_NAMES = frozenset({"WSAGENT_ENV_FILE", "WSAGENT_URL", "WSAGENT_TOKEN", "WSAGENT_PREFIX", "WSAGENT_WORKER_OF",
                          "WSAGENT_READY_FD", "WSAGENT_CI_VENV", "WSAGENT_WORKER", "WSAGENT_WORKER_DIR"})


def _warn_unknown(environ: Mapping[str, str]) -> None:
    """A misspelt setting (``WSAGENT_MAX_CONECTIONS``) would be ignored without a word: say so."""
    known = {env_name(f.name) for f in dataclasses.fields(Settings)} | _OTHER_NAMES
    for name in sorted(environ):
        if name.startswith("WSAGENT_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            log.warning("unknown setting %s is ignored%s", name, f"; did you mean {close[0]}?" if close else "")


def gc_thresholds(settings: Settings) -> tuple[int, int, int] | None:
    if not settings.gc_thresholds.strip():
        return None
    first, second, third = (int(part) for part in settings.gc_thresholds.split(","))
    return first, second, third


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines as systemd's ``EnvironmentFile=`` reads them (comments and quotes allowed)."""
    values: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line or line.startswith(("#", ";")) or "=" not in line:
                    continue
                key, _, value = line.partition("=")
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                values[key.strip()] = value
    except OSError as exc:
        raise SystemExit(f"--env-file {path}: {exc.strerror}") from None
    return values


def validate(settings: Settings) -> None:
    if settings.client_id_policy not in ("replace", "reject"):
        raise SystemExit("--client-id-policy must be 'replace' or 'reject'")
    if settings.event_loop not in ("auto", "uvloop", "asyncio"):
        raise SystemExit("--event-loop must be 'auto', 'uvloop' or 'asyncio'")
    if settings.upstream_api not in ("chat", "responses"):
        raise SystemExit("--upstream-api must be 'chat' or 'responses'")
    if settings.compression not in ("deflate", "off"):
        raise SystemExit("--compression must be 'deflate' or 'off'")
    if settings.log_format not in ("text", "json"):
        raise SystemExit("--log-format must be 'text' or 'json'")
    if not 0 <= settings.port <= 65535:
        raise SystemExit("--port must be between 0 and 65535")
    try:
        gc_thresholds(settings)
    except ValueError:
        raise SystemExit("--gc-thresholds takes three whole numbers, like 50000,20,100") from None
    if settings.workers < 1:
        raise SystemExit("--workers must be at least 1")
    if settings.workers > 1 and settings.port == 0:
        raise SystemExit("--workers > 1 needs a fixed --port: the workers share it")


def settings_table() -> str:
    """README's settings table, generated from the same fields as ``--help``. A variable is named only where
    it is not ``WSAGENT_`` and the setting's name (README says that rule once)."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(Settings):
        default = "unset" if f.default is None else f.default
        flag = f"`--{f.name.replace('_', '-')}`"
        if env_name(f.name) != "WSAGENT_" + f.name.upper():
            flag += f" (`{env_name(f.name)}`)"
        rows.append(f"| {flag} | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)
