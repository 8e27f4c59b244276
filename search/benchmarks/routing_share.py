"""Gate + routing share of every multi-expert model a study trained: each trial's ``model.onnx``, re-merged
with this version's routing graph, timed in alternating rounds against its own trunk and chosen experts
called alone (:func:`pipelines.deploy.routing_cost.measure_routing_overhead`), on each engine, at batch 1 on
the study's first validation image (what the search times). Writes Markdown and JSON: one row per trial and
engine, and per engine the count within ``constraints.max_routing_share``.

    python -m search.benchmarks.routing_share results/shared-trunk --out results/benchmarks/routing_share.md

Run it with nothing else on the machine. ``--load N`` times beside N CPU-burning processes instead, and
``--against QUIET.json`` compares the shares with a quiet run's (how well a busy search's shares hold).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from pipelines.deploy.bundle import remerge_single_file
from pipelines.deploy.engines import ENGINES
from pipelines.deploy.routing_cost import measure_routing_overhead
from pipelines.timing import cpu_description
from search.benchmarks.study_latency import spearman, trained_trials
from search.record import SINGLE_FILE
from search.setup import load_data
from search.study import load_study
from search.workspace import resolve_study_dir

__all__ = ["main"]

# what --load runs in each burner process: one thread of float32 matmuls, until killed
_BURN = (
    "import os\nos.environ['OMP_NUM_THREADS'] = '1'\nimport numpy as np\n"
    "a = np.random.rand(1500, 1500).astype(np.float32)\nwhile True:\n    a = (a @ a) / 1500\n"
)


def _rows(folder: Path, trials, images, engines: tuple[str, ...], repeats: int, rounds: int) -> list[dict]:
    rows = []
    for trial, record, bundle in trials:
        params = record.parameters(trial.params)
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / "bundle"
            shutil.copytree(bundle, copy)
            remerge_single_file(copy)  # the routing graph a new trial or an export gets
            overhead = measure_routing_overhead(
                copy, images, batches=(1,), engines=engines, repeats=repeats, rounds=rounds, warmup=10
            )
        measured = record.measurement
        for engine, per_batch in overhead.items():
            timing = per_batch["batch_1"]
            rows.append(
                {
                    "trial": trial.number,
                    "layout": params.get("layout", "separate"),
                    "num_experts": params.get("num_experts"),
                    "top_k": params.get("effective_top_k", params.get("top_k")),
                    "views": params.get("views", 1),
                    "mmacs": trial.values[1],
                    "val_accuracy": trial.values[0],
                    "engine": engine,
                    "version": (timing["single_file"].get("versions") or {}).get(engine),
                    "threads": timing["single_file"]["threads"],
                    "batch": 1,
                    "min_ms": timing["single_file"]["min_ms"],
                    "median_ms": timing["single_file"]["median_ms"],
                    "network_min_ms": timing["network"]["min_ms"],
                    "network_median_ms": timing["network"]["median_ms"],
                    "calls": timing["calls"],
                    "routing_share": timing["routing_share"],
                    "routing_share_min": timing["routing_share_min"],
                    "search_routing_share": measured.routing_share,
                    "search_routing_share_of": measured.routing_share_of,
                }
            )
        print(
            f"trial {trial.number}: "
            + ", ".join(f"{row['engine']} {row['routing_share']:.1%}" for row in rows[-len(overhead) :]),
            flush=True,
        )
    return rows


def _summary(rows: list[dict], limit: float) -> dict:
    summary = {}
    for engine in sorted({row["engine"] for row in rows}):
        mine = [row for row in rows if row["engine"] == engine]
        summary[engine] = {
            "models": len(mine),
            "within_limit": sum(row["routing_share"] <= limit for row in mine),
            "spearman_share_vs_mmacs": spearman(
                [row["routing_share"] for row in mine], [row["mmacs"] for row in mine]
            ),
        }
    return summary


def _against(rows: list[dict], quiet: dict, limit: float) -> dict:
    """Per engine, these shares against an earlier (quiet) run's of the same trials: Spearman, mean and
    largest difference, and the share of models on the same side of ``limit``."""
    earlier = {(row["trial"], row["engine"]): row["routing_share"] for row in quiet["rows"]}
    block = {}
    for engine in sorted({row["engine"] for row in rows}):
        pairs = [
            (row["routing_share"], earlier[(row["trial"], engine)])
            for row in rows
            if row["engine"] == engine and (row["trial"], engine) in earlier
        ]
        if not pairs:
            continue
        differences = [now - then for now, then in pairs]
        block[engine] = {
            "models": len(pairs),
            "spearman": spearman([now for now, _ in pairs], [then for _, then in pairs]),
            "mean_difference": sum(differences) / len(pairs),
            "mean_abs_difference": sum(abs(d) for d in differences) / len(pairs),
            "max_abs_difference": max(abs(d) for d in differences),
            "same_side_of_limit": sum((now <= limit) == (then <= limit) for now, then in pairs) / len(pairs),
        }
    return block


def _markdown(result: dict, command: str) -> str:
    limit = result["max_routing_share"]
    lines = [
        f"# Gate + routing share of `model.onnx`: study `{result['study']}`",
        "",
        f"{result['date']}, {result['cpu']}. Reproduce: `{command}`.",
        "",
        "Each multi-expert trial's `model.onnx` (re-merged with the current routing graph) timed in "
        f"{result['rounds']} alternating rounds ({result['repeats']} calls of each in all) against its trunk "
        "and chosen experts called alone, batch 1, the study's first validation image; the call cost of each "
        "extra file (an empty graph, interleaved too) is taken off. Share = 1 - network / model.onnx, from "
        "the median per-round ratios (of minima in brackets). `search` is what the search recorded "
        f"(`{SINGLE_FILE}` since this benchmark's version; older trials timed the numpy glue).",
        "",
    ]
    for engine, block in result["summary"].items():
        lines.append(
            f"- **{engine}**: {block['within_limit']} of {block['models']} models within "
            f"{limit:.0%}; Spearman(share, MMACs) = {block['spearman_share_vs_mmacs']:.2f}."
        )
    if result.get("load"):
        lines.append(
            f"- Timed beside {result['load']} CPU-burning process(es) (a 1500x1500 float32 matmul loop "
            "each), as the search times a trial beside a training worker."
        )
    for engine, block in (result.get("against") or {}).items():
        lines.append(
            f"- **{engine} against `{result['against_file']}`** ({block['models']} models): Spearman "
            f"{block['spearman']:.2f}, {100 * block['mean_difference']:+.1f} points on average "
            f"({100 * block['mean_abs_difference']:.1f} apart, at most {100 * block['max_abs_difference']:.1f}), "
            f"{block['same_side_of_limit']:.0%} on the same side of {limit:.0%}."
        )
    lines += [
        "",
        "| trial | layout | experts | top-k | views | MMACs | val | engine | threads | model.onnx ms min / median "
        "| network ms min / median | routing share (of minima) | search |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(result["rows"], key=lambda row: (row["engine"], row["mmacs"])):
        search = (
            f"{row['search_routing_share']:.1%} ({row['search_routing_share_of']})"
            if row["search_routing_share"] is not None
            else ""
        )
        lines.append(
            f"| {row['trial']} | {row['layout']} | {row['num_experts']} | {row['top_k']} | {row['views']} | "
            f"{row['mmacs']:.2f} | {row['val_accuracy']:.4f} | {row['engine']} {row['version'] or ''} | "
            f"{row['threads']} | {row['min_ms']:.3f} / {row['median_ms']:.3f} | "
            f"{row['network_min_ms']:.3f} / {row['network_median_ms']:.3f} | "
            f"{row['routing_share']:.1%} ({row['routing_share_min']:.1%}) | {search} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="study folder (results/<name>)")
    parser.add_argument("--trials", type=int, nargs="*", help="these trials only (default: every MoE)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--repeats", type=int, default=150, help="calls of each file in all")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--load", type=int, default=0, help="CPU-burning processes running meanwhile")
    parser.add_argument(
        "--against", type=Path, help="an earlier run's JSON (quiet) to compare the shares with"
    )
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/routing_share.md"))
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    folder = resolve_study_dir(args.study)
    cfg, study = load_study(folder)
    trials = [
        (trial, record, bundle)
        for trial, record, bundle in trained_trials(study, folder)
        if record.parameters(trial.params).get("num_experts", 1) > 1
        and (not args.trials or trial.number in args.trials)
    ]
    if not trials:
        print(f"{folder}: no multi-expert trial with a bundle", file=sys.stderr)
        return 2
    images = load_data(cfg).val.images[:1].numpy()
    limit = cfg.constraints.max_routing_share or 0.10
    burners = [subprocess.Popen([sys.executable, "-c", _BURN]) for _ in range(args.load)]
    try:
        rows = _rows(folder, trials, images, tuple(args.engines), args.repeats, args.rounds)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    result = {
        "study": study.study_name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_description(),
        "repeats": args.repeats,
        "rounds": args.rounds,
        "max_routing_share": limit,
        "load": args.load,
        "summary": _summary(rows, limit),
        "rows": rows,
    }
    if args.against is not None:
        result["against_file"] = str(args.against)
        result["against"] = _against(rows, json.loads(args.against.read_text()), limit)
    command = "python -m search.benchmarks.routing_share " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_markdown(result, command))
    args.out.with_suffix(".json").write_text(json.dumps({**result, "command": command}, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
