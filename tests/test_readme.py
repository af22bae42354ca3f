"""README stays true: the settings table matches the code, and CI runs README's test command."""

from __future__ import annotations

from pathlib import Path

from wsagent.config import build_parser, settings_table

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_settings_table_is_current() -> None:
    start = README.index("<!-- settings -->\n") + len("<!-- settings -->\n")
    end = README.index("<!-- /settings -->")
    assert README[start:end].strip() == settings_table().strip()


def test_every_flag_is_in_help_and_readme() -> None:
    help_text = build_parser().format_help()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help" and not flag.startswith("--no-"):
                assert flag in help_text and f"`{flag}`" in README


def test_readme_opens_with_the_two_commands() -> None:
    blocks = README.split("```sh\n")
    assert blocks[1].startswith("pip install . && python -m wsagent.serve\n")
    assert blocks[2].startswith('pip install -e ".[test]" && ruff check && python -m pytest\n')
    assert "<!-- test-command -->" in blocks[1]
