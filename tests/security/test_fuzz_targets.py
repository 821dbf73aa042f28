"""Keep the atheris harness (fuzz/fuzz_entry_points.py) from rotting: every target over fixed inputs.

The harness's one-input functions run here without atheris, over its own seeds and 20 pseudo-random
byte strings per target; any exception other than an mmedge error (or a failed invariant) fails.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_entry_points.py"


def _load_harness():
    spec = importlib.util.spec_from_file_location("fuzz_entry_points", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzz = _load_harness()


def _random_inputs(name: str, n: int = 20) -> list[bytes]:
    rng = random.Random(f"mmedge-{name}")
    out = [rng.randbytes(rng.randint(0, 400)) for _ in range(n)]
    if name == "image":  # past the magic bytes, into each header parser
        magics = (
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
            b"\xff\xd8\xff",
            b"GIF89a",
            b"RIFF\x00\x00\x00\x00WEBP",
            b"BM",
            b"ARR",
        )
        out += [m + rng.randbytes(rng.randint(0, 200)) for m in magics for _ in range(3)]
    return out


@pytest.mark.parametrize("name", fuzz.TARGETS)
def test_target_survives_seeds_and_random_bytes(name: str, tiny_pkg_session: Path, tmp_path: Path) -> None:
    target = fuzz.make_target(name, package=tiny_pkg_session, workdir=tmp_path)
    inputs = fuzz.seeds(name, tiny_pkg_session) + _random_inputs(name)
    for i, data in enumerate(inputs):
        try:
            target(data)
        except Exception as exc:
            pytest.fail(f"{name} input {i} ({data[:80]!r}...) raised {type(exc).__name__}: {exc}")


def test_mmedge_errors_pass_and_anything_else_is_a_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The harness's own contract: a target swallows MmedgeError and lets every other exception escape."""
    from mmedge.errors import IntegrityError
    from mmedge.runtime import package

    target = fuzz.make_target("external_data", workdir=tmp_path)

    def validator(exc: Exception):
        def check(*args: object) -> None:
            raise exc

        return check

    monkeypatch.setattr(package, "check_onnx_file", validator(IntegrityError("refused")))
    target(b"\x01\x00")
    monkeypatch.setattr(package, "check_onnx_file", validator(KeyError("boom")))
    with pytest.raises(KeyError):
        target(b"\x01\x00")


def test_without_atheris_the_harness_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "atheris", None)  # import atheris -> ImportError
    with pytest.raises(SystemExit, match=r"pip install atheris"):
        fuzz.main(["fuzz_entry_points.py", "--target", "image", "-runs=1"])
