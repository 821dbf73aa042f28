"""The supported-families table (README, `mmedge families`), generated from the registry."""

from __future__ import annotations

from collections.abc import Iterable

from mmedge.models.registry import Family, families


def _precisions(family: Family) -> str:
    decls = family.components(family.config_from_dict({}))
    out = ["fp32"]
    if any(d.calibration_data == "shared" for d in decls):  # Meta-Transformer
        out.append("int8 (tokenizers and heads; the shared encoder calibrated once on every path)")
    elif any(d.calibration_data == "denoising" for d in decls):  # Stable Diffusion
        out.append("int8 (the U-Net and VAE decoder calibrated along denoising trajectories)")
    elif any(d.calibration_data != "none" for d in decls):  # calibrated on data of their path
        out.append("int8 (encoders)")
    if any(d.role == "llm_step" for d in decls):
        out.append("int4 / int8 weight-only (LLM)")
    if any(d.role == "itm" for d in decls):
        out.append("int4 / int8 weight-only (ITM)")
    return ", ".join(out)


def _tasks(family: Family) -> str:
    """The family's task, or per task its variants where they differ (`Family.task_of`, whose
    family's configs take a "variant" key)."""
    if family.task_of is None:
        return family.task
    by_task: dict[str, list[str]] = {}
    for v in family.variants:
        by_task.setdefault(family.task_for(family.config_from_dict({"variant": v})), []).append(v)
    return ", ".join(f"{task} ({', '.join(vs)})" for task, vs in by_task.items())


def family_row(family: Family) -> tuple[str, ...]:
    """(family, variants, HF model_type, components, task, precisions) of one family; components are
    those of the family's default config, each with its role."""
    decls = family.components(family.config_from_dict({}))
    hf = ", ".join(f"`{t}`" for t in family.hf.model_types) if family.hf else "—"
    if family.diffusers is not None:  # diffusers directories name a pipeline class, not a model_type
        hf = ", ".join(f"diffusers `{p}`" for p in family.diffusers.pipelines)
    return (
        f"`{family.name}`",
        ", ".join(family.variants),
        hf,
        ", ".join(f"{d.name} ({d.role})" for d in decls),
        _tasks(family),
        _precisions(family),
    )


def families_table(selected: Iterable[Family] | None = None) -> str:
    """A Markdown table of the registered families (or of `selected`)."""
    rows = [family_row(f) for f in (selected if selected is not None else families().values())]
    head = ("family", "variants", "HF `model_type`", "components (role)", "task", "precisions")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
