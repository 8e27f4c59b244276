"""``hycomp report``: one page (Markdown and HTML) with the front, the exported point(s), the baseline
and the search settings."""

from __future__ import annotations

import html
import json
from pathlib import Path

import optuna

from search.config import SearchConfig, dump_config
from search.latency import stored_reference
from search.pareto import (
    display_columns,
    failures_table,
    format_table,
    front_table,
    per_mac_note,
    repeat_count,
    trials_table,
)
from search.plots import plot_front_png
from search.remeasure import load_remeasured

__all__ = ["write_report"]


def _markdown_table(frame) -> str:
    if frame.empty:
        return "_none_\n"
    columns = list(frame.columns)
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        cells = [f"{value:.4g}" if isinstance(value, float) else str(value) for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(cfg: SearchConfig, study: optuna.Study, folder: Path) -> tuple[Path, Path]:
    """Write ``folder/report.md`` and ``folder/report.html``; returns their paths."""
    remeasured = load_remeasured(folder)  # quiet latencies of `front --remeasure`, where there are any
    table = trials_table(study, remeasured)
    front = front_table(study, remeasured)
    reference = stored_reference(study)
    baseline = study.user_attrs.get("baseline")
    plot = plot_front_png(table, baseline, folder / "front.png")
    shown = display_columns(front) if not front.empty else front
    repeats = repeat_count(table)
    counted = f"{len(table) - repeats} completed trials" + (
        f" (+{repeats} repeated configurations, results reused)" if repeats else ""
    )
    lines = [
        f"# hycomp study `{study.study_name}`",
        "",
        f"{counted}, {len(front)} on the Pareto front "
        "(objectives: validation accuracy max, MMACs per input min, batch-1 latency min).",
        "",
        f"![Pareto front]({plot.name})",
        "",
        "## Pareto front",
        "",
        _markdown_table(shown),
    ]
    if not table.empty:
        backends = " / ".join(sorted({str(backend) for backend in table["latency_backend"] if backend}))
        if reference is None:
            lines.append(
                f"Latency: {backends} (the column `engine` says which), {int(table['latency_threads'].iloc[0])} "
                "thread(s), batch 1, median of repeated runs. MACs per input = gate + top_k experts (FLOPs = 2 x MACs)."
            )
        else:
            timed = (
                "re-timed quietly after the search (`hycomp front --remeasure`) where `remeasured`"
                if remeasured
                else "timed during the search"
            )
            lines.append(
                f"Latency: batch 1 on {reference.engine} {reference.version}, {reference.threads} thread(s): the "
                f"model's time over the int8 teacher's (`x teacher`, timed interleaved so machine load cancels) "
                f"times the teacher's quiet {reference.teacher_median_ms:.3f} ms at the study's start; "
                f"{timed}. {reference.summary()}. MACs per input = gate + top_k experts (FLOPs = 2 x MACs)."
            )
        note = per_mac_note(table)
        if note:
            lines += ["", note]
        lines.append("")
    if baseline:
        lines += [
            "## Baseline (fp32 teacher)",
            "",
            f"{baseline['arch']}: val {baseline['val_accuracy']:.4f}, test {baseline['test_accuracy']:.4f}, "
            f"{baseline['macs'] / 1e6:.2f} MMACs, {baseline['params']} params, "
            f"{baseline['size_bytes_fp32'] / 1024:.1f} KB fp32, latency {baseline['latency']['median_ms']:.3f} ms "
            f"({baseline['latency']['backend']}, {baseline['latency']['threads']} thread(s), batch 1).",
            "",
        ]
        ensemble = baseline.get("ensemble")
        if ensemble:  # baseline.teachers > 1: the students' distillation source
            lines += [
                f"Students distil from {len(ensemble['members'])} teachers (this one first, the one pruned; "
                f"members' test {', '.join(f'{value:.4f}' for value in ensemble['member_test_accuracy'])}); "
                f"their averaged logits: val {ensemble['val_accuracy']:.4f}, test {ensemble['test_accuracy']:.4f}.",
                "",
            ]
    exports = sorted((folder / "export").glob("*/report.json")) if (folder / "export").exists() else []
    if exports:
        lines += ["## Exported points", ""]
        for path in exports:
            report = json.loads(path.read_text())
            exported = report["exported"]
            latency = exported["latency"]["latency"]
            lines.append(
                f"- trial {report['trial']} ({report['picked_because']}): TEST accuracy {exported['test_accuracy']:.4f} "
                f"(baseline {report['baseline']['test_accuracy']:.4f}), {exported['mmacs']:.3f} MMACs, "
                f"{exported['size_kb']:.1f} KB, {latency['median_ms']:.3f} ms ({latency['backend']}, "
                f"{latency['threads']} thread(s), batch 1). Details: `{path.parent.name}/report.md`."
            )
        lines.append("")
    failures = failures_table(study)
    lines += ["## Failed, rejected or stopped trials", "", _markdown_table(failures)]
    lines += ["## Search settings", "", "```yaml", dump_config(cfg).rstrip(), "```", ""]
    markdown = "\n".join(lines)
    md_path = folder / "report.md"
    md_path.write_text(markdown)
    html_path = folder / "report.html"
    body = [
        f"<h1>hycomp study {html.escape(study.study_name)}</h1>",
        f"<p>{html.escape(counted)}, {len(front)} on the Pareto front.</p>",
        f'<img src="{plot.name}" style="max-width:100%">',
        "<h2>Pareto front</h2>",
        f"<pre>{html.escape(format_table(shown, baseline, reference)) if not shown.empty else 'none'}</pre>",
        "<h2>Failed, rejected or stopped trials</h2>",
        failures.to_html(index=False) if not failures.empty else "<p>none</p>",
        "<h2>Search settings</h2>",
        f"<pre>{html.escape(dump_config(cfg))}</pre>",
    ]
    html_path.write_text(
        "<!doctype html><meta charset='utf-8'><title>hycomp report</title>" + "\n".join(body)
    )
    return md_path, html_path
