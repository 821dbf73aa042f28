"""Readable text output of the command line: plain tables for people (`--json` is for machines)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns with a rule under the first (header) row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fields(obj: dict[str, Any], skip: set[str]) -> list[str]:
    return [f"{k}: {v}" for k, v in obj.items() if k not in skip and not isinstance(v, (dict, list))]


def _classify(r: dict[str, Any]) -> str:
    if "results" in r:  # a classification package: several files of one modality
        parts = [f"modality: {r['modality']}"]
        for item in r["results"]:
            rows = [("label", "probability")] + [(x["label"], f"{x['score']:.4f}") for x in item["labels"]]
            parts.append(f"{item['file']}\n{table(rows)}")
        return "\n\n".join(parts)
    rows = [("label", "probability")] + [(x["label"], f"{x['score']:.4f}") for x in r["labels"]]
    return f"{r['image']}\n{table(rows)}"


def _search(r: dict[str, Any]) -> str:
    head = _fields(r, {"query", "hits"})
    if "hits" not in r:
        return "\n".join(head)
    rows = [("rank", "id", "score", "label")]
    rows += [
        (str(i + 1), str(h["id"]), f"{h['score']:.4f}", str(h["label"] or ""))
        for i, h in enumerate(r["hits"])
    ]
    return "\n".join([*head, f"query: {r['query']}", table(rows)])


def _bench(r: dict[str, Any]) -> str:
    return _bench_load(r) if "open_s" in r else _bench_components(r)


def _bench_load(r: dict[str, Any]) -> str:
    """`bench --load`: medians and spread over fresh processes."""
    preload = f", preload={r['preload']!r}" if r.get("preload") else ""
    head = f"package {r['package']} ({r['pipeline']}), {r['precision']}{preload}, {r['threads']} threads, {r['runs']} fresh processes"
    rows = [("figure", "median", "min", "max")]
    for key, what in (
        ("import_s", "import mmedge.sdk (s)"),
        ("open_s", "sdk.Pipeline open (s)"),
        ("first_call_s", f"first call: {r['first_call']} (s)"),
        ("rss_open_mb", "RSS after open (MB)"),
        ("peak_rss_mb", "peak RSS (MB)"),
    ):
        if key in r:
            lo, hi = r[key + "_spread"]
            rows.append((what, f"{r[key]:g}", f"{lo:g}", f"{hi:g}"))
    return "\n".join([head, table(rows)])


def _bench_components(r: dict[str, Any]) -> str:
    out = [f"package {r['package']}, backend {r['backend']}, {r['threads'] or 'default'} threads"]
    for comp, batches in r["components"].items():
        rows = [("component", "batch", "engine", "p50 ms", "p90 ms", "items/s", "x faster than")]
        for batch, row in batches.items():
            speed = row.get("speedup_vs", {})
            for engine, st in row.items():
                if engine == "speedup_vs":
                    continue
                ratios = ", ".join(f"{k} {v:.2f}x" for k, v in speed.items()) if engine not in speed else ""
                rows.append(
                    (
                        comp,
                        batch.removeprefix("batch"),
                        engine,
                        f"{st['p50_ms']:.3f}",
                        f"{st['p90_ms']:.3f}",
                        f"{st['items_per_s']:.1f}",
                        ratios,
                    )
                )
        out.append(table(rows))
    if "generation" in r:
        g = r["generation"]
        out.append(table([("generation", "value")] + [(k, f"{v:g}") for k, v in g.items()]))
    return "\n\n".join(out)


def _calibrate(r: dict[str, Any]) -> str:
    rows = [("component", "precision", "accuracy vs fp32", "kept in float", "met")]
    for comp, rec in r["components"].items():
        if "skipped" in rec:
            rows.append((comp, "-", rec["skipped"], "", ""))
        elif "cosine" in rec:
            cos = ", ".join(f"{v:.4f}" for v in rec["cosine"].values())
            rows.append((comp, "int8", f"cosine {cos}", str(len(rec["float_nodes"])), str(rec["met"])))
        for p in ("int4", "int8"):
            if p in rec and isinstance(rec[p], dict):
                q = rec[p]
                acc = f"logits cosine {q.get('logits_cosine', float('nan')):.4f}, next token {q.get('top1_agreement', 0):.3f}"
                rows.append((comp, f"{p} weight-only", acc, "", str(q.get("met", ""))))
    out = [f"data {r['data']}, method {r['method']}, target cosine {r['target_cosine']}", table(rows)]
    metric = r.get("task_metric", {})
    if "skipped" not in metric and metric:
        keys = [k for k in ("t2i_r1", "i2t_r1", "vqa_accuracy") if k in metric.get("fp32", {})]
        rows = [("task metric", *metric)] + [
            (k, *(f"{metric[label][k]:.3f}" for label in metric)) for k in keys
        ]
        out.append(table(rows))
    if "build" in r:
        out.append(_build(r["build"]))
    return "\n\n".join(out)


def _build(r: dict[str, Any]) -> str:
    rows = [("build", "file", "rel. error vs source")]
    for key, rec in r["builds"].items():
        err = rec.get("rel_error_vs_source")
        rows.append((key, str(rec.get("file", "")), "" if err is None else f"{err:.1e}"))
    return f"{r['backend']} builds for {r['target']}\n{table(rows)}"


FORMATS: dict[str, Callable[[dict[str, Any]], str]] = {
    "classify": _classify,
    "search": _search,
    "bench": _bench,
    "calibrate": _calibrate,
    "build": _build,
}


def render(verb: str, obj: object) -> str:
    """The text a person reads for a verb's result."""
    if isinstance(obj, dict):
        formatter = FORMATS.get(verb)
        if formatter is not None:
            try:
                return formatter(obj)
            except (KeyError, TypeError, ValueError):  # an unexpected shape: fall back to the plain listing
                pass
        return "\n".join(
            f"{k}: {json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else v}"
            for k, v in obj.items()
        )
    return str(obj)
