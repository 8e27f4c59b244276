"""The export's report: TEST accuracy, MACs, size and latency beside the baseline's, the candidates
compared, the engine's weight grid and the routing per class, rendered as Markdown."""

from __future__ import annotations

from pipelines.deploy.manifest import Manifest

__all__ = ["render_report", "routing_lines", "routing_overhead_lines", "weight_grid_totals"]


def weight_grid_totals(manifest: Manifest | None) -> dict[str, int] | None:
    """Weight tensors the int8 engine holds exactly on NNI's grid / rounds to its own, over all files."""
    per_file = manifest.weight_grid if manifest is not None else {}
    if not per_file:
        return None
    return {key: sum(counts.get(key, 0) for counts in per_file.values()) for key in ("exact", "rounded")}


def _latency_cell(stats: dict) -> str:
    return f"{stats['median_ms']:.3f} ms (p10 {stats['p10_ms']:.3f}, p90 {stats['p90_ms']:.3f})"


def _weight_grid_line(totals: dict[str, int] | None) -> list[str]:
    if not totals:
        return []
    return [
        f"- int8 engine weights: {totals['exact']} tensors hold NNI's levels exactly, {totals['rounded']} are "
        "rounded to the engine's [-64, 64] grid (8-bit or fp32 weights: more levels than it holds)."
    ]


def _ensemble_row(baseline: dict) -> list[str]:
    ensemble = baseline.get("ensemble")
    if not ensemble:
        return []
    return [
        f"| teacher ensemble ({len(ensemble['members'])} x {baseline['arch']} fp32, distillation source only) | "
        f"{ensemble['test_accuracy']:.4f} | {ensemble['val_accuracy']:.4f} | {ensemble['macs'] / 1e6:.3f} | | | |"
    ]


def _candidate_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "Candidates retrained at the full budget (chosen on full-budget validation accuracy; the trial column "
        "is the cheap trial budget's):",
        "",
        "| trial | configuration | trial val | full-budget val | MMACs | latency ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        params = row["params"]
        described = (
            f"{params.get('pruner')} {params.get('sparsity')}, {params.get('bits')}-bit, "
            f"{params.get('num_experts')} expert(s) top-{params.get('effective_top_k', params.get('top_k'))}"
            + (
                f", experts from {params['expert_init']}"
                if params.get("num_experts", 1) > 1 and "expert_init" in params
                else ""
            )
            + (f", {params['blocks_removed']} block(s) removed" if params.get("blocks_removed") else "")
            + (f", {params['views']} test-time views" if params.get("views", 1) > 1 else "")
        )
        lines.append(
            f"| {row['trial']} | {described} | {row['trial_val_accuracy']:.4f} | "
            f"{row['full_budget_val_accuracy']:.4f} | {row['mmacs']:.2f} | {row['latency_ms']:.3f} |"
        )
    return [*lines, ""]


def _views_line(params: dict) -> list[str]:
    views = int(params.get("views", 1))
    if views == 1:
        return []
    return [
        f"- Test-time views: each input runs as {views} symmetric views (identity, then flips) whose logits are "
        f"averaged; MACs, latency and accuracy above include all {views} passes (the bundle's manifest holds "
        "`views`, and `hycomp predict` runs them)."
    ]


def routing_overhead_lines(overhead: dict | None) -> list[str]:
    """The ``routing_overhead`` of an export (:func:`pipelines.deploy.routing_cost.measure_routing_overhead`)
    as a markdown table: per engine and batch, model.onnx vs its chosen experts alone."""
    if not overhead:
        return []
    trunk = any(
        "trunk" in timing or timing.get("layout") == "shared"
        for per_batch in overhead.values()
        for timing in per_batch.values()
    )
    network = "trunk + chosen experts alone" if trunk else "chosen experts alone"
    lines = [
        f"One-file model (`model.onnx`) against its {network} (median ms, min in brackets; timed in "
        "alternating rounds; each file called apart pays the engine's call cost, taken off all but once); the "
        "routing share is the rest: gate, top-k, gathering, combining and views:",
        "",
        f"| engine | batch | model.onnx | {network} | routing share (of minima) | per-expert files + numpy routing |",
        "|---|---|---|---|---|---|",
    ]
    for engine, per_batch in overhead.items():
        for name, timing in per_batch.items():
            merged, folder = timing["single_file"], timing.get("folder")
            # "network": one interleaved callable; exports before it timed "experts" and "trunk" apart
            parts = [timing["network"]] if "network" in timing else [timing["experts"], timing.get("trunk")]
            median, minimum = (sum(part[key] for part in parts if part) for key in ("median_ms", "min_ms"))
            glue = f"{folder['median_ms']:.3f} ({folder['min_ms']:.3f})" if folder else ""
            lines.append(
                f"| {engine} | {name.removeprefix('batch_')} | {merged['median_ms']:.3f} ({merged['min_ms']:.3f}) | "
                f"{median:.3f} ({minimum:.3f}) | {timing['routing_share']:.1%} ({timing.get('routing_share_min', 0.0):.1%}) | {glue} |"
            )
    return [*lines, ""]


def _routing_share_line(exported: dict) -> str:
    """The gate + routing share of the deployed file (model.onnx, batch 1, each engine), with that of the
    per-expert files glued by numpy beside it."""
    overhead = exported.get("routing_overhead") or {}
    shares = [
        f"{engine} {per_batch['batch_1']['routing_share']:.1%} (of minima {per_batch['batch_1'].get('routing_share_min', 0.0):.1%})"
        for engine, per_batch in overhead.items()
        if "batch_1" in per_batch
    ]
    glue = f"{exported['latency']['routing_share']:.1%}"
    limit = exported.get("routing_limit")
    if limit is not None:
        verdict = "over" if limit["share"] > limit["max_routing_share"] else "within"
        shares.append(
            f"{verdict} constraints.max_routing_share {limit['max_routing_share']:.0%} on the study's engine "
            f"({limit['engine']})"
        )
    if not shares:
        return f"gate + routing share of MoE latency (per-expert files, numpy routing): {glue}."
    return (
        f"gate + routing share of batch-1 latency in `model.onnx`: {', '.join(shares)}; in the per-expert "
        f"files with numpy routing: {glue}."
    )


def _against_teacher_line(rows: dict | None, limit: dict | None = None) -> list[str]:
    """model.onnx against the study's int8 teacher, interleaved: the latency ratio beside the MACs ratio, and
    the verdict on ``constraints.max_latency_per_mac`` where the study set one (``limit``)."""
    if not rows:
        return []
    first = next(iter(rows.values()))
    parts = [
        f"batch {row['batch']} x{row['latency_ratio']:.3f} ({row['min_ms']:.3f} vs {row['teacher_min_ms']:.3f} ms min, "
        f"{row['ratio_over_macs']:.2f}x the MACs ratio)"
        for row in rows.values()
    ]
    recipes = (first.get("teacher_int8_recipe"), first.get("exported_int8_recipe"))
    unlike = (
        f" Not like for like: the teacher's int8 files are recipe {recipes[0]}, the export's recipe {recipes[1]}."
        if recipes[0] != recipes[1]
        else ""
    )
    return [
        f"- Against the study's int8 teacher (its reference bundle), interleaved on {first['engine']}, "
        f"{first['threads']} thread(s), MACs ratio {first['macs_ratio']:.3f}: "
        + "; ".join(parts)
        + "."
        + unlike
        + _per_mac_verdict(limit)
    ]


def _per_mac_verdict(limit: dict | None) -> str:
    if not limit:
        return ""
    verdict = "over" if limit["latency_per_mac"] > limit["max_latency_per_mac"] else "within"
    return (
        f" At batch {limit['batch']}: {verdict} constraints.max_latency_per_mac "
        f"{limit['max_latency_per_mac']:.2f}x."
    )


def render_report(report: dict) -> str:
    exported, baseline = report["exported"], report["baseline"]
    latency = exported["latency"]["latency"]
    base_latency = baseline["latency"]
    lines = [
        f"# hycomp export: study `{report['study']}`, trial {report['trial']}",
        "",
        f"Picked because: {report['picked_because']}. Retrained at full budget: {report['retrained_at_full_budget']}.",
        "",
        f"Parameters: `{report['params']}`",
        "",
        "| model | test acc | val acc | MMACs / input | size KB | latency (batch 1) | backend |",
        "|---|---|---|---|---|---|---|",
        f"| baseline {baseline['arch']} fp32 | {baseline['test_accuracy']:.4f} | {baseline['val_accuracy']:.4f} | "
        f"{baseline['mmacs']:.3f} | {baseline['size_kb_fp32']:.1f} | {_latency_cell(base_latency['torch-fp32-eager'])} | torch fp32 eager |",
        f"| baseline {baseline['arch']} | | | {baseline['mmacs']:.3f} | | {_latency_cell(base_latency['onnxruntime-fp32'])} | onnxruntime fp32 |",
        f"| baseline {baseline['arch']} | | | {baseline['mmacs']:.3f} | | {_latency_cell(base_latency['onnxruntime-int8'])} | onnxruntime int8 |",
        *_ensemble_row(baseline),
        f"| **exported {'MoE' if report['params'].get('num_experts', 1) > 1 else 'model'}** ({exported['precision']}, {exported['bits']}-bit weights) | **{exported['test_accuracy']:.4f}** | "
        f"{exported['val_accuracy']:.4f} | {exported['mmacs']:.3f} | {exported['size_kb']:.1f} | {_latency_cell(latency)} | {latency['backend']} |",
        "",
        f"Threads: {latency['threads']}. Versions: {latency['versions']}.",
        "",
        f"- Latency ratio to the torch fp32 baseline: {latency['median_ms'] / base_latency['torch-fp32-eager']['median_ms']:.3f}x; "
        + _routing_share_line(exported),
        f"- Batch 64: {_latency_cell(exported['latency_batch64']['latency'])} per batch.",
        *_against_teacher_line(exported.get("against_teacher"), exported.get("latency_per_mac_limit")),
        f"- Torch model of the export: test {exported['test_accuracy_torch']:.4f}, val {exported['val_accuracy_torch']:.4f}; "
        f"engine vs torch top-1 agreement on the whole val split {exported['agreement_with_torch']['top1_agreement']:.4f}, "
        f"max |logit diff| {exported['agreement_with_torch']['max_abs_diff']:.4g}.",
        *_weight_grid_line(exported.get("engine_weight_grid")),
        f"- MACs: {report['conventions']['macs']}. Size: {report['conventions']['size']}. {report['conventions']['low_bit']}.",
        *_views_line(report["params"]),
        "",
        *routing_overhead_lines(exported.get("routing_overhead")),
        *_candidate_lines(report.get("candidates") or []),
        "Routing (validation, first choice): rows are classes, columns experts.",
        "",
    ]
    lines += routing_lines(exported.get("routing_per_class") or [], report["class_names"])
    lines.append("")
    return "\n".join(lines)


def routing_lines(table: list[list[int]], class_names: list[str]) -> list[str]:
    """A routing count table (rows: classes, columns: experts; ``routing_per_class`` of a trial record)
    as markdown lines; none when there is no table."""
    if not table:
        return []
    lines = ["| class | " + " | ".join(f"expert {index}" for index in range(len(table[0]))) + " |"]
    lines.append("|---" * (len(table[0]) + 1) + "|")
    for name, row in zip(class_names, table, strict=False):
        lines.append(f"| {name[:40]} | " + " | ".join(str(value) for value in row) + " |")
    return lines
