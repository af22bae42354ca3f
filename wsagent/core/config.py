"""Every setting in one place: a flag, an environment variable, a default, and what it takes.

Each field of :class:`Settings` is one setting, declared once with :func:`setting`: its parsed type is the
field's annotation, its default the field's default, and the rest a :class:`Spec` (help text, group, variable,
whether SIGHUP applies it, the values it takes, the upstream or simulator setting it feeds). ``--help``,
README's settings table, the environment fallbacks, validation, :data:`RELOADABLE` and the upstream's and the
simulator's own settings are all derived from those declarations, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .tuning import DEFAULT_GC_THRESHOLDS

log = logging.getLogger("wsagent.config")

__all__ = ["Settings", "Spec", "BUSY_POLICIES", "setting", "build_parser", "load_settings", "settings_table",
           "read_env_file", "RELOADABLE"]


@dataclass(frozen=True)
class Spec:
    """What a setting declares besides its name, parsed type and default (those are its field's)."""

    help: str
    group: str = "server"
    #: Its environment variable, where that is not ``WSAGENT_`` and the setting's name in capitals.
    env: str | None = None
    #: SIGHUP applies it to a running server; a change of any other setting needs a restart.
    reload: bool = False
    #: The only values it takes (its help text names them too).
    choices: tuple[str, ...] = ()
    #: The flag may be given several times, its values joined with commas as the environment variable gives them.
    repeat: bool = False
    #: The field of :class:`~wsagent.upstream.model.UpstreamConfig` it sets.
    upstream: str | None = None
    #: The field of :class:`~wsagent.upstream.simulator.SimulatorSettings` it sets (the built-in simulator's).
    simulator: str | None = None

#: What a message sent while an answer streams may do (``--on-busy``, ``?on_busy=``, ``body.on_busy``).
BUSY_POLICIES = ("enqueue", "reject", "interrupt", "steer")


def setting(default: Any, help: str, *, group: str = "server", env: str | None = None, reload: bool = False,
            choices: tuple[str, ...] = (), repeat: bool = False, upstream: str | None = None,
            simulator: str | None = None) -> Any:
    """Declare a field of :class:`Settings` as a setting."""
    spec = Spec(help, group, env, reload, choices, repeat, upstream, simulator)
    return field(default=default, metadata={"spec": spec})


@dataclass
class Settings:
    """The server's settings. A list (``allowed_models``, ``allowed_origins``, ``gc_thresholds``) may be given as
    its comma-separated text, as its flag takes it: it is parsed into its tuple once, here."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "TCP port to listen on (0: any free port)")
    workers: int = setting(1, "worker processes sharing the port with SO_REUSEPORT (needs a fixed --port)")
    redis_url: str | None = setting(None, "join a cluster through this Redis (redis://host:6379/0; needs the cluster extra); unset: this process alone", group="cluster")
    node_id: str | None = setting(None, "this node's name in the cluster (unset: host name, pid and 4 random hex digits; with --workers, -w1, -w2... appended)", group="cluster")
    takeover: str = setting("off", "a dead node's runs go on elsewhere: background (--upstream-api responses), continue (chat completions) or off; docs/scaling-out.md", group="cluster", choices=("off", "background", "continue"))
    event_loop: str = setting("auto", "the event loop: auto (uvloop when installed: pip install \".[fast]\"), uvloop, or asyncio", choices=("auto", "uvloop", "asyncio"))
    env_file: str | None = setting(None, "KEY=VALUE file of WSAGENT_* settings, read at start and again on SIGHUP")
    max_connections: int = setting(10000, "open WebSocket connections before new ones get HTTP 503", reload=True)
    max_message_size: int = setting(1048576, "largest incoming message in bytes; larger closes with 1009")
    compression: str = setting("deflate", "permessage-deflate when clients offer it (deflate), or off", choices=("deflate", "off"))
    open_timeout: float = setting(10.0, "seconds allowed for the opening handshake")
    close_timeout: float = setting(5.0, "seconds allowed for the closing handshake before the TCP connection is dropped")
    ping_interval: float = setting(20.0, "seconds between protocol pings (0: off)")
    ping_timeout: float = setting(20.0, "seconds to wait for a pong before dropping the peer")
    idle_ping: float = setting(60.0, "seconds of client silence before /ws/robust sends {\"type\": \"ping\"}", reload=True)
    drain_timeout: float = setting(10.0, "seconds in-flight streams may finish after SIGTERM before they are cancelled", reload=True)
    client_id_policy: str = setting("replace", "a second connection with a connected client id: replace (old gets 4009) or reject (new gets 4009)", choices=("replace", "reject"), reload=True)
    outbox_bytes: int = setting(1048576, "bytes queued for one client (broadcasts) before it is closed with 4008", reload=True)
    max_broadcast_bytes: int = setting(65536, "largest broadcast content in bytes (well below --outbox-bytes, so one broadcast never overflows a listener's outbox)", reload=True)
    slow_client_timeout: float = setting(30.0, "seconds a client may accept no data before it is closed with 4008", reload=True)
    socket_send_buffer: int = setting(262144, "kernel send buffer per client socket in bytes, so backpressure reaches the model sooner (0: kernel autotuning, up to 4 MiB)")

    upstream_url: str | None = setting(None, "OpenAI-compatible base URL, e.g. https://api.openai.com/v1 (unset: built-in simulator)", group="upstream", env="WSAGENT_UPSTREAM_URL")
    api_key: str | None = setting(None, "API key sent as a Bearer token to the upstream", group="upstream", env="OPENAI_API_KEY", upstream="api_key")
    upstream_api: str = setting("chat", "the upstream's dialect: chat (POST {url}/chat/completions) or responses (POST {url}/responses, the OpenAI Responses API)", group="upstream", env="WSAGENT_UPSTREAM_API", choices=("chat", "responses"), upstream="api")
    model: str = setting("wsagent-sim", "model name sent upstream when a run names none", group="upstream", env="WSAGENT_MODEL", upstream="model", simulator="model")
    upstream_background: bool = setting(False, "Responses API: stored background responses, so a dropped stream is re-attached where it stopped (the server keeps them: docs/operations.md)", group="upstream", upstream="background")
    connect_timeout: float = setting(10.0, "seconds to connect to the upstream", group="upstream", upstream="connect_timeout")
    first_byte_timeout: float = setting(60.0, "seconds to wait for the upstream's answer and first byte", group="upstream", upstream="first_byte_timeout")
    read_timeout: float = setting(60.0, "seconds allowed between two upstream reads (comments count)", group="upstream", upstream="read_timeout")
    max_retries: int = setting(2, "retries of 408/409/429/5xx and connection errors before the first byte", group="upstream", upstream="max_retries")
    retry_deadline: float = setting(30.0, "seconds after which no retry starts, however many are left (behind a proxy that retries too)", group="upstream", upstream="retry_deadline")
    upstream_receive_buffer: int = setting(262144, "kernel receive buffer per upstream connection in bytes, so a paused relay holds the model back sooner (0: kernel autotuning)", group="upstream", upstream="receive_buffer")
    sim_rate: float = setting(50.0, "tokens per second of the built-in simulator (0: unthrottled)", group="upstream", simulator="rate")
    sim_tokens: int = setting(24, "answer length in tokens of the built-in simulator", group="upstream", simulator="tokens")
    allowed_models: tuple[str, ...] = setting((), "models a client may ask for with 'model', comma-separated (the configured --model always); *: any", group="upstream", reload=True)
    sim_switches: bool = setting(False, "the built-in simulator honours sim:key=value fault switches in prompts (tests only: any client could use them)", group="upstream", simulator="switches")

    max_runs_per_connection: int = setting(8, "runs in flight on one socket", group="relay", reload=True)
    run_buffer_bytes: int = setting(65536, "bytes (characters) of one run its own client has not taken before the upstream read is paused", group="relay", reload=True)
    replay_bytes: int = setting(262144, "bytes (characters) of delivered events one run keeps for resume; each event is kept once", group="relay", reload=True)
    ai_sdk_grace: float = setting(30.0, "seconds a /ws/ai-sdk response goes on without its client, and is kept once it ended, for useChat's resume (a page reload)", group="relay", reload=True)
    resume_grace: float = setting(0.0, "seconds a run outlives a dropped client, waiting for a resume (0: cancel at once)", group="relay", reload=True)
    replay_budget_bytes: int = setting(64 * 1024 * 1024, "bytes all finished runs kept for resume may hold together (their logs, and 6 KiB each); the oldest is forgotten first", group="relay", reload=True)
    replay_budget_per_user: int = setting(8 * 1024 * 1024, "the same for one user's finished runs (an anonymous client's: its connection's)", group="relay", reload=True)
    history_messages: int = setting(20, "messages kept per connection in /ws/chat text mode", group="relay", reload=True)
    history_chars: int = setting(32000, "characters kept per connection in /ws/chat text mode", group="relay", reload=True)
    agents: str = setting("", "your own agents, served by name: module:attribute or path/file.py:attribute, a dict of name to factory (repeatable; see docs/agents.md)", group="relay", repeat=True, reload=True)
    approval_tools: tuple[str, ...] = setting((), "tools the built-in and workflow agents ask a person about before each call, comma-separated (*: all)", group="relay", reload=True)
    approval_timeout: float = setting(300.0, "seconds an approval request waits for its answer; then the run ends with error approval_timeout", group="relay", reload=True)
    on_busy: str = setting("enqueue", "a message while an answer streams (text mode, AI SDK chats): enqueue, reject, interrupt or steer", group="relay", choices=BUSY_POLICIES, reload=True)
    workflows: str | None = setting(None, "JSON file of named workflows (unset: the examples shipped in the package)", group="relay", reload=True)

    jwt_secret: str | None = setting(None, "HS256 secret for JWTs (prefer the environment or a file; never logged)", group="auth", reload=True)
    jwt_secret_file: str | None = setting(None, "file holding the JWT secret (systemd credentials)", group="auth", reload=True)
    jwt_public_key_file: str | None = setting(None, "PEM public key for RS256/ES256 tokens", group="auth", reload=True)
    jwt_algorithms: str = setting("HS256", "comma-separated allowlist of JWT algorithms", group="auth", reload=True)
    jwt_audience: str | None = setting(None, "required aud claim", group="auth", reload=True)
    jwt_issuer: str | None = setting(None, "required iss claim", group="auth", reload=True)
    jwt_user_claim: str = setting("sub", "claim holding the user id (with sub, user_id is accepted too)", group="auth", reload=True)
    jwt_leeway: float = setting(30.0, "seconds of clock skew allowed on exp, nbf and iat", group="auth", reload=True)
    require_auth: bool = setting(False, "every WebSocket route needs a valid token (not only /ws/secure)", group="auth", reload=True)
    allowed_origins: tuple[str, ...] = setting((), "Origins allowed to connect, comma-separated; empty: same host only; *: any", group="auth", reload=True)
    max_connections_per_ip: int = setting(256, "open connections from one IP address (over it: HTTP 429)", group="auth", reload=True)
    max_connections_per_user: int = setting(32, "open connections of one user (over it: close 4029)", group="auth", reload=True)
    messages_per_second: float = setting(20.0, "messages a connection may send per second, sustained", group="auth", reload=True)
    message_burst: int = setting(40, "messages a connection may send at once before the rate applies", group="auth", reload=True)
    max_runs_per_user: int = setting(16, "runs in flight for one user across connections", group="auth", reload=True)
    max_runs_per_ip: int = setting(256, "runs in flight without a token from one IP address, on every route (behind a proxy all share its address: raise it; 0: no limit)", group="auth", reload=True)
    run_max_seconds: float = setting(600.0, "wall time budget of one run (0: none)", group="auth", reload=True)
    run_max_tokens: int = setting(32768, "streamed deltas budget of one run (0: none)", group="auth", reload=True)

    gc_thresholds: tuple[int, int, int] | None = setting(DEFAULT_GC_THRESHOLDS, "the cyclic garbage collector's thresholds after startup objects are frozen out of it (empty: CPython's 700,10,10)")

    log_level: str = setting("INFO", "logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)", group="logging", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), reload=True)
    log_format: str = setting("text", "text or json (one object per line)", group="logging", choices=("text", "json"))
    transcripts_dir: str | None = setting(None, "write each run's events as JSON lines with timestamps to this directory", group="logging", reload=True)

    def __post_init__(self) -> None:
        """Parse each list given as its text (a flag's, a variable's, an embedder's string) into its tuple."""
        for entry in _ENTRIES:
            value = getattr(self, entry.name)
            if entry.from_text and isinstance(value, str):
                try:
                    setattr(self, entry.name, entry.parse(value))
                except ValueError as exc:
                    raise ValueError(f"{entry.flag} {exc}") from None
        self.log_level = self.log_level.upper()  # (logging's names, in any case)

    def model_allowed(self, model: str) -> bool:
        """A client may ask for the configured model, and for those ``--allowed-models`` lists."""
        return model == self.model or model in self.allowed_models or "*" in self.allowed_models

    def for_upstream(self) -> dict[str, Any]:
        """The settings declared with ``upstream=``, by the names of :class:`~wsagent.upstream.model.UpstreamConfig`'s
        fields (``UpstreamConfig(base_url=..., **settings.for_upstream())``: the settings stay below the layers
        that use them, and import none of them)."""
        config = {entry.spec.upstream: getattr(self, entry.name) for entry in _ENTRIES if entry.spec.upstream}
        if self.takeover == "background":  # another node re-attaches to the response where this one stopped
            config["background"] = True
        return config

    def for_simulator(self) -> dict[str, Any]:
        """The settings declared with ``simulator=``, by the names of
        :class:`~wsagent.upstream.simulator.SimulatorSettings`' fields."""
        return {entry.spec.simulator: getattr(self, entry.name) for entry in _ENTRIES if entry.spec.simulator}


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _names(raw: str) -> tuple[str, ...]:
    """A comma-separated list's items, stripped, empty ones left out."""
    return tuple(name for name in (part.strip() for part in raw.split(",")) if name)


def _three_whole_numbers(raw: str) -> tuple[int, int, int] | None:
    """Three comma-separated whole numbers; empty: none."""
    if not raw.strip():
        return None
    try:
        first, second, third = (int(part) for part in raw.split(","))
    except ValueError:
        raise ValueError("takes three whole numbers, like 50000,20,100") from None
    return first, second, third


#: How the text of a flag or a variable becomes a setting's parsed type (its field's annotation). A scalar is
#: converted where it is read, so that a bad one is blamed on the flag (by argparse) or on the variable.
_SCALARS: dict[Any, Callable[[str], Any]] = {bool: _boolean, int: int, float: float, str: str, str | None: str}
#: A list is parsed by :class:`Settings` itself, so that an embedder's text is parsed the same way.
_LISTS: dict[Any, Callable[[str], Any]] = {tuple[str, ...]: _names, tuple[int, int, int] | None: _three_whole_numbers}


@dataclass(frozen=True)
class _Entry:
    """One setting as everything derived from the declarations sees it."""

    name: str
    spec: Spec
    default: Any
    parse: Callable[[str], Any]
    from_text: bool  # a list, parsed by Settings rather than where it is read

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return self.spec.env or "WSAGENT_" + self.name.upper()

    @property
    def shown_default(self) -> str:
        """The default as ``--help`` and README show it: a list as its flag would take it."""
        if self.default is None:
            return "unset"
        if isinstance(self.default, tuple):
            return ",".join(map(str, self.default))
        return str(self.default)


def _entries() -> tuple[_Entry, ...]:
    types = typing.get_type_hints(Settings)
    entries = []
    for f in dataclasses.fields(Settings):
        kind = types[f.name]
        from_text = kind not in _SCALARS
        parse = _LISTS[kind] if from_text else _SCALARS[kind]  # a KeyError here: a type nothing parses yet
        entries.append(_Entry(f.name, f.metadata["spec"], f.default, parse, from_text))
    return tuple(entries)


_ENTRIES = _entries()

#: Settings SIGHUP may change on a running server; the others need a restart.
RELOADABLE = frozenset(entry.name for entry in _ENTRIES if entry.spec.reload)


def build_parser(prog: str = "python -m wsagent.serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Stream LLM tokens and agent thoughts over WebSockets.",
        epilog="Every flag falls back to the environment variable named in brackets.",
    )
    groups: dict[str, Any] = {}
    for entry in _ENTRIES:
        group_name = entry.spec.group
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        help_text = f"{entry.spec.help} [{entry.env}] (default: {entry.shown_default})".replace("%", "%%")
        if entry.parse is _boolean:
            groups[group_name].add_argument(entry.flag, dest=entry.name, default=None,
                                            action=argparse.BooleanOptionalAction, help=help_text)
        elif entry.spec.repeat:
            groups[group_name].add_argument(entry.flag, dest=entry.name, default=None, action="append",
                                            metavar=entry.name.upper(), help=help_text)
        else:
            groups[group_name].add_argument(entry.flag, dest=entry.name, default=None,
                                            type=str if entry.from_text else entry.parse,
                                            metavar=entry.name.upper(), help=help_text)
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over the environment, which wins over the defaults."""
    environ = dict(os.environ if environ is None else environ)
    args = build_parser().parse_args(argv)
    env_file = args.env_file or environ.get("WSAGENT_ENV_FILE")
    if env_file:
        environ = {**read_env_file(env_file), **environ}
    values: dict[str, Any] = {}
    for entry in _ENTRIES:
        flag_value = getattr(args, entry.name)
        if flag_value is not None:
            values[entry.name] = ",".join(flag_value) if entry.spec.repeat else flag_value
            continue
        raw = environ.get(entry.env)
        if raw:
            try:
                values[entry.name] = raw if entry.from_text else entry.parse(raw)
            except ValueError as exc:
                raise SystemExit(f"{entry.env}: {exc}") from None
    try:
        settings = Settings(**values)
    except ValueError as exc:  # a list that does not parse, named by its flag
        raise SystemExit(str(exc)) from None
    validate(settings)
    _warn_unknown(environ)
    return settings


#: ``WSAGENT_*`` names that are not settings of the server but are read elsewhere (the client, the
#: installer, CI, and the worker number ``--workers`` sets for the log lines of each worker).
_OTHER_NAMES = frozenset({"WSAGENT_URL", "WSAGENT_TOKEN", "WSAGENT_PREFIX", "WSAGENT_CI_VENV"})


def _warn_unknown(environ: Mapping[str, str]) -> None:
    """A misspelt setting (``WSAGENT_MAX_CONECTIONS``) would be ignored without a word: say so."""
    known = {entry.env for entry in _ENTRIES} | _OTHER_NAMES
    for name in sorted(environ):
        if name.startswith("WSAGENT_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            log.warning("unknown setting %s is ignored%s", name, f"; did you mean {close[0]}?" if close else "")


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
    for entry in _ENTRIES:
        if entry.spec.choices and getattr(settings, entry.name) not in entry.spec.choices:
            raise SystemExit(f"{entry.flag} must be {_one_of(entry.spec.choices)}")
    if not 0 <= settings.port <= 65535:
        raise SystemExit("--port must be between 0 and 65535")
    if settings.workers < 1:
        raise SystemExit("--workers must be at least 1")
    if settings.workers > 1 and settings.port == 0:
        raise SystemExit("--workers > 1 needs a fixed --port: the workers share it")
    if settings.takeover != "off" and not settings.redis_url:
        raise SystemExit("--takeover needs --redis-url: the nodes that take runs over share them through Redis")
    if settings.takeover == "background" and settings.upstream_api != "responses":
        raise SystemExit("--takeover background needs --upstream-api responses (the Responses API's background "
                         "responses are what another node re-attaches to)")
    if settings.takeover == "background" and not settings.upstream_url:
        raise SystemExit("--takeover background needs --upstream-url: the node that takes a run over re-attaches to "
                         "the response on the model server that keeps it, which every node must share (the "
                         "built-in simulator is each node's own; serve one with python -m wsagent.simulator)")
    if settings.takeover == "continue" and settings.upstream_api != "chat":
        raise SystemExit("--takeover continue needs --upstream-api chat (it asks the model server to continue a "
                         "partial chat completion; with the Responses API, use --takeover background)")


def _one_of(choices: tuple[str, ...]) -> str:
    """``'a', 'b' or 'c'``."""
    quoted = [repr(choice) for choice in choices]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def settings_table() -> str:
    """README's settings table, generated from the same declarations as ``--help``. A variable is named only
    where it is not ``WSAGENT_`` and the setting's name (README says that rule once)."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for entry in _ENTRIES:
        flag = f"`{entry.flag}`"
        if entry.env != "WSAGENT_" + entry.name.upper():
            flag += f" (`{entry.env}`)"
        rows.append(f"| {flag} | `{entry.shown_default}` | {entry.spec.help} |")
    return "\n".join(rows)
