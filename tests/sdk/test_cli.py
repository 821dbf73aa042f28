"""The `mmedge` CLI verbs on a small package, through `main(argv)` (same code path as the script)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from mmedge.data import generate_scenes
from mmedge.sdk.cli import build_parser, main


def _json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_help_lists_every_verb(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for verb in (
        "train",
        "export",
        "calibrate",
        "build",
        "verify",
        "inspect",
        "eval",
        "bench",
        "embed",
        "search",
        "classify",
        "demo",
    ):
        assert verb in out


def test_verify_inspect_eval_bench(tiny_pkg: Path, capsys: pytest.CaptureFixture) -> None:
    assert _json(capsys, ["verify", str(tiny_pkg), "--json"])["ok"] is True
    assert _json(capsys, ["inspect", str(tiny_pkg), "--json"])["family"] == "clip"
    ev = _json(capsys, ["eval", str(tiny_pkg), "--data", "shapes:20", "--precision", "fp32", "--json"])
    assert {"t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5"} <= set(ev) and ev["n"] == 20
    assert 0.0 <= ev["t2i_r1"] <= ev["t2i_r5"] <= 1.0
    b = _json(
        capsys,
        [
            "bench",
            str(tiny_pkg),
            "--batch",
            "1,2",
            "--threads",
            "1",
            "--runs",
            "3",
            "--vs",
            "torch",
            "--json",
        ],
    )
    row = b["components"]["vision"]["batch2"]
    assert {"ort-fp32", "torch-eager"} <= set(row) and row["ort-fp32"]["p50_ms"] > 0
    assert row["speedup_vs"]["torch-eager"] > 0


def test_embed_search_classify(tiny_pkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, s in enumerate(generate_scenes(6, seed=2)):
        cv2.imwrite(str(folder / f"{i}.png"), s.image[:, :, ::-1])
    e = _json(capsys, ["embed", str(tiny_pkg), str(folder / "0.png"), str(folder / "1.png"), "--json"])
    assert len(e["embeddings"]) == 2
    idx = tmp_path / "index"
    r = _json(capsys, ["search", str(tiny_pkg), "--add", str(folder), "--index", str(idx), "--json"])
    assert r["indexed"] == 6 and r["added"] == 6 and (idx / "index.usearch").is_file()
    # the same folder again: nothing is stored twice
    r = _json(capsys, ["search", str(tiny_pkg), "--add", str(folder), "--index", str(idx), "--json"])
    assert r["indexed"] == 6 and r["added"] == 0 and r["already_indexed"] == 6
    r = _json(
        capsys,
        ["search", str(tiny_pkg), "--image", str(folder / "3.png"), "--index", str(idx), "-k", "2", "--json"],
    )
    assert r["hits"][0]["label"].endswith("3.png")
    # the query after the options, as the README writes it; a string is text even if it names a file
    r = _json(capsys, ["search", str(tiny_pkg), "--index", str(idx), "--json", "a red circle"])
    assert len(r["hits"]) == 5
    r = _json(capsys, ["search", str(tiny_pkg), "--index", str(idx), "--json", str(folder / "3.png")])
    assert len(r["hits"]) == 5
    # a missing index is refused, not an empty answer
    assert main(["search", str(tiny_pkg), "a red circle", "--index", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err
    c = _json(
        capsys, ["classify", str(tiny_pkg), str(folder / "0.png"), "--labels", "circle,square", "--json"]
    )
    assert {x["label"] for x in c["labels"]} == {"circle", "square"}


def test_errors_are_reported_not_raised(tmp_path: Path, store: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(tmp_path)]) == 1
    assert "manifest.json" in capsys.readouterr().err
    assert main(["eval", "nothing-here"]) == 1
    assert "empty" in capsys.readouterr().err
    assert main(["eval", "nothing-here", "--json"]) == 1  # --json errors are JSON on stdout too
    err = json.loads(capsys.readouterr().out)
    assert err["type"] == "ModelNotFoundError" and err["command"] == "eval"
    with pytest.raises(SystemExit) as usage:  # usage errors keep argparse's exit code 2
        main(["eval"])
    assert usage.value.code == 2


def test_bench_reports_generation_for_chat_packages(
    chat_pkg_session: Path, capsys: pytest.CaptureFixture
) -> None:
    from mmedge.sdk.cli import main

    assert (
        main(["bench", str(chat_pkg_session), "--batch", "1", "--runs", "5", "--components", "llm", "--json"])
        == 0
    )
    gen = json.loads(capsys.readouterr().out)["generation"]
    assert gen["new_tokens"] == 20 and gen["prompt_tokens"] == 8
    assert 0 < gen["image_ms"] < gen["e2e_ms"] and gen["prefill_ms"] > 0 and gen["decode_tokens_per_s"] > 0
