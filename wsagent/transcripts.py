"""Per-run transcripts: every event of a run as one JSON line with the wall time it was sealed.

Enabled with ``--transcripts-dir``. Each line holds the event's JSON frame
(as the JSON protocol sends it) and goes through a buffered file, so a
transcript costs one small string format per event.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TextIO

__all__ = ["Transcript"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class Transcript:
    def __init__(self, directory: str, run_id: str, conn_id: str, user: str | None) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{conn_id}-{_UNSAFE.sub('_', run_id)[:64]}.jsonl"
        self.path = Path(directory) / name
        self._file: TextIO | None = self.path.open("w", encoding="utf-8")
        header = {"run": run_id, "conn": conn_id, "user": user}
        self._file.write(f'{{"t":{time.time():.6f},"transcript":{json.dumps(header)}}}\n')

    def write(self, frame: str) -> None:
        if self._file is not None:
            self._file.write(f'{{"t":{time.time():.6f},"event":{frame}}}\n')

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

