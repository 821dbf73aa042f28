"""docs/adding-a-family.md, followed: a family defined only in the test directory registers,
passes the conformance path and appears in the generated families table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")

from family_conformance import run_conformance
from toy_family import CONFIG, TOY

from mmedge.models.registry import families, get_family, register, unregister
from mmedge.models.table import families_table


@pytest.fixture()
def toy() -> Iterator[None]:
    register(TOY)  # what the family package's __init__ does on import
    yield
    unregister(TOY.name)


def test_toy_family_registers_passes_conformance_and_is_listed(toy: None, tmp_path: Path) -> None:
    assert get_family("toy") is TOY and "toy" in families()
    pkg = run_conformance(TOY, CONFIG, tmp_path)
    from mmedge.runtime.package import verify_package

    m = verify_package(pkg).manifest
    assert sorted(m.components) == ["pixels_to_vector", "words_to_vector"]
    row = next(line for line in families_table().splitlines() if line.startswith("| `toy`"))
    assert "pixels_to_vector (image_encoder)" in row and "retrieval" in row and "bag-of-words" in row


def test_a_family_name_registers_once(toy: None) -> None:
    from dataclasses import replace

    from mmedge.errors import ConfigError

    with pytest.raises(ConfigError, match="registered twice"):
        register(replace(TOY, summary="another toy"))
