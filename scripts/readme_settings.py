"""Rewrite README's settings table from wsagent/core/config.py (tests/test_readme.py checks it is current)."""

from __future__ import annotations

from pathlib import Path

from wsagent.core.config import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- settings -->\n", "<!-- /settings -->"


def main() -> None:
    text = README.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    README.write_text(f"{head}{START}{settings_table()}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
