"""`mmedge export`: checkpoint or HF directory -> a verified model package, written atomically."""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mmedge.errors import IntegrityError
from mmedge.export.onnx_export import DEFAULT_OPSET, example_inputs, export_component
from mmedge.export.package_writer import write_manifest
from mmedge.export.parity import measure_parity
from mmedge.runtime.manifest import ComponentEntry, Manifest, PrecisionEntry
from mmedge.runtime.package import verify_package
from mmedge.runtime.staging import staged_dir, write_atomic

log = logging.getLogger(__name__)
TOKENIZER_FILE = "tokenizer.json"


def _versions(opset: int) -> dict[str, str | int]:
    import onnx
    import torch

    import mmedge

    return {
        "mmedge": mmedge.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "opset": opset,
    }


def _parity_feeds(decl, tokenizer_json: str, context_length: int) -> list[dict[str, np.ndarray]]:
    """Random feeds, plus real tokenised text with padding for text components."""
    feeds = [example_inputs(decl, sizes={"batch": 2}, seed=i) for i in range(2)]
    if {s.name for s in decl.inputs} == {"input_ids", "attention_mask"}:
        from mmedge.runtime.texts import TextTokenizer

        tok = TextTokenizer.from_json(tokenizer_json, context_length=context_length)
        ids, mask = tok.encode_batch(["a red circle", "a large blue square at the top left and a small star"])
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def export_model(
    src: str | Path,
    out: str | Path,
    family: str | None = None,
    opset: int = DEFAULT_OPSET,
    allow_pickle: bool = False,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Export every component of a model into a package at `out` (replacing it atomically)."""
    from mmedge.export.trt_lint import lint_model
    from mmedge.models.sources import load_source

    say = progress or log.info
    lm = load_source(src, family, allow_pickle)
    out = Path(out)
    tok_cfg = lm.family.tokenizer(lm.config)
    components, reports = {}, {"parity": {}, "trt_lint": {}}
    with staged_dir(out) as tmp:
        (tmp / "onnx").mkdir()
        (tmp / "reports").mkdir()
        for decl in lm.family.components(lm.config):
            say(f"export {decl.name}")
            path = tmp / "onnx" / f"{decl.name}.onnx"
            export_component(lm.model, decl, path, opset)
            parity = measure_parity(
                lm.model, decl, path, _parity_feeds(decl, lm.tokenizer_json, tok_cfg["context_length"])
            )
            if not parity["passed"]:
                raise IntegrityError(
                    f"{decl.name}: ONNX output differs from PyTorch beyond tolerance: {parity}"
                )
            lint = lint_model(path)
            parity["trt_lint_ok"] = lint.ok
            reports["parity"][decl.name] = parity
            reports["trt_lint"][decl.name] = lint.to_dict()
            say(
                f"  parity max|err|={parity['max_abs_err']:.2e} cosine={parity['cosine']:.6f} trt-lint={'ok' if lint.ok else 'FAIL'}"
            )
            components[decl.name] = ComponentEntry(
                inputs=decl.inputs,
                outputs=decl.outputs,
                dims=decl.dims,
                precisions={"fp32": PrecisionEntry(file=f"onnx/{decl.name}.onnx", parity=parity)},
                calibration_data=decl.calibration_data,
            )
        write_atomic(tmp / TOKENIZER_FILE, lm.tokenizer_json)
        for key, rep in reports.items():
            write_atomic(tmp / "reports" / f"{key}.json", json.dumps(rep, indent=2, sort_keys=True))
        manifest = Manifest(
            name=name or out.name,
            family=lm.family.name,
            task=lm.family.task,
            provenance={
                **_versions(opset),
                "source": lm.source,
                "config": lm.config.to_dict(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
            preprocess=lm.preprocess,
            tokenizer={"file": TOKENIZER_FILE, **tok_cfg},
            generation=lm.family.generation(lm.config),
            files={},
            components=components,
        )
        manifest = write_manifest(tmp, manifest)
        verify_package(tmp)
    say(f"wrote {out}")
    return manifest
