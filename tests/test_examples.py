"""Every example script runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2

from mmedge.data import generate_scenes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_retrieval_example(tiny_pkg_session: Path, tmp_path: Path) -> None:
    for i, s in enumerate(generate_scenes(5, seed=4)):
        cv2.imwrite(str(tmp_path / f"{i}.png"), s.image[:, :, ::-1])
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "retrieval.py"),
            str(tiny_pkg_session),
            str(tmp_path),
            "a red circle",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) == 3
