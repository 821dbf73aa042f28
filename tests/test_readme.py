"""The README stays true: its families table is the registry's, and it stays a user's page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

from mmedge.models.table import families_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_families_table_is_generated_from_the_registry() -> None:
    text = README.read_text()
    match = re.search(r"<!-- families:start -->\n(.*?)<!-- families:end -->", text, re.DOTALL)
    assert match, "README lacks the families table markers"
    assert match.group(1) == families_table(), "README's families table is stale: paste `mmedge families`"


def test_readme_is_short_and_gives_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert "./dev demo" in text and "./dev test" in text
