"""`mmedge export`: checkpoint or HF directory -> a verified model package, written atomically.

Every declared component is exported and measured against PyTorch; the manifest is assembled from
the family's declarations: roles, the paths that chain components (built here from declaration
order and tensor names), and the family's typed sections.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmedge.errors import ConfigError, IntegrityError, InvalidInputError
from mmedge.export.onnx_export import DEFAULT_OPSET, example_inputs, export_component
from mmedge.export.package_writer import write_manifest
from mmedge.export.parity import measure_parity
from mmedge.models.component import ComponentDecl, decl_paths, reads_instruction
from mmedge.models.sources import LoadedModel
from mmedge.runtime.manifest import (
    MANIFEST_NAME,
    ComponentEntry,
    Manifest,
    PrecisionEntry,
    Provenance,
    check_name,
    check_relpath,
)
from mmedge.runtime.package import verify_package
from mmedge.runtime.sections import (
    INSTRUCTION_SOURCES,
    PATH_SOURCES,
    ROLES,
    PipelineConfig,
    Step,
    TokenizerConfig,
    role_paths,
)
from mmedge.runtime.sections import Path as WiredPath
from mmedge.runtime.staging import check_replaceable, staged_dir, write_atomic

if TYPE_CHECKING:
    from mmedge.models.registry import Sections
    from mmedge.models.sources import LoadedModel

log = logging.getLogger(__name__)
TOKENIZER_FILE = "tokenizer.json"
INSTRUCTION_TOKENIZER_FILE = "instruction_tokenizer.json"
_PARITY_TEXTS = ["a red circle", "a large blue square at the top left and a small star"]


def _versions() -> dict[str, str]:
    import onnx
    import torch

    import mmedge

    return {"mmedge": mmedge.__version__, "torch": torch.__version__, "onnx": onnx.__version__}


def _parity_feeds(decl: ComponentDecl, lm: LoadedModel, sections: Sections) -> list[dict[str, np.ndarray]]:
    """Random feeds, plus real tokenised text with padding for components that read text (the
    other inputs of the first random feed, which has as many rows) or the image path's instruction."""
    from mmedge.runtime.texts import TextTokenizer

    feeds = [example_inputs(decl, sizes={"batch": 2}, seed=i) for i in range(2)]
    names = {s.name for s in decl.inputs}
    if set(PATH_SOURCES["text"]) <= names:  # a text encoder, or text beside other inputs (ITM)
        tok = TextTokenizer.from_json(lm.tokenizer_json, sections.context_length, sections.pad_id)
        ids, mask = tok.encode_batch(_PARITY_TEXTS)
        feeds.append({**feeds[0], "input_ids": ids, "attention_mask": mask})
    if set(INSTRUCTION_SOURCES) <= names and lm.instruction_tokenizer_json is not None:
        tok = TextTokenizer.from_json(
            lm.instruction_tokenizer_json,
            sections.instruction_context_length or 0,
            sections.instruction_pad_id,
        )
        ids, mask = tok.encode_batch(_PARITY_TEXTS)
        feeds.append({**feeds[0], INSTRUCTION_SOURCES[0]: ids, INSTRUCTION_SOURCES[1]: mask})
    return feeds


def _instruction_tokenizer(lm: LoadedModel, decls: Sequence[ComponentDecl], sections: Sections) -> str | None:
    """The instruction tokenizer's JSON where a component reads the instruction (else None)."""
    if not reads_instruction(tuple(decls)):
        return None
    if lm.instruction_tokenizer_json is None or sections.instruction_context_length is None:
        raise ConfigError(
            f"{lm.family.name}: a component reads an instruction ({list(INSTRUCTION_SOURCES)}), but the "
            "source has no instruction tokenizer or the family declares no instruction context length"
        )
    return lm.instruction_tokenizer_json


def wire_paths(decls: Sequence[ComponentDecl]) -> dict[str, WiredPath]:
    """The pipeline's paths: components of each path in declaration order, every input bound to
    the path source or earlier output of the same tensor name; the path yields the last output."""
    paths: dict[str, WiredPath] = {}
    for name, sources in PATH_SOURCES.items():
        members = [d for d in decls if name in decl_paths(d)]
        if not members:
            continue
        values, steps = set(sources), []
        for d in members:
            missing = [s.name for s in d.inputs if s.name not in values]
            if missing:
                raise ConfigError(
                    f"component {d.name!r} on the {name!r} path reads {missing}, which neither the path's "
                    f"sources {list(sources)} nor an earlier component on it produce"
                )
            steps.append(
                Step(d.name, {s.name: s.name for s in d.inputs}, {s.name: s.name for s in d.outputs})
            )
            values |= {s.name for s in d.outputs}
        paths[name] = WiredPath(tuple(steps), members[-1].outputs[0].name)
    return paths


def export_model(
    src: str | Path,
    out: str | Path,
    family: str | None = None,
    opset: int = DEFAULT_OPSET,
    allow_pickle: bool = False,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    max_context: int | None = None,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> Manifest:
    """Export every component of a model into a package at `out` (replacing an older package there
    atomically; a folder holding anything else is refused unless `force`). `max_context`: the KV
    cache slots of an LM imported from an HF directory (default: the family's choice). `src` may
    also be a weights file in a family's official layout, with `config` and `tokenizer`
    (`models.sources.load_official`)."""
    from mmedge.models.sources import load_source

    check_target(out, name, force)  # refuse a bad --out or name before loading a large model
    lm = load_source(src, family, allow_pickle, max_context, config=config, tokenizer=tokenizer)
    return export_loaded(lm, out, opset, name, progress, force)


def check_target(out: str | Path, name: str | None, force: bool) -> tuple[Path, str]:
    """The package folder (one that may be replaced) and the package's name."""
    path = check_replaceable(out, lambda p: (p / MANIFEST_NAME).is_file(), "package", force)
    try:
        return path, check_name(
            name or path.resolve().name, "package name (--name, or the --out folder's name)"
        )
    except IntegrityError as exc:
        raise InvalidInputError(f"{exc}; names use letters, digits and _ . : - /") from None


def export_loaded(
    lm: LoadedModel,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> Manifest:
    """`export_model` of a model already in memory (e.g. assembled from released parts)."""
    from mmedge.export.trt_lint import lint_model

    say = progress or log.info
    out, name = check_target(out, name, force)
    decls = lm.family.components(lm.config)
    for d in decls:
        if d.role not in ROLES:
            raise ConfigError(f"component {d.name!r} declares role {d.role!r}; known roles: {sorted(ROLES)}")
        if not set(d.paths) <= set(role_paths(d.role)):
            raise ConfigError(
                f"component {d.name!r} names paths {list(d.paths)}; a {d.role!r} runs on {list(role_paths(d.role))}"
            )
    sections = lm.family.sections(lm.config, lm.model, lm.tokenizer_json)
    instruction_json = _instruction_tokenizer(lm, decls, sections)
    components, reports = {}, {"parity": {}, "trt_lint": {}}
    with staged_dir(out) as tmp:
        (tmp / "onnx").mkdir()
        (tmp / "reports").mkdir()
        for decl in decls:
            say(f"export {decl.name} ({decl.role})")
            path = tmp / "onnx" / f"{decl.name}.onnx"
            export_component(lm.model, decl, path, opset)
            feeds = _parity_feeds(decl, lm, sections)
            parity = measure_parity(lm.model, decl, path, feeds)
            if not parity["passed"]:
                raise IntegrityError(
                    f"{decl.name}: ONNX output differs from PyTorch beyond tolerance: {parity}"
                )
            lint = lint_model(path)
            parity["trt_lint_ok"] = lint.ok
            reports["parity"][decl.name] = parity
            reports["trt_lint"][decl.name] = lint.to_dict()
            say(
                f"  parity max|err|={parity['max_abs_err']:.2e} cosine={parity['cosine']:.6f} "
                f"trt-lint={'ok' if lint.ok else 'FAIL'}"
            )
            components[decl.name] = ComponentEntry(
                role=decl.role,
                inputs=decl.inputs,
                outputs=decl.outputs,
                dims=decl.dims,
                precisions={"fp32": PrecisionEntry(file=f"onnx/{decl.name}.onnx", parity=parity)},
                calibration_data=decl.calibration_data,
                int_ranges=decl.int_ranges,
            )
        write_atomic(tmp / TOKENIZER_FILE, lm.tokenizer_json)
        for rel, data in sections.files.items():
            write_atomic(tmp / check_relpath(rel, "family file"), data)
        instruction_tokenizer = None
        if instruction_json is not None and sections.instruction_context_length is not None:
            write_atomic(tmp / INSTRUCTION_TOKENIZER_FILE, instruction_json)
            instruction_tokenizer = TokenizerConfig(
                INSTRUCTION_TOKENIZER_FILE, sections.instruction_context_length, sections.instruction_pad_id
            )
        for key, rep in reports.items():
            write_atomic(tmp / "reports" / f"{key}.json", json.dumps(rep, indent=2, sort_keys=True))
        manifest = Manifest(
            name=name,
            family=lm.family.name,
            variant=lm.variant,
            task=lm.family.task_for(lm.config),  # type: ignore[arg-type]  # checked: one of TASKS
            provenance=Provenance(
                **_versions(),
                opset=opset,
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                source=lm.source,
                config=lm.config.to_dict(),
            ),
            files={},
            components=components,
            pipeline=PipelineConfig(paths=wire_paths(decls), image_tokens=sections.image_tokens),
            preprocess=lm.preprocess,
            tokenizer=TokenizerConfig(TOKENIZER_FILE, sections.context_length, sections.pad_id),
            instruction_tokenizer=instruction_tokenizer,
            llm=sections.llm,
            prompt=sections.prompt,
            retrieval=sections.retrieval,
            modalities=sections.modalities,
            classification=sections.classification,
            chat_template=sections.chat_template,
            diffusion=sections.diffusion,
        )
        manifest = write_manifest(tmp, manifest)
        verify_package(tmp)
    say(f"wrote {out}")
    return manifest
