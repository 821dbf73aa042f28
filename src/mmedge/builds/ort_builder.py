"""The ORT builder: ORT-optimized graphs (fusions, integer GEMMs) for this ONNX Runtime version.

Every component and precision gets `builds.ort.optimize_for_ort`; an `llm_step` component also gets
its attention replaced by GroupQueryAttention over an in-place cache (`builds.ort_decoder`), and a
weight-only one a prefill build with int8 GEMMs for prompts (`builds.ort_prefill`). A weight-only
`cross_kv` (the cross-attention keys/values of every encoder row, once per image) runs on the same
int8 GEMMs in place of its weight-only matmuls: it is a prompt-sized product every time. Each build
is checked against its source before it is recorded (`builds.checks`).
"""

from __future__ import annotations

from typing import Any

from mmedge.builds.base import BuildRequest, BuildResult, precisions_to_build
from mmedge.builds.checks import (
    BUILD_MAX_REL_ERROR,
    IN_PLACE_QUANTIZED_MAX_REL_ERROR,
    LOOSE_BUILD_LIMITS,
    PREFILL_MAX_REL_ERROR,
    check_build,
    check_decoder_build,
)


class OrtBuilder:
    name = "ort"

    def build(self, request: BuildRequest) -> BuildResult:
        import onnxruntime as ort

        from mmedge.builds.ort import MATMULNBITS_ACCURACY_LEVEL, optimize_for_ort
        from mmedge.builds.ort_prefill import integer_gemms_in_place, write_prefill_build
        from mmedge.runtime.backends.ort import ort_target
        from mmedge.runtime.generation import PREFILL

        pkg, tmp, say, threads = request.package, request.staging, request.say, request.threads
        prefill = request.options.get("prefill", True)
        target = ort_target("cpu")
        settings = {
            "level": "extended",
            "uint8_activations": "x86 only",
            "matmulnbits_accuracy_level": MATMULNBITS_ACCURACY_LEVEL,
            "kv_cache": "in-place where the LLM step matches (present.* = the whole cache)",
        }
        files: dict[str, str] = {}
        report: dict[str, Any] = {}
        llm = pkg.manifest.llm
        for name, entry in pkg.manifest.components.items():
            decoder = llm if entry.role == "llm_step" else None
            for p in precisions_to_build(entry, request.precision):
                rel = f"builds/{target}/{name}.{p}.onnx"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                src = tmp / entry.precisions[p].file
                ops = optimize_for_ort(src, tmp / rel, threads=threads, decoder=decoder)
                in_place = bool(ops.get("com.microsoft:GroupQueryAttention")) and decoder is not None
                if in_place:
                    limit = BUILD_MAX_REL_ERROR if p == "fp32" else IN_PLACE_QUANTIZED_MAX_REL_ERROR
                    err = check_decoder_build(src, tmp / rel, entry, decoder, threads, limit)
                elif entry.role == "cross_kv" and ops.get("com.microsoft:MatMulNBits") and prefill:
                    gemms = integer_gemms_in_place(tmp / rel)
                    ops["com.microsoft:DynamicQuantizeMatMul"] = gemms
                    ops["com.microsoft:MatMulNBits"] -= gemms
                    if not ops["com.microsoft:MatMulNBits"]:
                        del ops["com.microsoft:MatMulNBits"]
                    err = check_build(src, tmp / rel, pkg, entry, threads, PREFILL_MAX_REL_ERROR)
                else:
                    # INT8 builds of some roles round differently from their sources (checks.py)
                    limit = (
                        LOOSE_BUILD_LIMITS.get(entry.role, BUILD_MAX_REL_ERROR)
                        if p == "int8"
                        else BUILD_MAX_REL_ERROR
                    )
                    err = check_build(src, tmp / rel, pkg, entry, threads, limit)
                files[f"{name}.{p}"] = rel
                report[f"{name}.{p}"] = {"file": rel, "ops": ops, "rel_error_vs_source": err}
                say(f"built {name}.{p} for {target} (relative error vs source {err:.1e})")
                if in_place and ops.get("com.microsoft:MatMulNBits") and prefill:
                    key, prel = f"{name}.{p}.{PREFILL}", f"builds/{target}/{name}.{p}.{PREFILL}.onnx"
                    n = write_prefill_build(tmp / rel, tmp / prel)
                    err = check_decoder_build(src, tmp / prel, entry, decoder, threads, PREFILL_MAX_REL_ERROR)
                    files[key] = prel
                    report[key] = {"file": prel, "int8_gemms": n, "rel_error_vs_source": err}
                    say(
                        f"built {key} for {target}: {n} int8 GEMMs for prompts (relative error vs source {err:.1e})"
                    )
        return BuildResult(target, ort.__version__, "CPUExecutionProvider", settings, files, report)
