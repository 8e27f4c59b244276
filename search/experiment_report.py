"""The quality experiment's report: every row's TEST accuracy over seeds beside the teacher and the control,
MACs, size and latency, routing tables, the verdict and a plot of accuracy against MACs."""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import ConfigError
from search.export_report import routing_lines
from search.study import load_study

__all__ = ["CONTROL", "MOE", "SINGLE", "ExperimentRun", "plot_rows", "write_report"]

MOE, SINGLE, CONTROL = "exported MoE", "best single compressed", "no-search control"


@dataclass(frozen=True)
class ExperimentRun:
    """What one run of the experiment did: its settings and the (row, seed) pairs it holds."""

    study_folder: Path
    trial_number: int
    seeds: tuple[int, ...]
    threads: int
    jobs: int
    also: tuple[int, ...]
    started: float  # time.time() at the start
    partial: Path  # the saved (row, seed) pairs
    reused: int  # pairs reused from ``partial``
    missing: tuple  # pairs not run (--report-only)
    done: tuple  # every pair held
    class_names: tuple[str, ...]
    single_from: Path | None = None  # the study the best single net was taken from, when not this one


def _summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} +- {100 * statistics.stdev(values):.2f}"


def _latency(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _alias(row: dict) -> bool:
    """Whether ``row`` stands for another row's model (the exported trial as the best single): it gets no
    marker, times or routing of its own."""
    return row.get("note", "").startswith("=")


def plot_rows(rows: dict[str, dict], teacher: dict, path: Path) -> Path:
    """Test accuracy (mean, with the min-max of seeds as error bar) against MMACs per input, one marker a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    for name, row in {"fp32 teacher": teacher, **rows}.items():
        if _alias(row):  # the same model as another row: one marker
            continue
        values = [100 * value for value in row["test"]]
        mean = statistics.mean(values)
        spread = [[mean - min(values)], [max(values) - mean]]
        axis.errorbar(
            row["mmacs"], mean, yerr=spread, fmt="o", capsize=4, label=f"{name} ({len(values)} seed(s))"
        )
    axis.set_xlabel("MMACs per input (gate + chosen experts)")
    axis.set_ylabel("TEST accuracy %")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(run: ExperimentRun, rows: dict[str, dict], out: Path) -> Path:
    """Write ``out`` (Markdown), its ``.json`` and ``.png`` from the merged ``rows``; returns ``out``."""
    study_folder, trial_number, seeds, jobs, threads = (
        run.study_folder,
        run.trial_number,
        list(run.seeds),
        run.jobs,
        run.threads,
    )
    also, started, partial, reused, missing, done = (
        run.also,
        run.started,
        run.partial,
        run.reused,
        run.missing,
        run.done,
    )
    cfg, study = load_study(study_folder)  # the report needs the study, not the data: the seeds loaded it
    baseline = study.user_attrs.get("baseline")
    if not baseline:
        raise ConfigError(
            f"{study_folder}: the study holds no teacher record; run `hycomp search` on it first."
        )
    teacher_row = {
        "test": [baseline["test_accuracy"]],
        "mmacs": baseline["macs"] / 1e6,
        "size_kb": baseline["size_bytes_fp32"] / 1024,
        "latency_ms": baseline["latency"]["median_ms"],
    }
    command = " ".join(
        [
            "hycomp experiment",
            str(study_folder),
            "--trial",
            str(trial_number),
            "--seeds",
            *map(str, seeds),
            *(["--jobs", str(jobs)] if jobs > 1 else []),
            *(["--also", *map(str, also)] if also else []),
            *(["--single-from", str(run.single_from)] if run.single_from is not None else []),
        ]
    )
    single = (rows[MOE].get("params") or {}).get("num_experts") == 1  # the search exported one pruned net
    lines = [
        f"# {cfg.data.dataset}: exported {'model' if single else 'MoE'} vs a plainly trained net of equal compute",
        "",
        f"Study `{study.study_name}`, exported trial {trial_number}; seeds {seeds}; {time.time() - started:.0f} s on "
        f"{len(os.sched_getaffinity(0))} CPUs ({jobs} process(es))"
        + (f"; {reused} (row, seed) result(s) reused from {partial.name}" if reused else "")
        + f". Reproduce: `{command}`.",
        "",
        *[
            f"Seed {entry['seed']} of `{entry['row']}` is the model `hycomp export --candidates` retrained at the full "
            f"budget ({Path(entry['from']).relative_to(study_folder)}), measured here, not trained again."
            for entry in done
            if entry.get("from", "trained in this run") != "trained in this run"
        ],
        "",
        "TEST accuracy, mean +- std over seeds (%). Compressed rows re-run the configuration at the study's full "
        "`export:` budget; the control is trained from scratch with the teacher's recipe "
        f"({cfg.baseline.epochs} epochs, no distillation). Latency: batch 1, {threads} thread(s), median of each "
        "seed's repeated runs, then the median over seeds (min-max); int8 rows on ONNX Runtime int8, teacher on "
        "torch fp32 eager.",
        "",
        "| model | test acc % | MMACs / input | size KB | latency ms | notes |",
        "|---|---|---|---|---|---|",
        f"| fp32 teacher {baseline['arch']} | {_summary(teacher_row['test'])} | {teacher_row['mmacs']:.2f} | {teacher_row['size_kb']:.1f} (fp32) | {teacher_row['latency_ms']:.3f} | cached baseline, one seed |",
    ]
    ensemble = study.user_attrs.get("baseline", {}).get("ensemble")
    if ensemble:
        lines.append(
            f"| teacher ensemble, {len(ensemble['members'])} x {baseline['arch']} fp32 | {100 * ensemble['test_accuracy']:.2f} | "
            f"{ensemble['macs'] / 1e6:.2f} | | | the students' distillation source (logits averaged; seeds "
            f"{cfg.baseline.seed}..{cfg.baseline.seed + len(ensemble['members']) - 1}); not deployed |"
        )
    for name, row in rows.items():
        note = row.get("note") or (
            f"width {row['width']:.3f}" if "width" in row else f"`{row.get('params')}`"
        )
        if row.get("source") and not row.get("note"):  # the best single net, named by trial (and study)
            note = f"{row['source']}: {note}"
        label = "exported (a single model: 1 expert)" if name == MOE and single else name
        experts = (row.get("params") or {}).get("num_experts", 1)
        if name.startswith("trial ") and experts > 1:
            label += f" (MoE: {experts} experts, top-{row['params'].get('effective_top_k', row['params']['top_k'])})"
        held = "" if len(row["test"]) >= len(seeds) else f" ({len(row['test'])} of {len(seeds)} seeds)"
        lines.append(
            f"| {label} | {_summary(row['test'])}{held} | {row['mmacs']:.2f} | {row['size_kb']:.1f} | {_latency(row['latency_ms'])} | {note} |"
        )
    for name, row in rows.items():
        if "test_one_view" in row:
            views = row["params"]["views"]
            lines.append(
                f"\n`{name}` runs {views} test-time views per input; the same deployed models with one view: "
                f"{_summary(row['test_one_view'])} test at {row['mmacs'] / views:.2f} MMACs."
            )
    timed = [
        f"`{name}` {', '.join(f'{seconds / 60:.0f}' for seconds in row['seconds'])}"
        for name, row in rows.items()
        if row.get("seconds") and not _alias(row)
    ]
    if timed:  # seeds measured (not retrained) or saved by an older version record no time
        lines += ["", "Minutes per trained (row, seed), on one worker each: " + "; ".join(timed) + "."]
    for name, row in rows.items():  # how the gate spreads inputs over experts (experts are per seed)
        table = row.get("routing_per_class") or []
        if table and len(table[0]) > 1 and not _alias(row):
            lines += [
                "",
                f"`{name}` routing, seed {row['routing_seed']} (validation, first choice): rows are classes, columns experts.",
                "",
                *routing_lines(table, list(run.class_names)),
            ]
    if missing:
        lines += [
            "",
            "**Partial report** (`--report-only`): not run yet: "
            + ", ".join(f"`{name}` seed {seed}" for name, seed in missing)
            + ". Rows show the seeds they hold; the same command without `--report-only` runs the rest and reuses these.",
        ]
    if MOE not in rows or CONTROL not in rows:
        out.write_text("\n".join(lines) + "\n")
        return out
    moe, control = rows[MOE], rows[CONTROL]
    verdict = statistics.mean(moe["test"]) - statistics.mean(control["test"])
    lines += [
        "",
        f"Exported {'model (1 expert)' if single else 'MoE'} minus control: {100 * verdict:+.2f} points of test accuracy at {moe['mmacs']:.2f} vs {control['mmacs']:.2f} MMACs.",
        "",
    ]
    best = rows.get(SINGLE)
    if not single and best is not None and not _alias(best):
        against = statistics.mean(moe["test"]) - statistics.mean(best["test"])
        lines[-1:] = [
            "",
            f"Exported MoE minus best single compressed net: {100 * against:+.2f} points of test accuracy at "
            f"{moe['mmacs']:.2f} vs {best['mmacs']:.2f} MMACs.",
            "",
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_rows(rows, teacher_row, out.with_suffix(".png"))
    lines += [f"![test accuracy against MMACs]({plot.name})", ""]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"teacher": teacher_row, **rows}, indent=2, default=str))
    return out
