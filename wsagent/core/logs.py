"""Logging setup: readable text by default, one JSON object per line as an option."""

from __future__ import annotations

import json
import logging
import re
import time

__all__ = ["configure_logging", "JsonFormatter", "Redactor", "printable"]

_SECRETS = re.compile(r"([?&]token=)[^&\s]+|(bearer[. ])[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def printable(value: str) -> str:
    """``value`` safe for one log line: control characters (a newline that would forge a line) escaped."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                   for c in value)


class Redactor(logging.Filter):
    """Masks tokens in a record: ``?token=``, ``Authorization: Bearer`` and ``bearer.<token>`` subprotocols.

    The websockets library logs request lines and headers at DEBUG level; this
    filter sits on the logger it writes to, so no level leaks a token.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRETS.sub(lambda m: (m.group(1) or m.group(2)) + "[REDACTED]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for log shippers; ``worker`` (``w1``, ``w2``...) tags each line of a worker."""

    def __init__(self, worker: str = "") -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("conn", "run"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if self.worker:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text", worker: str = "") -> None:
    """Log lines to stderr as ``fmt`` says, each tagged ``worker`` (``w1``...: a worker of ``--workers``)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {worker + ' ' if worker else ''}"
                                               "%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("wsagent.websockets").setLevel(max(root.level, logging.WARNING))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
