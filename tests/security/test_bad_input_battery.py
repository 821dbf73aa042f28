"""Bad-input battery: every hostile input raises the documented `mmedge.errors` class naming the problem.

One table (`CASES`) of bad inputs across packages, ONNX files and their external data, checkpoints
(rows in `battery_files.py`), images, texts, arrays at the component boundary and request parameters
(`battery_inputs.py`); the builders of bad things are in `battery_helpers.py`. Each row states the exact
exception class and a `match=` pattern that names the problem or the limit.

Crashes and hangs: every row runs under a faulthandler watchdog (`CASE_TIMEOUT_S`): a hang dumps every
thread's stack and ends the run with the row still named in the output, rather than stalling CI. The rows
that drive native parsers (image decoders, protobuf, the Rust tokenizer and safetensors readers) run a
second time in one child process (`test_native_rows_in_child_process`), so a segfault or abort there
fails one test with the row's id instead of killing pytest. The whole table can also run on its own,
in a fresh process, with a timeout:

    timeout 300 .venv/bin/python tests/security/test_bad_input_battery.py        # builds its own package
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from battery_files import FILE_CASES
from battery_helpers import (
    NATIVE,
    Env,
    _open,
)
from battery_inputs import INPUT_CASES

from mmedge.errors import (
    MmedgeError,
)

CASE_TIMEOUT_S = 60  # per row; a healthy row takes milliseconds
CHILD_TIMEOUT_S = 180


CASES = FILE_CASES + INPUT_CASES

# --- running the table ---------------------------------------------------------------------------


@contextmanager
def _watchdog(file: object = None, seconds: float = CASE_TIMEOUT_S):
    """If a row hangs, even inside native code, dump every thread's stack to `file` and end the process."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=file or sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _check(exc: BaseException, expected: type[MmedgeError], match: str) -> str | None:
    """None if `exc` is exactly the documented error naming the problem, else what is wrong."""
    if type(exc) is not expected:
        return f"raised {type(exc).__module__}.{type(exc).__name__}: {exc}; expected {expected.__name__}"
    if not re.search(match, str(exc)):
        return f"{expected.__name__} message {str(exc)!r} does not match {match!r}"
    return None


@pytest.fixture(scope="module")
def shared_pipe(tiny_pkg_session: Path):
    from mmedge import sdk

    return sdk.Pipeline(str(tiny_pkg_session))


@pytest.fixture()
def env(tmp_path: Path, tiny_pkg_session: Path, tiny_ckpt: Path, shared_pipe, store: Path) -> Env:
    return Env(tmp_path, tiny_pkg_session, tiny_ckpt, lambda: shared_pipe, store=store)


def test_table_is_large_and_distinct() -> None:
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 45
    assert len({p.id.split("-")[0] for p in CASES}) >= 7  # every category is represented


def _terminal_stderr(config: pytest.Config) -> object:
    """The terminal's stderr, which pytest's capturing does not swallow (as its faulthandler plugin uses)."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        return config.stash[fault_handler_stderr_fd_key]
    except (ImportError, KeyError):  # another pytest version, or -p no:faulthandler
        return sys.__stderr__


@pytest.mark.parametrize("run, expected, match", CASES)
def test_bad_input(
    run: Callable[[Env], object],
    expected: type[MmedgeError],
    match: str,
    env: Env,
    request: pytest.FixtureRequest,
) -> None:
    with _watchdog(_terminal_stderr(request.config)), pytest.raises(MmedgeError) as info:
        run(env)
    problem = _check(info.value, expected, match)
    assert problem is None, problem


def test_special_tokens_in_user_text_are_plain_text(shared_pipe, tiny_pkg_session: Path) -> None:
    """A typed special token is not an error and never becomes the special token itself."""
    spec = json.loads((tiny_pkg_session / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in spec["added_tokens"] if t["special"]}
    assert "<|endoftext|>" in specials
    # Characters outside clip-tiny's small vocabulary legitimately become <unk>; no other special may appear.
    forbidden = {i for content, i in specials.items() if content != spec["model"].get("unk_token")}
    texts = [f"a red {s} circle" for s in specials] + ["".join(specials)]
    tok = shared_pipe.runner.tokenizer
    ids, mask = tok.encode_batch(texts)
    (plain,), _ = tok.encode_batch(["a red circle"])
    for row, m in zip(ids, mask):
        body = row[: int(m.sum())].tolist()
        # The post-processor's start and end tokens are the only special ids; typed ones are split up.
        assert body[0] == plain[0] and body[-1] == plain[-1], body
        assert not set(body[1:-1]) & forbidden and len(body) > 4, body
    vecs = shared_pipe.embed_texts(texts)
    assert vecs.shape == (len(texts), shared_pipe.dim) and np.isfinite(vecs).all()
    # The text tower pools at the end token: a typed "<|endoftext|>" must not end the caption early.
    early = shared_pipe.embed_texts(["a red"])[0]
    assert not np.allclose(vecs[texts.index("a red <|endoftext|> circle")], early, atol=1e-4)


def test_native_rows_in_child_process(tmp_path: Path, tiny_pkg_session: Path, tiny_ckpt: Path) -> None:
    """Rows that reach native parsers, again in a fresh process: a segfault or hang fails with the row's id."""
    cmd = [
        sys.executable,
        __file__,
        "--pkg",
        str(tiny_pkg_session),
        "--ckpt",
        str(tiny_ckpt),
        "--tmp",
        str(tmp_path),
        *NATIVE,
    ]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"child hung after {CHILD_TIMEOUT_S}s; last row started: {_last_started(out)}\n{out}")
    if proc.returncode < 0 or proc.returncode > 1:
        pytest.fail(
            f"child died (exit {proc.returncode}) in row {_last_started(proc.stdout)}\n{proc.stderr[-4000:]}"
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert sum(line.startswith("OK ") for line in proc.stdout.splitlines()) == len(NATIVE), proc.stdout


def _last_started(out: str) -> str:
    started = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("START ")]
    return started[-1] if started else "(none)"


def _main(argv: list[str]) -> int:
    """Run rows (default: all) in this process; prints START/OK/FAIL per row, exit 1 if any failed."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pkg", type=Path, help="an exported clip-tiny package (default: build one)")
    ap.add_argument("--ckpt", type=Path, help="its checkpoint (default: build one)")
    ap.add_argument("--tmp", type=Path, help="scratch directory (default: a new temporary one)")
    ap.add_argument("ids", nargs="*", help="row ids to run (default: all)")
    args = ap.parse_args(argv)
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="mmedge-battery-"))
    if args.pkg is None or args.ckpt is None:
        from mmedge.export.exporter import export_model
        from mmedge.models.init import init_checkpoint

        args.ckpt = init_checkpoint("clip-tiny", tmp / "src-ckpt", seed=0)
        args.pkg = tmp / "src-pkg"
        export_model(args.ckpt, args.pkg)
    rows = {p.id: p for p in CASES}
    unknown = set(args.ids) - set(rows)
    if unknown:
        ap.error(f"unknown row ids {sorted(unknown)}")
    pipes: list[object] = []

    def pipe() -> object:
        if not pipes:
            pipes.append(_open(args.pkg))
        return pipes[0]

    failed = 0
    for i, rid in enumerate(args.ids or list(rows)):
        run, expected, match = rows[rid].values
        xfail = any(m.name == "xfail" for m in rows[rid].marks)
        work = tmp / f"row{i}"
        work.mkdir()
        store = work / "store"
        store.mkdir()
        os.environ["MMEDGE_HOME"] = str(store)
        print("START", rid, flush=True)
        try:
            with _watchdog():
                run(Env(work, args.pkg, args.ckpt, pipe, store=store))
            problem = "raised nothing"
        except BaseException as exc:  # anything other than the expected error is what we report
            if isinstance(exc, KeyboardInterrupt):
                raise
            problem = _check(exc, expected, match)
        if problem is None or xfail:
            print("OK" if problem is None else "XFAIL", rid, flush=True)
        else:
            failed += 1
            print("FAIL", rid, problem, flush=True)
    if args.tmp is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
