"""Every registered family and variant passes the conformance path; none may lack a case."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from family_conformance import CASES, run_conformance

from mmedge.models.registry import families, get_family


def test_every_registered_variant_has_a_conformance_case() -> None:
    registered = {(f.name, v) for f in families().values() for v in f.variants}
    missing = sorted(registered - set(CASES))
    assert not missing, (
        f"registered families/variants without a conformance case in family_conformance.CASES: {missing}"
    )


@pytest.mark.parametrize("case", sorted(CASES), ids=[f"{f}-{v}" for f, v in sorted(CASES)])
def test_family_conformance(case: tuple[str, str], tmp_path: Path) -> None:
    name, variant = case
    family = get_family(name)
    assert variant in family.variants
    pkg = run_conformance(family, CASES[case], tmp_path)
    from mmedge.runtime.package import verify_package

    assert verify_package(pkg).manifest.variant == variant
