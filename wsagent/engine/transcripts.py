"""Per-run transcripts: every event of a run as one JSON line with the wall time it was sealed.

Enabled with ``--transcripts-dir``. Each line holds the event's JSON frame
(as the JSON protocol sends it) and goes through a buffered file, so a
transcript costs one small string format per event.

* The directory is made at startup (and on a SIGHUP that names a new one), with
  any missing parents, each mode 0700; a directory that cannot be made or
  written to stops the server before it listens, with one line saying why
  (:func:`prepare_directory`). An existing directory keeps its mode.
* Each file is created mode 0600 (by the ``open`` itself, whatever the umask),
  never over an existing file or through a symlink.
* The run's key (the secret that resumes, attaches to or cancels it) is left
  out of the ``start`` event a transcript records.
* A transcript that cannot be opened or written (the directory is gone, no
  descriptors or disk left) never fails its run: the run goes on without one.
  That is logged once (a warning) until a transcript of that directory can be
  written again (an info line); the failures in between are logged at debug.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TextIO

__all__ = ["Transcript", "prepare_directory"]

log = logging.getLogger("wsagent.transcripts")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_START = '{"type":"start"'
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
#: Names tried when a run's file name is taken (a run id used again within the same second on one connection).
_SAME_NAME_TRIES = 100
#: Directories whose transcripts are failing now (so a full disk is one warning, not one per run).
_failing: set[str] = set()


def prepare_directory(directory: str) -> None:
    """Make ``directory`` (and its missing parents, each mode 0700) and check a file can be created in it;
    ``SystemExit`` with one line saying why if not."""
    path = Path(directory).absolute()
    try:
        missing = [p for p in (path, *path.parents) if not p.is_dir()]
        for level in reversed(missing):
            try:
                level.mkdir(mode=0o700)
            except FileExistsError:
                if not level.is_dir():
                    raise NotADirectoryError(f"{level} is not a directory") from None
        fd, probe = tempfile.mkstemp(prefix=".wsagent-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else exc.strerror or str(exc)
        raise SystemExit(f"--transcripts-dir {directory}: cannot create it or write to it ({reason})") from None


def _trouble(directory: str, what: str, exc: BaseException) -> None:
    if directory in _failing:
        log.debug("transcript in %s: %s: %s", directory, what, exc)
        return
    _failing.add(directory)
    log.warning("transcripts in %s: %s (%s); runs go on without transcripts, logged once until one can be "
                "written again", directory, what, exc)


class Transcript:
    def __init__(self, directory: str, run_id: str, conn_id: str, user: str | None) -> None:
        self.directory = directory
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        stem = f"{stamp}-{conn_id}-{_UNSAFE.sub('_', run_id)[:64]}"
        self.path = Path(directory) / f"{stem}.jsonl"
        self._file: TextIO | None = None
        header = {"run": run_id, "conn": conn_id, "user": user}
        try:
            self._file = self._open(stem)
            self._file.write(f'{{"t":{time.time():.6f},"transcript":{json.dumps(header)}}}\n')
        except (OSError, ValueError) as exc:
            self._drop("cannot open a transcript", exc)
            return
        if directory in _failing:
            _failing.discard(directory)
            log.info("transcripts in %s are written again", directory)

    def _open(self, stem: str) -> TextIO:
        for n in range(_SAME_NAME_TRIES):
            if n:
                self.path = self.path.with_name(f"{stem}-{n + 1}.jsonl")
            try:
                fd = os.open(self.path, _FLAGS, 0o600)
            except FileExistsError:
                continue
            try:
                return open(fd, "w", encoding="utf-8", closefd=True)
            except BaseException:
                os.close(fd)
                raise
        raise FileExistsError(f"{_SAME_NAME_TRIES} transcripts named {stem}*.jsonl exist")

    def write(self, frame: str) -> None:
        if self._file is None:
            return
        if frame.startswith(_START):  # the run's key is a secret: it stays out of the transcript
            event = json.loads(frame)
            event.pop("key", None)
            frame = _dumps(event)
        try:
            self._file.write(f'{{"t":{time.time():.6f},"event":{frame}}}\n')
        except (OSError, ValueError) as exc:
            self._drop("cannot write a transcript", exc)

    def close(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            try:
                handle.close()
            except (OSError, ValueError) as exc:
                _trouble(self.directory, "cannot write a transcript", exc)

    def _drop(self, what: str, exc: BaseException) -> None:
        """Go on without this transcript (what is written of it stays)."""
        handle, self._file = self._file, None
        if handle is not None:
            try:
                handle.close()
            except (OSError, ValueError):
                pass
        _trouble(self.directory, what, exc)
