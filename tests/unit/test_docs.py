"""The README's set-up commands, .ci/run and the docs agree with the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _sh_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", text, flags=re.S)]


def test_readme_has_exactly_two_setup_commands() -> None:
    """The README's set-up section has two one-line commands: serve, and the tests."""
    setup = (ROOT / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = _sh_blocks(setup)
    assert len(blocks) == 2 and all("\n" not in b for b in blocks)
    assert blocks[0].endswith("dmg-node serve")
    assert "pytest" in blocks[1]


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs exactly the README's test command."""
    readme_test = _sh_blocks((ROOT / "README.md").read_text())[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert readme_test in ci_lines


def test_torch_is_pinned() -> None:
    """pyproject pins torch==2.13.0 (an unpinned torch pulls a multi-GB CUDA build)."""
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()


def test_logging_doc_lists_every_event() -> None:
    """Every event name logged in dmg_node/ is documented in docs/logging.md."""
    doc = (ROOT / "docs" / "logging.md").read_text()
    events: set[str] = set()
    for path in (ROOT / "dmg_node").rglob("*.py"):
        events |= set(re.findall(r"log\.(?:debug|info|warning|error|exception)\(\s*\"([a-z_]+)\"", path.read_text()))
        events |= set(re.findall(r"\"(association_(?:released|aborted))\"", path.read_text()))
    missing = sorted(e for e in events if f"`{e}`" not in doc)
    assert not missing, f"undocumented log events: {missing}"
