"""Bad-input battery rows: packages and manifests, ONNX files and their external data, checkpoints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from battery_helpers import (
    _append,
    _ckpt_config,
    _ckpt_tensors,
    _edit_manifest,
    _external,
    _flip_last_byte,
    _GetPid,
    _hf_dir_with_pickle,
    _load_ckpt,
    _load_weights,
    _open,
    _relist,
    _replace_with_symlink,
    _rewrite_onnx,
    _set_opset,
    _torch_save,
    _truncate,
    _verify,
    _write,
    _zeros,
    case,
)

from mmedge.errors import ConfigError, IntegrityError, UnsupportedError

FILE_CASES = [
    # --- package and manifest: verified on load, before any runtime sees a file ---------------------
    case(
        "manifest-unknown-key",
        IntegrityError,
        r"manifest: unknown keys \['surprise'\]",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r.update(surprise=1))),
    ),
    case(
        "manifest-schema-1-says-re-export",
        IntegrityError,
        r"schema 'mmedge.package/1' is not supported.*re-export",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r.update(schema="mmedge.package/1"))),
    ),
    case(
        "manifest-unknown-role",
        IntegrityError,
        r"role 'time_machine' is not one this runtime knows",
        lambda e: _open(
            _edit_manifest(e.pkg(), lambda r: r["components"]["vision"].update(role="time_machine"))
        ),
    ),
    case(
        "manifest-path-names-a-missing-component",
        IntegrityError,
        r"pipeline.paths.image.steps\[0\] names component 'ghost'",
        lambda e: _open(
            _edit_manifest(
                e.pkg(), lambda r: r["pipeline"]["paths"]["image"]["steps"][0].update(component="ghost")
            )
        ),
    ),
    case(
        "manifest-path-reads-an-unproduced-value",
        IntegrityError,
        r"reads values \['elsewhere'\] that no earlier step produces",
        lambda e: _open(
            _edit_manifest(
                e.pkg(),
                lambda r: r["pipeline"]["paths"]["image"]["steps"][0].update(
                    inputs={"pixel_values": "elsewhere"}
                ),
            )
        ),
    ),
    case(
        "manifest-path-runs-a-component-of-another-role",
        IntegrityError,
        r"a 'text_encoder' component does not run on the 'image' path",
        lambda e: _open(
            _edit_manifest(
                e.pkg(),
                lambda r: r["pipeline"]["paths"]["image"]["steps"][0].update(
                    component="text",
                    inputs={"input_ids": "pixel_values", "attention_mask": "pixel_values"},
                    outputs={"text_embeds": "image_embeds"},
                ),
            )
        ),
    ),
    case(
        "manifest-task-section-missing",
        IntegrityError,
        r"a retrieval package needs a 'retrieval' section",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r.update(retrieval=None))),
    ),
    case(
        "manifest-section-wrong-type",
        IntegrityError,
        r"manifest.retrieval.logit_scale: expected a finite number",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r["retrieval"].update(logit_scale="100"))),
    ),
    case(
        "manifest-unknown-image-token-rule",
        IntegrityError,
        r"image_tokens.rule: 'grid' is not one of \['fixed', 'anyres'\]",
        lambda e: _open(
            _edit_manifest(e.pkg(), lambda r: r["pipeline"].update(image_tokens={"rule": "grid", "count": 4}))
        ),
    ),
    case(
        "manifest-unknown-nested-key",
        IntegrityError,
        r"inputs\[0\]: unknown keys \['layout'\]",
        lambda e: _open(
            _edit_manifest(e.pkg(), lambda r: r["components"]["vision"]["inputs"][0].update(layout="NCHW"))
        ),
    ),
    case(
        "manifest-wrong-type-size",
        IntegrityError,
        r"files\.tokenizer\.json\.size: expected .*int.*got str",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r["files"]["tokenizer.json"].update(size="3421"))),
    ),
    case(
        "manifest-wrong-type-dim",
        IntegrityError,
        r"dims\.batch\.max: expected .*int.*got str",
        lambda e: _open(
            _edit_manifest(e.pkg(), lambda r: r["components"]["vision"]["dims"]["batch"].update(max="64"))
        ),
    ),
    case(
        "manifest-not-json",
        IntegrityError,
        "manifest is not valid JSON",
        lambda e: (e.pkg().joinpath("manifest.json").write_text("{not json"), _open(e.pkg())),
    ),
    case(
        "manifest-over-4MiB",
        IntegrityError,
        r"manifest is \d+ bytes; the limit is 4194304",
        lambda e: (
            e.pkg().joinpath("manifest.json").write_bytes(b" " * (4 * 1024 * 1024 + 1)),
            _open(e.pkg()),
        ),
    ),
    case(
        "manifest-unknown-schema",
        IntegrityError,
        r"schema 'mmedge.package/3' is not supported",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r.update(schema="mmedge.package/3"))),
    ),
    case(
        "manifest-is-symlink",
        IntegrityError,
        r"has no manifest\.json \(or it is not a regular file\)",
        lambda e: _open(_replace_with_symlink(e, "manifest.json")),
    ),
    case(
        "pkg-listed-file-missing",
        IntegrityError,
        r"package file 'reports/parity\.json' is missing",
        lambda e: (e.pkg().joinpath("reports/parity.json").unlink(), _open(e.pkg())),
    ),
    case(
        "pkg-unlisted-file-referenced",
        IntegrityError,
        r"names 'onnx/extra\.onnx' but does not list its hash",
        lambda e: (
            shutil.copy(e.pkg() / "onnx/vision.onnx", e.pkg() / "onnx/extra.onnx"),
            _open(
                _edit_manifest(
                    e.pkg(),
                    lambda r: r["components"]["vision"]["precisions"]["fp32"].update(file="onnx/extra.onnx"),
                )
            ),
        ),
    ),
    case(
        "pkg-sha256-mismatch",
        IntegrityError,
        r"onnx/text\.onnx: sha256 differs from the manifest",
        lambda e: (_flip_last_byte(e.pkg() / "onnx/text.onnx"), _open(e.pkg())),
    ),
    case(
        "pkg-size-mismatch",
        IntegrityError,
        r"tokenizer\.json: size \d+ differs from the manifest's \d+",
        lambda e: (_append(e.pkg() / "tokenizer.json", b" "), _open(e.pkg())),
    ),
    case(
        "pkg-path-traversal",
        IntegrityError,
        r"'\.\./outside\.bin' must be relative and stay inside the package",
        lambda e: _open(
            _edit_manifest(
                e.pkg(), lambda r: r["files"].update({"../outside.bin": {"sha256": "0" * 64, "size": 1}})
            )
        ),
    ),
    case(
        "pkg-absolute-path",
        IntegrityError,
        r"tokenizer\.file '/etc/passwd' must be relative",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r["tokenizer"].update(file="/etc/passwd"))),
    ),
    case(
        "pkg-backslash-path",
        IntegrityError,
        r"'onnx\\\\text\.onnx' is not a relative POSIX path",
        lambda e: _open(
            _edit_manifest(
                e.pkg(), lambda r: r["files"].update({"onnx\\text.onnx": r["files"].pop("onnx/text.onnx")})
            )
        ),
    ),
    case(
        "pkg-symlinked-file",
        IntegrityError,
        r"'tokenizer\.json' goes through a symlink; symlinks are refused",
        lambda e: _open(_replace_with_symlink(e, "tokenizer.json")),
    ),
    case(
        "pkg-symlinked-directory",
        IntegrityError,
        r"'onnx/text\.onnx' goes through a symlink",
        lambda e: _open(_replace_with_symlink(e, "onnx")),
    ),
    case(
        "pkg-hard-link",
        IntegrityError,
        r"'tokenizer\.json' has 2 hard links; hard links are refused",
        lambda e: (os.link(e.pkg() / "tokenizer.json", e.tmp / "alias.json"), _open(e.pkg())),
    ),
    case(
        "pkg-fifo-instead-of-file",
        IntegrityError,
        r"'reports/trt_lint\.json' is not a regular file",
        lambda e: (
            e.pkg().joinpath("reports/trt_lint.json").unlink(),
            os.mkfifo(e.pkg() / "reports/trt_lint.json"),
            _open(e.pkg()),
        ),
    ),
    case(
        "pkg-tokenizer-json-corrupt",
        IntegrityError,
        "cannot parse tokenizer JSON",
        lambda e: (
            e.pkg().joinpath("tokenizer.json").write_text('{"model": 42}'),
            _open(_relist(e.pkg(), "tokenizer.json")).embed_texts(["a red circle"]),
        ),
        native=True,
    ),
    # --- ONNX files: parsed (never executed) during verification -----------------------------------
    case(
        "onnx-not-protobuf",
        IntegrityError,
        r"onnx/text\.onnx: not a readable ONNX model",
        lambda e: (
            e.pkg().joinpath("onnx/text.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + bytes(range(64))),
            _open(_relist(e.pkg(), "onnx/text.onnx")),
        ),
        native=True,
    ),
    case(
        "onnx-opset-newer-than-runtime",
        UnsupportedError,
        r"opset 99 is newer than this runtime supports",
        lambda e: _open(_rewrite_onnx(e.pkg(), "onnx/vision.onnx", lambda m: _set_opset(m, 99))),
        native=True,
    ),
    case(
        "onnx-ir-version-too-new",
        UnsupportedError,
        r"IR version \d+ is newer than supported",
        lambda e: _open(_rewrite_onnx(e.pkg(), "onnx/vision.onnx", lambda m: setattr(m, "ir_version", 99))),
        native=True,
    ),
    # --- ONNX external data: every reference must stay inside a listed file -----------------------
    case(
        "ext-location-parent-dir",
        IntegrityError,
        r"external data location '\.\./tokenizer\.json' must be relative",
        lambda e: _verify(_external(e, location="../tokenizer.json")),
    ),
    case(
        "ext-location-absolute",
        IntegrityError,
        r"external data location '/etc/passwd' must be relative",
        lambda e: _verify(_external(e, location="/etc/passwd")),
    ),
    case(
        "ext-location-unlisted",
        IntegrityError,
        r"external data file 'onnx/secret\.bin' is not listed",
        lambda e: (
            e.pkg().joinpath("onnx/secret.bin").write_bytes(b"\0" * 64),
            _verify(_external(e, location="secret.bin")),
        ),
    ),
    case(
        "ext-location-symlink",
        IntegrityError,
        r"'onnx/ext\.bin' goes through a symlink",
        lambda e: _verify(_external(e, symlink=True)),
    ),
    case(
        "ext-offset-past-end",
        IntegrityError,
        r"external data of 'w' points outside 'onnx/ext\.bin'",
        lambda e: _verify(_external(e, offset="64", length="64")),
    ),
    case(
        "ext-length-past-end",
        IntegrityError,
        r"external data of 'w' points outside",
        lambda e: _verify(_external(e, length=str(10**12))),
    ),
    case(
        "ext-negative-offset",
        IntegrityError,
        r"external data of 'w' points outside",
        lambda e: _verify(_external(e, offset="-8")),
    ),
    case(
        "ext-offset-not-integer",
        IntegrityError,
        r"offset/length of 'w' are not integers",
        lambda e: _verify(_external(e, offset="0x10")),
    ),
    case(
        "ext-unknown-key",
        IntegrityError,
        r"external data of 'w' has unknown keys \['basepath'\]",
        lambda e: _verify(_external(e, extra={"basepath": "/"})),
    ),
    case(
        "ext-in-node-attribute",
        IntegrityError,
        r"external data location '\.\./\.\./x' must be relative",
        lambda e: _verify(_external(e, location="../../x", in_attribute=True)),
    ),
    # --- checkpoints: safetensors only unless opted in; weights must fit the family config --------
    case(
        "ckpt-pickle-bin-refused",
        UnsupportedError,
        r"pytorch_model\.bin is a pickle-based checkpoint.*allow_pickle",
        lambda e: _load_ckpt(_hf_dir_with_pickle(e)),
    ),
    case(
        "ckpt-pickle-pt-refused",
        UnsupportedError,
        r"w\.pt is a pickle-based checkpoint, which can run code",
        lambda e: _load_weights(_torch_save(e, "w.pt", {"w": _zeros()})),
    ),
    case(
        "ckpt-pickle-payload-with-opt-in",
        IntegrityError,
        r"refused by the weights-only loader",
        lambda e: _load_weights(_torch_save(e, "evil.pt", {"w": _GetPid()}), allow_pickle=True),
    ),
    case(
        "ckpt-unknown-weights-format",
        UnsupportedError,
        r"unknown weights format; accepted: \.safetensors",
        lambda e: _load_weights(Path(_write(e, "w.npz", b"PK\x03\x04"))),
    ),
    case(
        "ckpt-tensor-wrong-name",
        ConfigError,
        r"missing \['logit_scale'\], unexpected \['logit_scal'\]",
        lambda e: _load_ckpt(_ckpt_tensors(e, lambda t: t.__setitem__("logit_scal", t.pop("logit_scale")))),
    ),
    case(
        "ckpt-tensor-wrong-shape",
        ConfigError,
        r"token_embedding\.weight has shape \(116, 96\), the config needs \(115, 96\)",
        lambda e: _load_ckpt(
            _ckpt_tensors(
                e, lambda t: t.__setitem__("text_model.embeddings.token_embedding.weight", _zeros(116, 96))
            )
        ),
    ),
    case(
        "ckpt-tensor-wrong-dtype",
        ConfigError,
        r"logit_scale has dtype torch\.int64; floating point expected",
        lambda e: _load_ckpt(_ckpt_tensors(e, lambda t: t.__setitem__("logit_scale", _zeros(dtype="int64")))),
    ),
    case(
        "ckpt-safetensors-truncated",
        IntegrityError,
        r"model\.safetensors: not a readable safetensors file",
        lambda e: (_truncate(e.ckpt() / "model.safetensors"), _load_ckpt(e.ckpt())),
        native=True,
    ),
    case(
        "ckpt-safetensors-header-2^60",
        IntegrityError,
        r"not a readable safetensors file .*header too large",
        lambda e: (
            e.ckpt().joinpath("model.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}"),
            _load_ckpt(e.ckpt()),
        ),
        native=True,
    ),
    case(
        "ckpt-config-not-object",
        ConfigError,
        r"config\.json must hold a JSON object",
        lambda e: (e.ckpt().joinpath("config.json").write_text("[1, 2]"), _load_ckpt(e.ckpt())),
    ),
    case(
        "ckpt-config-not-json",
        ConfigError,
        r"config\.json is not valid JSON",
        lambda e: (e.ckpt().joinpath("config.json").write_text("{family: clip"), _load_ckpt(e.ckpt())),
    ),
    case(
        "ckpt-config-wrong-format",
        ConfigError,
        r"is not an mmedge checkpoint",
        lambda e: _load_ckpt(_ckpt_config(e, lambda m: m.pop("format"))),
    ),
    case(
        "ckpt-unknown-family",
        ConfigError,
        r"unknown family 'bogus'; known: \[.*'clip'",
        lambda e: _load_ckpt(_ckpt_config(e, lambda m: m.update(family="bogus"))),
    ),
    case(
        "ckpt-config-unknown-key",
        ConfigError,
        r"clip config 'vision': unknown keys \['dropout'\]",
        lambda e: _load_ckpt(_ckpt_config(e, lambda m: m["config"]["vision"].update(dropout=0.1))),
    ),
    case(
        "ckpt-config-wrong-type",
        ConfigError,
        r"width.*big",
        run=lambda e: _load_ckpt(_ckpt_config(e, lambda m: m["config"]["vision"].update(width="big"))),
    ),
    case(
        "ckpt-config-negative-layers",
        ConfigError,
        r"layers.*-1",
        run=lambda e: _load_ckpt(_ckpt_config(e, lambda m: m["config"]["vision"].update(layers=-1))),
    ),
    case(
        "ckpt-not-a-directory",
        ConfigError,
        r"is not a directory; expected an mmedge checkpoint",
        lambda e: _load_ckpt(e.tmp / "no-such-ckpt"),
    ),
]
