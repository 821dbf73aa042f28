"""Hostile vector index directories: an index written elsewhere must never crash the process.

`index.json` holds the sha256 of `index.usearch`, and whoever supplies the directory can recompute it;
usearch trusts its own files, so a crafted HNSW graph used to load and then segfault on `search`. Now
only an index with this installation's MAC reaches usearch as it is; any other is rebuilt from its
keys and vectors. Every row builds its directory here, edits it as an attacker would (re-hashing the
binary), and expects one exact error class. Crashes are caught in child processes; other rows run
under a faulthandler watchdog.

The random-mutation run also works on its own:
`python tests/security/test_hostile_index.py --mutations 0 200 --dir /tmp/x`.
"""

from __future__ import annotations

import faulthandler
import hashlib
import importlib.util
import json
import logging
import os
import random
import stat
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from mmedge.errors import IntegrityError, InvalidInputError, MmedgeError

ROOT = Path(__file__).resolve().parents[2]
DIM, N = 8, 50
CASE_TIMEOUT_S = 60
MUTATIONS, BATCHES = 200, 4
GRAPH = 8 + N * DIM * 4 + 64 + 40 + 2 * N  # offset of the first HNSW node in `_saved`'s binary


@contextmanager
def _watchdog(seconds: float = CASE_TIMEOUT_S) -> Iterator[None]:
    """A hang, even inside native code, dumps the stacks and ends the process instead of stalling the run."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _vectors() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)


def _saved(path: Path) -> np.ndarray:
    """An index of N labelled vectors saved at `path` (ids 0..N-1, label f"i{id}"); returns the vectors."""
    from mmedge.runtime.index import VectorIndex

    v = _vectors()
    idx = VectorIndex(DIM, model="m")
    idx.add(np.arange(N), v, labels=[f"i{i}" for i in range(N)])
    idx.save(path)
    return v


def _rehash(path: Path) -> None:
    """What an attacker does after editing index.usearch: put its new sha256 into index.json."""
    meta = json.loads((path / "index.json").read_text())
    meta["sha256"] = hashlib.sha256((path / "index.usearch").read_bytes()).hexdigest()
    (path / "index.json").write_text(json.dumps(meta))


def _patch_binary(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray((path / "index.usearch").read_bytes())
    raw[offset : offset + len(data)] = data
    (path / "index.usearch").write_bytes(bytes(raw))
    _rehash(path)


def _edit_meta(path: Path, edit: Callable[[dict], object]) -> None:
    meta = json.loads((path / "index.json").read_text())
    edit(meta)
    (path / "index.json").write_text(json.dumps(meta))


def _child(args: list[str], home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "MMEDGE_HOME": str(home),
        "PYTHONFAULTHANDLER": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


# --- the crash of the finding, in a child process ------------------------------------------------


def test_crafted_graph_does_not_crash_search(tmp_path: Path, store: Path) -> None:
    """One neighbour slot of the first node pointed far outside the graph, re-hashed: loads, searches right."""
    proc = _child(["--crafted", str(tmp_path / "idx")], store)
    assert proc.returncode == 0, f"child exited {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stdout.split() == ["3", "i3"], proc.stdout


def _crafted(path: Path) -> None:
    from mmedge.runtime.index import VectorIndex

    v = _saved(path)
    _patch_binary(path, GRAPH + 14, (4_000_000_000).to_bytes(4, "little"))
    hit = VectorIndex.load(path).search(v[3], 5)[0][0]
    print(hit.id, hit.label, flush=True)


# --- trusted and untrusted loads ----------------------------------------------------------------


def test_own_index_is_trusted_and_a_foreign_one_rebuilt(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mmedge.runtime.index import VectorIndex

    v = _saved(tmp_path / "idx")
    with caplog.at_level(logging.INFO, logger="mmedge.runtime.index"):
        own = VectorIndex.load(tmp_path / "idx", exact=True)
    assert "rebuilt" not in caplog.text
    other = tmp_path / "other-store"
    other.mkdir()
    monkeypatch.setenv("MMEDGE_HOME", str(other))  # another installation, with another key
    with caplog.at_level(logging.INFO, logger="mmedge.runtime.index"):
        foreign = VectorIndex.load(tmp_path / "idx", exact=True)
    assert "was not written by this installation: rebuilt from its 50 vectors" in caplog.text
    assert len(own) == len(foreign) == N and foreign.model == "m"
    for a, b in zip(own.search(v[:5], 4), foreign.search(v[:5], 4)):
        assert [(h.id, h.label) for h in a] == [(h.id, h.label) for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)


def test_edited_index_loses_its_mac(tmp_path: Path, store: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mmedge.runtime.index import VectorIndex

    _saved(tmp_path / "idx")
    _edit_meta(tmp_path / "idx", lambda m: m["labels"].update({"0": "renamed"}))
    with caplog.at_level(logging.INFO, logger="mmedge.runtime.index"):
        idx = VectorIndex.load(tmp_path / "idx")
    assert "rebuilt" in caplog.text and idx.find_labels(["renamed"]) == {"renamed": 0}


def test_key_is_private_created_once_and_ignored_when_loose(
    tmp_path: Path, store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mmedge.runtime.index import VectorIndex
    from mmedge.runtime.local_key import key_path, local_key

    assert local_key() is None and not key_path().exists()  # reading never creates
    key = local_key(create=True)
    assert key is not None and len(key) == 32 and local_key(create=True) == key
    assert stat.S_IMODE(key_path().stat().st_mode) == 0o600
    assert [p.name for p in store.iterdir()] == [key_path().name]  # no temp file left behind
    _saved(tmp_path / "idx")
    key_path().chmod(0o644)  # readable by others: it authenticates nothing any more
    with caplog.at_level(logging.INFO):
        assert local_key() is None
        VectorIndex.load(tmp_path / "idx")
    assert "ignoring the key" in caplog.text and "rebuilt" in caplog.text


# --- hostile rows ------------------------------------------------------------------------------------


def _bin(offset: int, data: bytes) -> Callable[[Path], None]:
    return lambda p: _patch_binary(p, offset, data)


def _meta(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda p: _edit_meta(p, edit)


def _truncate(p: Path) -> None:
    raw = (p / "index.usearch").read_bytes()
    (p / "index.usearch").write_bytes(raw[: len(raw) - 7])
    _rehash(p)


def _node_key(i: int) -> int:
    return GRAPH + i * (8 + 2 + 4 * 33)  # level-0 nodes of `_saved`'s small index


def _set(key: str, value: object) -> Callable[[Path], None]:
    return _meta(lambda m: m.__setitem__(key, value))


def _label(key: str, value: object) -> Callable[[Path], None]:
    return _meta(lambda m: m["labels"].__setitem__(key, value))


def _deep(p: Path) -> None:
    (p / "index.json").write_text("[" * 100_000 + "]" * 100_000)


LOAD_ROWS = [
    ("bin-not-usearch", _bin(8 + N * DIM * 4, b"usurper"), "is not a usearch 2 index"),
    ("bin-vector-size", _bin(4, (4 * DIM + 4).to_bytes(4, "little")), "holds 36-byte vectors"),
    ("bin-row-count", _bin(0, (N - 1).to_bytes(4, "little")), "counts disagree|is not a usearch"),
    ("bin-truncated", _truncate, "does not end where its nodes do"),
    ("bin-level-table", _bin(GRAPH - 2, (1).to_bytes(2, "little")), "does not end where|level"),
    ("bin-node-level", _bin(_node_key(0) + 8, (5).to_bytes(2, "little")), "level differs|does not end"),
    ("bin-duplicate-key", _bin(_node_key(1), (0).to_bytes(8, "little")), "holds a key twice"),
    ("bin-free-key", _bin(_node_key(2), b"\xff" * 8), "live keys"),
    ("bin-nan-vector", _bin(8, np.float32(np.nan).tobytes()), "NaN or infinity"),
    ("bin-huge-connectivity", _bin(GRAPH - 2 * N - 32, b"\xff" * 8), "implausible graph header"),
    ("meta-label-int", _label("0", 5), r"bad label for id 0: a label must be a str, got int"),
    ("meta-label-surrogate", _label("0", "a\ud800"), r"lone surrogate"),
    ("meta-label-overlong", _label("0", "x" * 5000), r"has 5000 characters; at most 4096"),
    ("meta-label-id-text", _label("x", "y"), r"labels an id 'x' that is not a valid id"),
    ("meta-label-id-free", _label(str(2**64 - 1), "y"), r"is not a valid id"),
    ("meta-label-id-absent", _label("999", "y"), r"labels id 999, which is not in the index"),
    ("meta-labels-list", _set("labels", ["a"]), r"labels are not an object"),
    ("meta-dim-bool", _set("dim", True), r"not an mmedge index description"),
    ("meta-dim-huge", _set("dim", 10**9), r"dimension 1000000000, not 1\.\.65536"),
    ("meta-dim-other", _set("dim", DIM * 2), r"holds 32-byte vectors, not 16 float32"),
    ("meta-unknown-key", _set("exec", "x"), r"not an mmedge index description"),
    ("meta-deep-json", _deep, r"cannot read index\.json \(RecursionError"),
]


@pytest.mark.parametrize("tamper, match", [pytest.param(t, m, id=i) for i, t, m in LOAD_ROWS])
def test_hostile_index_dir(tamper: Callable[[Path], None], match: str, tmp_path: Path, store: Path) -> None:
    from mmedge.runtime.index import VectorIndex

    with _watchdog():
        _saved(tmp_path / "idx")
        tamper(tmp_path / "idx")
        with pytest.raises(IntegrityError, match=match) as info:
            VectorIndex.load(tmp_path / "idx")
    assert type(info.value) is IntegrityError


def _add(ids: object, labels: object = None) -> None:
    from mmedge.runtime.index import VectorIndex

    idx = VectorIndex(DIM)
    idx.add(ids, _vectors()[: len(ids)], labels=labels)  # type: ignore[arg-type]


def _remove(ids: object) -> None:
    from mmedge.runtime.index import VectorIndex

    VectorIndex(DIM).remove(ids)


API_ROWS = [
    ("add-label-int", lambda: _add([0, 1], ["a", 7]), r"a label must be a str, got int"),
    ("add-label-none", lambda: _add([0], [None]), r"a label must be a str, got NoneType"),
    ("add-label-surrogate", lambda: _add([0], ["\udcff.jpg"]), r"lone surrogate"),
    ("add-label-overlong", lambda: _add([0], ["x" * 4097]), r"has 4097 characters; at most 4096"),
    ("add-labels-str", lambda: _add([0, 1], "ab"), r"labels must be a list of str, got str"),
    ("add-id-free", lambda: _add(np.array([2**64 - 1], np.uint64)), r"ids must be below 2\*\*64-1"),
    ("remove-id-text", lambda: _remove(["a"]), r"ids must be integers, got str"),
    ("remove-id-float", lambda: _remove(1.5), r"ids must be integers, got float"),
]


@pytest.mark.parametrize("call, match", [pytest.param(c, m, id=i) for i, c, m in API_ROWS])
def test_bad_ids_and_labels(call: Callable[[], None], match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as info:
        call()
    assert type(info.value) is InvalidInputError


def test_free_slot_id_is_never_in_the_index() -> None:
    from mmedge.runtime.index import VectorIndex

    idx = VectorIndex(DIM)
    idx.add([0], _vectors()[:1])
    assert (2**64 - 1) not in idx and "0" not in idx and -1 not in idx and 0 in idx
    assert idx.remove([2**64 - 1, -1, 2**70]) == 0 and len(idx) == 1


# --- random mutations, as an attacker would make them -----------------------------------------------


def _mutate(rng: random.Random, clean: Path, out: Path) -> None:
    """A copy of `clean` with a few random bytes of index.usearch or index.json changed, then re-hashed."""
    binary = bytearray((clean / "index.usearch").read_bytes())
    meta = bytearray((clean / "index.json").read_bytes())
    target = binary if rng.random() < 0.75 else meta
    span = len(target) if rng.random() < 0.6 else min(len(target), GRAPH + 600)  # often the headers
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(span)
        target[pos] = rng.randrange(256) if rng.random() < 0.7 else target[pos] ^ (1 << rng.randrange(8))
    old = json.loads((clean / "index.json").read_text())["sha256"].encode()
    meta = meta.replace(old, hashlib.sha256(binary).hexdigest().encode())
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.usearch").write_bytes(bytes(binary))
    (out / "index.json").write_bytes(bytes(meta))


def _run_mutations(start: int, stop: int, workdir: Path) -> None:
    """Load and search mutations start..stop-1; prints `START i` then `i ok|typed|untyped:<type>` each."""
    from mmedge.runtime.index import VectorIndex

    clean = workdir / "clean"
    v = _vectors()
    for i in range(start, stop):
        print(f"START {i}", flush=True)
        out = workdir / f"m{i}"
        _mutate(random.Random(f"mmedge-index-{i}"), clean, out)
        try:
            idx = VectorIndex.load(out)
            for exact in (False, True):
                idx.exact = exact
                hits = idx.search(v[:3], 5)
                assert all(h.id in idx for row in hits for h in row)
            outcome = "ok"
        except MmedgeError:
            outcome = "typed"
        except Exception as exc:  # what this run counts
            outcome = f"untyped:{type(exc).__name__}"
        print(f"{i} {outcome}", flush=True)


def mutation_counts(
    workdir: Path, home: Path, total: int = MUTATIONS, batches: int = BATCHES
) -> Counter[str]:
    """Outcomes of `total` mutations run in child processes; a child that dies counts a crash and the
    next child resumes after the crashing mutation."""
    home.mkdir(parents=True, exist_ok=True)
    prev = os.environ.get("MMEDGE_HOME")
    os.environ["MMEDGE_HOME"] = str(home)  # the clean index is this installation's own
    try:
        _saved(workdir / "clean")
    finally:
        os.environ.pop("MMEDGE_HOME") if prev is None else os.environ.__setitem__("MMEDGE_HOME", prev)
    counts: Counter[str] = Counter()
    size = -(-total // batches)
    todo = [(s, min(s + size, total)) for s in range(0, total, size)]
    procs: list[tuple[int, int, subprocess.Popen[str]]] = []
    while todo or procs:
        while todo and len(procs) < 2:  # two children at a time
            s, e = todo.pop(0)
            cmd = [sys.executable, __file__, "--mutations", str(s), str(e), "--dir", str(workdir)]
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MMEDGE_HOME": str(home)}
            env.update(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
            procs.append(
                (
                    s,
                    e,
                    subprocess.Popen(
                        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
                    ),
                )
            )
        s, e, proc = procs.pop(0)
        out, _ = proc.communicate(timeout=300)
        done = [line.split() for line in out.splitlines() if not line.startswith("START ")]
        counts.update(outcome for _, outcome in done)
        started = [int(line.split()[1]) for line in out.splitlines() if line.startswith("START ")]
        if proc.returncode != 0:  # died inside mutation started[-1]
            last = started[-1] if started else s
            counts["crash"] += 1
            if last + 1 < e:
                todo.insert(0, (last + 1, e))
    return counts


def test_random_mutations_never_crash_or_raise_untyped(tmp_path: Path) -> None:
    counts = mutation_counts(tmp_path / "work", tmp_path / "store")
    print(f"{MUTATIONS} mutations: {dict(counts)}")
    assert sum(counts.values()) == MUTATIONS, counts
    assert counts["crash"] == 0 and not [k for k in counts if k.startswith("untyped")], counts
    assert counts["ok"] > 0 and counts["typed"] > 0, counts  # both the rebuild and the refusals ran


# --- the atheris target ------------------------------------------------------------------------------


def _harness():
    spec = importlib.util.spec_from_file_location("fuzz_entry_points", ROOT / "fuzz" / "fuzz_entry_points.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_index_fuzz_target_runs_its_seeds(tmp_path: Path, store: Path) -> None:
    """The atheris target without atheris, in a child process: its seeds (one crashed the old loader)
    and random bytes."""
    proc = _child(["--fuzz-seeds", str(tmp_path)], store)
    assert proc.returncode == 0, f"child exited {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stdout.split()[-1] == "done", proc.stdout


def _fuzz_seeds(workdir: Path) -> None:
    fuzz = _harness()
    target = fuzz.make_target("index", workdir=workdir)
    rng = random.Random("mmedge-index")
    inputs = fuzz.seeds("index") + [
        bytes([rng.randrange(2)]) + rng.randbytes(rng.randint(0, 60)) for _ in range(20)
    ]
    for i, data in enumerate(inputs):
        print(i, flush=True)
        target(data)
    print("done", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crafted", type=Path, help="build the crafted index there, load it and search it")
    ap.add_argument(
        "--fuzz-seeds", type=Path, help="run the index fuzz target's seeds in this work directory"
    )
    ap.add_argument("--mutations", nargs=2, type=int, metavar=("START", "STOP"))
    ap.add_argument("--dir", type=Path, help="work directory of --mutations")
    a = ap.parse_args()
    if a.crafted:
        _crafted(a.crafted)
    elif a.fuzz_seeds:
        _fuzz_seeds(a.fuzz_seeds)
    elif a.mutations and a.dir and (a.dir / "clean").is_dir():
        _run_mutations(*a.mutations, a.dir)
    elif a.mutations and a.dir:
        home = a.dir / "store"
        print(dict(mutation_counts(a.dir / "work", home, total=a.mutations[1] - a.mutations[0])))
