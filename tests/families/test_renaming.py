"""No stage finds a component by name: families whose components are renamed in their declarations
still export, calibrate, build and run retrieval and chat."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")

from family_conformance import CASES, run_conformance

from mmedge.models.registry import Family, get_family, register, unregister
from mmedge.runtime.package import verify_package

NEW_NAMES = {
    "vision": "image_tower",
    "text": "caption_tower",
    "qformer": "resampler",
    "projector": "adapter",
    "embed": "token_table",
    "llm": "decoder",
}


def _renamed(family: Family) -> Family:
    def components(cfg):
        return tuple(replace(d, name=NEW_NAMES[d.name]) for d in family.components(cfg))

    return replace(family, name=f"{family.name}-renamed", components=components)


@pytest.fixture()
def renamed(request: pytest.FixtureRequest) -> Iterator[tuple[Family, str]]:
    name, variant = request.param
    family = register(_renamed(get_family(name)))
    yield family, variant
    unregister(family.name)


@pytest.mark.parametrize("renamed", [("clip", "vit"), ("blip2", "opt")], indirect=True, ids=["clip", "blip2"])
def test_renamed_components_run_end_to_end(renamed: tuple[Family, str], tmp_path: Path) -> None:
    family, variant = renamed
    original = family.name.removesuffix("-renamed")
    pkg = run_conformance(family, CASES[(original, variant)], tmp_path)
    m = verify_package(pkg).manifest
    assert set(m.components) <= set(NEW_NAMES.values())
    assert not set(m.components) & set(NEW_NAMES)  # none of the usual names is left
