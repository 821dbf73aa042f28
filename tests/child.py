"""Run Python code in a fresh child process and check that it finished and printed its marker."""

from __future__ import annotations

import subprocess
import sys


def run_child(code: str, marker: str, *args: str, timeout: float = 120) -> str:
    """`python -c code args...`; its stdout, after asserting exit status 0 and `marker` in stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0 and marker in proc.stdout, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout
