"""What a new user meets first: verbs that fit the package or say which do, options in any order,
sample inputs, readable errors and exit codes, no tracebacks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmedge.sdk.cli import build_parser, main


def _out(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_a_verb_on_the_wrong_kind_of_package_names_the_verbs_that_fit(
    chat_pkg_session: Path, tiny_pkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    img = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(img), np.zeros((32, 32, 3), np.uint8))
    assert main(["classify", str(chat_pkg_session), str(img), "--labels", "a,b"]) == 1
    err = capsys.readouterr().err
    assert "is a chat package" in err and "Verbs for chat packages: caption, chat, eval" in err
    assert "Traceback" not in err
    for argv in (["caption", str(tiny_pkg), str(img)], ["generate", str(tiny_pkg), "hello"]):
        assert main(argv) == 1
        assert "is a retrieval package" in capsys.readouterr().err


def test_options_and_positionals_in_any_order(
    tiny_pkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "new" / "dir" / "e.npy"  # a missing folder is created
    r = _out(
        capsys,
        [
            "embed",
            "--text",
            "a red circle",
            "--text",
            "a blue star",
            str(tiny_pkg),
            "--out",
            str(out),
            "--json",
        ],
    )
    assert r["shape"][0] == 2 and np.load(out).shape[0] == 2
    assert (
        main(["embed", str(tiny_pkg), "--text", "a red circle", str(out)]) == 1
    )  # texts or images, not both
    assert "not several" in capsys.readouterr().err


def test_sample_scenes_for_the_quick_start(
    tiny_pkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    r = _out(capsys, ["data", "scenes", "5", "--out", str(tmp_path / "samples"), "--size", "64", "--json"])
    lines = (tmp_path / "samples" / "captions.jsonl").read_text().splitlines()
    assert (
        r["images"] == 5
        and len(lines) == 5
        and (tmp_path / "samples" / json.loads(lines[0])["image"]).is_file()
    )
    # the folder and the JSONL both work as --data
    r = _out(
        capsys, ["eval", str(tiny_pkg), "--data", str(tmp_path / "samples" / "captions.jsonl"), "--json"]
    )
    assert r["n"] == 5


def test_eval_says_what_it_ignores_and_warns_on_training_scenes(
    tiny_pkg: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["eval", str(tiny_pkg), "--data", "train-shapes:8", "--questions", "3", "--json"]) == 0
    captured = capsys.readouterr()
    assert "--questions do not apply to a retrieval package" in captured.err
    assert "training-seed scenes" in captured.err
    assert json.loads(captured.out)["n"] == 8


def test_calibrate_defaults_to_training_seed_scenes_and_help_shows_defaults(
    capsys: pytest.CaptureFixture,
) -> None:
    args = build_parser().parse_args(["calibrate", "pkg"])
    assert args.data == "train-shapes:64" and args.weight_bits == [4]
    assert build_parser().parse_args(["calibrate", "pkg", "--weight-bits", "4,8"]).weight_bits == [4, 8]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "clip-tiny" in text and "blip2-tiny" in text and "(default:" in text


def test_version_list_and_verbose_after_the_verb(store: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("mmedge ")
    r = _out(capsys, ["list", "--json", "-v"])
    assert r["packages"] == {} and r["store"] == str(store)


def test_verify_and_inspect_take_store_names(
    store: Path, tiny_pkg: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    shutil.copytree(tiny_pkg, store / "mine")
    assert _out(capsys, ["verify", "mine", "--json"])["ok"] is True
    assert _out(capsys, ["inspect", "mine", "--json"])["family"] == "clip"


def test_output_piped_into_head_ends_quietly(tiny_pkg: Path) -> None:
    script = (
        f"from mmedge.sdk.cli import main; raise SystemExit(main(['inspect', {str(tiny_pkg)!r}, '--json']))"
    )
    proc = subprocess.run(
        f'{sys.executable} -c "{script}" | head -c 10',
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


def test_an_index_of_another_model_is_refused(tiny_pkg: Path, tmp_path: Path) -> None:
    import json as _json
    import shutil

    from mmedge import sdk
    from mmedge.errors import InvalidInputError
    from mmedge.runtime.index import VectorIndex

    p = sdk.Pipeline(str(tiny_pkg), precision="fp32")
    p.add_images([np.zeros((32, 32, 3), np.uint8)])
    p.index.save(tmp_path / "idx")
    assert VectorIndex.load(tmp_path / "idx").model == p.model_id
    other = tmp_path / "other"
    shutil.copytree(tiny_pkg, other)
    manifest = _json.loads((other / "manifest.json").read_text())
    manifest["name"] = "another-model"
    (other / "manifest.json").write_text(_json.dumps(manifest))
    q = sdk.Pipeline(str(other), precision="fp32")
    with pytest.raises(InvalidInputError, match="rebuild the index with this package"):
        q.index = VectorIndex.load(tmp_path / "idx")
    with pytest.raises(InvalidInputError, match="the index is empty"):
        q.search("a red circle")


def test_out_folders_holding_other_files_are_refused_before_the_work(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    for argv in (
        ["export", str(tiny_ckpt), "--out", str(mine)],
        ["train", "--preset", "clip-tiny", "--out", str(mine), "--steps", "1"],
        ["init", "clip-tiny", "--out", str(mine)],
    ):
        t0 = time.perf_counter()
        assert main(argv) == 1
        assert "--force" in capsys.readouterr().err and time.perf_counter() - t0 < 5  # refused up front
        assert (mine / "keep.txt").read_text() == "precious"
    # an older package is replaced, as before; --force replaces anything
    assert main(["export", str(tiny_ckpt), "--out", str(tmp_path / "pkg")]) == 0
    assert main(["export", str(tiny_ckpt), "--out", str(tmp_path / "pkg")]) == 0
    assert main(["export", str(tiny_ckpt), "--out", str(mine), "--force"]) == 0
    assert not (mine / "keep.txt").exists() and (mine / "manifest.json").is_file()
    capsys.readouterr()
    # `--out .` in a folder of other files, and a name the manifest cannot hold: refused before exporting
    work = tmp_path / "work dir"
    work.mkdir()
    (work / "notes.md").write_text("x")
    monkeypatch.chdir(work)
    assert main(["export", str(tiny_ckpt), "--out", "."]) == 1
    assert main(["export", str(tiny_ckpt), "--out", str(tmp_path / "empty"), "--name", "bad name!"]) == 1
    assert "not a valid name" in capsys.readouterr().err and not (tmp_path / "empty").exists()


def test_limits_that_do_not_fit_the_context_are_said(chat_pkg_session: Path) -> None:
    from mmedge import sdk
    from mmedge.errors import ContextFullWarning, InvalidInputError

    chat = sdk.Pipeline(str(chat_pkg_session))
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(InvalidInputError, match="min_new_tokens=300 does not fit"):
        chat.chat(image, "how many shapes are there?", min_new_tokens=300, max_new_tokens=300)
    with pytest.warns(ContextFullWarning, match="the model's context of 64 tokens is full"):
        text = chat.chat(image, "how many shapes are there?", max_new_tokens=300, min_new_tokens=20)
    assert text


def test_interactive_chat_drops_old_turns_when_the_context_is_full(
    chat_pkg_session: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    import cv2

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.zeros((64, 64, 3), np.uint8))
    questions = ["how many shapes are there?", "what colour is the circle?"] * 5
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(questions) + "\n\n"))
    assert (
        main(["chat", str(chat_pkg_session), str(img), "--max-new-tokens", "4", "--min-new-tokens", "4"]) == 0
    )
    captured = capsys.readouterr()
    assert "dropped the oldest turn" in captured.err
    assert captured.out.count("model> ") == len(questions) and "error:" not in captured.out


def test_bench_runs_on_built_llm_packages_at_any_batch(
    chat_pkg_session: Path, capsys: pytest.CaptureFixture
) -> None:
    r = _out(capsys, ["bench", str(chat_pkg_session), "--batch", "1,8", "--runs", "2", "--json"])
    assert "llm" not in r["components"] and {"vision", "qformer", "projector", "embed"} <= set(
        r["components"]
    )
    assert r["generation"]["decode_tokens_per_s"] > 0


def test_a_corrupt_image_in_a_folder_is_named_and_can_be_skipped(
    tiny_pkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from PIL import Image

    from mmedge.data import generate_scenes

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, s in enumerate(generate_scenes(3, seed=4)):
        Image.fromarray(s.image).save(folder / f"{i}.png")
    Image.fromarray(generate_scenes(1, seed=5)[0].image).save(folder / "anim.gif")  # GIFs count in folders
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    idx = str(tmp_path / "idx")
    assert main(["search", str(tiny_pkg), "--add", str(folder), "--index", idx]) == 1
    assert "broken.png" in capsys.readouterr().err
    r = _out(capsys, ["search", str(tiny_pkg), "--add", str(folder), "--index", idx, "--skip-bad", "--json"])
    assert (
        r["added"] == 4 and len(r["skipped_unreadable"]) == 1 and "broken.png" in r["skipped_unreadable"][0]
    )


def test_people_get_tables_and_machines_get_json(
    tiny_pkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import cv2

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.zeros((32, 32, 3), np.uint8))
    assert main(["classify", str(tiny_pkg), str(img), "--labels", "circle,square"]) == 0
    text = capsys.readouterr().out
    assert "label" in text and "probability" in text and "{" not in text
    assert main(["bench", str(tiny_pkg), "--batch", "1", "--runs", "2", "--components", "vision"]) == 0
    text = capsys.readouterr().out
    assert "p50 ms" in text and "vision" in text and "{" not in text
    assert main(["calibrate", str(tiny_pkg), "--samples", "4", "--data", "train-shapes:6"]) == 0
    text = capsys.readouterr().out
    assert "accuracy vs fp32" in text and "rel. error vs source" in text


def test_python_api_checks_up_front_and_describes_itself(tiny_pkg: Path, chat_pkg_session: Path) -> None:
    from mmedge import sdk
    from mmedge.errors import InvalidInputError, UnsupportedError

    with pytest.raises(UnsupportedError, match="device 'banana' is not supported"):
        sdk.Pipeline(str(tiny_pkg), device="banana")
    p = sdk.Pipeline(str(tiny_pkg))
    assert "RetrievalPipeline('clip-tiny', family='clip'" in repr(p)
    with pytest.raises(InvalidInputError, match="single string"):
        p.classify(np.zeros((32, 32, 3), np.uint8), "circle,square")
    chat = sdk.Pipeline(str(chat_pkg_session))
    assert repr(chat).startswith("ChatPipeline('blip2-tiny'")
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(InvalidInputError, match="non-empty"):
        chat.chat(image, "  ")
    pieces = list(chat.caption(image, stream=True, max_new_tokens=3, min_new_tokens=3))
    assert "".join(pieces) == chat.caption(image, max_new_tokens=3, min_new_tokens=3)


def test_zero_shot_checks_report_how_short_texts_are_read(tiny_pkg: Path) -> None:
    from mmedge import sdk
    from mmedge.evaluation import evaluate_zero_shot

    r = evaluate_zero_shot(sdk.Pipeline(str(tiny_pkg), precision="fp32"), n=20)
    assert r["shape_scenes"] == 20 and 0.0 <= r["shape_accuracy"] <= 1.0
    assert 0 < r["short_queries"] <= 24 and 0.0 <= r["short_query_r1"] <= 1.0


def test_verbose_calibrate_says_each_step_once(
    tiny_pkg: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    argv = ["calibrate", str(tiny_pkg), "--data", "train-shapes:8", "--samples", "8", "--no-build", "-v"]
    assert main(argv) == 0
    printed = {line.strip() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert any(line.startswith("done:") for line in printed)
    assert not printed & {r.getMessage().strip() for r in caplog.records}


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_a_missing_backend_library_is_named_before_the_package_is_touched(
    tiny_pkg: Path, capsys: pytest.CaptureFixture
) -> None:
    before = (tiny_pkg / "manifest.json").read_bytes()
    assert main(["build", str(tiny_pkg), "--backend", "tensorrt"]) == 1
    captured = capsys.readouterr()
    assert "pip install 'mmedge[trt]'" in captured.err and "in place" not in captured.out
    assert (tiny_pkg / "manifest.json").read_bytes() == before
