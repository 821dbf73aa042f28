"""SIGKILL during export / calibrate never leaves a half-written package (old or new, both verify)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmedge.runtime.manifest import MANIFEST_NAME
from mmedge.runtime.package import verify_package
from mmedge.runtime.staging import remove_stale_staging

SCRIPTS = {
    "export": "from mmedge.export.exporter import export_model; import sys; export_model(sys.argv[1], sys.argv[2])",
    "calibrate": "from mmedge.calibration.package import calibrate_package; import sys; "
    "calibrate_package(sys.argv[2], 'train-shapes:24', samples=16)",
}


def _start(kind: str, ckpt: Path, pkg: Path) -> subprocess.Popen:
    # A killed run cannot remove its temporary directories: keep them under the test's own tmp dir.
    tmp = pkg.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPTS[kind], str(ckpt), str(pkg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )


def _run_to_end(kind: str, ckpt: Path, pkg: Path) -> float:
    t0 = time.perf_counter()
    assert _start(kind, ckpt, pkg).wait(timeout=300) == 0
    return time.perf_counter() - t0


@pytest.mark.parametrize("kind, kills", [("export", 12), ("calibrate", 10)])
def test_sigkill_leaves_old_or_new_package(kind: str, kills: int, tiny_ckpt: Path, tiny_pkg: Path) -> None:
    full = _run_to_end(kind, tiny_ckpt, tiny_pkg)  # also makes the package a "new" one for the next runs
    states = {(tiny_pkg / MANIFEST_NAME).read_bytes()}
    outcomes = []
    for i in range(kills):
        # Spread the kills over the second half of a run, where the package is written.
        delay = full * (0.35 + 0.7 * i / kills)
        proc = _start(kind, tiny_ckpt, tiny_pkg)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            outcomes.append("killed")
        else:
            outcomes.append("finished")
        proc.wait()
        verify_package(tiny_pkg)  # raises if anything is half-written
        states.add((tiny_pkg / MANIFEST_NAME).read_bytes())
        remove_stale_staging(tiny_pkg.parent)  # what a killed run leaves beside it
    assert outcomes.count("killed") >= kills // 2, outcomes
