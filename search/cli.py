"""The ``hycomp`` command line: a table of commands, each with ``add_arguments`` and ``take_action``.

    hycomp search   --space search_spaces/bloodmnist.yaml [--data-root DIR] [--storage URL] [--trials N]
    hycomp baseline --space … [--jobs N]          train / load the cached fp32 teacher(s), N at a time
    hycomp front    results/<study> [--remeasure]  Pareto front: table, front.csv, front.png, HTML views
    hycomp export   results/<study> --trial N | --pick knee | --max-latency-ms X …
    hycomp predict  BUNDLE IMAGES.npz|IMAGE… [--engine onnxruntime|openvino]   run a bundle, no torch
    hycomp profile  MODEL|BUNDLE|STUDY… [--engine E] [--threads N] [--profile FILE [--any-cpu]]
                                                   this machine's per-kernel latency table; predicted latency

Bad input exits with code 2 and one message naming the field, the value and the fix (no traceback).
Ctrl-C stops cleanly: the running trial is marked failed, completed ones are kept; re-run to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("hycomp")


def _whole(minimum: int, example: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum`` (argparse names the flag in its message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number; give one >= {minimum} (e.g. {example})"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum} (a whole number, e.g. {example})")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def _number(
    low: float, high: float = math.inf, *, low_open: bool = True, example: str = ""
) -> Callable[[str], float]:
    """An argparse type: a finite number in (low, high] (or [low, high] with ``low_open=False``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (value > low if low_open else value >= low) and value <= high
        if not math.isfinite(value) or not inside:
            where = f"> {low:g}" if high == math.inf else f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {where} (e.g. {example})")
        return value

    parse.__name__ = "number"
    return parse


COUNT = _whole(1, 4)
BUDGET = _number(0.0, example="2.5")
FRACTION = _number(0.0, 1.0, low_open=False, example="0.9")
SEED = _whole(0, 0)


def _load_cfg(args: argparse.Namespace):
    from pipelines.errors import ConfigError
    from search.config import load_config

    cfg = load_config(args.space)
    overrides: dict = {}
    data: dict = {}
    if getattr(args, "data_root", None):
        data["root"] = args.data_root
    elif cfg.data.root is None and os.environ.get("HYCOMP_DATA_ROOT"):
        data["root"] = os.environ["HYCOMP_DATA_ROOT"]
    if getattr(args, "download", False):
        data["download"] = True
    if data:
        overrides["data"] = data
    study: dict = {}
    if getattr(args, "trials", None) is not None:
        study["trials"] = args.trials
    if getattr(args, "study_name", None):
        study["name"] = args.study_name
    if getattr(args, "sampler", None):
        study["sampler"] = {**cfg.study.sampler.__dict__, "name": args.sampler}
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    if study:
        overrides["study"] = study
    constraints = {
        key: getattr(args, key)
        for key in (
            "max_latency_ms",
            "max_size_kb",
            "min_accuracy",
            "max_mmacs",
            "max_routing_share",
            "max_latency_per_mac",
        )
        if getattr(args, key, None) is not None
    }
    if constraints:
        overrides["constraints"] = constraints
    if not overrides:
        return cfg
    try:
        return cfg.replace(**overrides)
    except ConfigError as error:  # name the flag the user wrote, beside the field it overrides
        message = str(error)
        for field, flag in OVERRIDE_FLAGS.items():
            if message.startswith(field + ":"):
                message = f"{flag} ({field}){message[len(field) :]}"
                break
        raise ConfigError(message) from None


# the fields the command line overrides
OVERRIDE_FLAGS = {
    "study.sampler.name": "--sampler",
    "study.name": "--study-name",
    "study.trials": "--trials",
    "seed": "--seed",
    "data.root": "--data-root",
    "constraints.max_latency_ms": "--max-latency-ms",
    "constraints.max_size_kb": "--max-size-kb",
    "constraints.max_mmacs": "--max-mmacs",
    "constraints.min_accuracy": "--min-accuracy",
    "constraints.max_routing_share": "--max-routing-share",
    "constraints.max_latency_per_mac": "--max-latency-per-mac",
}


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines or bars (warnings and the result still show)"
    )


class SearchCommand:
    name = "search"
    help = "run or resume a compression search"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--space", required=True, help="YAML search space (e.g. search_spaces/bloodmnist.yaml)"
        )
        parser.add_argument(
            "--data-root", help="folder holding the dataset file (default: $HYCOMP_DATA_ROOT or ~/.medmnist)"
        )
        parser.add_argument(
            "--storage",
            help="Optuna storage URL (default sqlite:///results/<study>/study.db); a path ending .log uses a journal file",
        )
        parser.add_argument(
            "--trials", type=COUNT, help="number of completed trials to reach (overrides study.trials)"
        )
        parser.add_argument("--study-name", help="overrides study.name")
        parser.add_argument("--sampler", help="tpe | nsga2 | gp | random (overrides study.sampler.name)")
        parser.add_argument("--seed", type=SEED, help="overrides the global seed")
        parser.add_argument("--max-latency-ms", type=BUDGET, help="constraint: latency budget")
        parser.add_argument("--max-size-kb", type=BUDGET, help="constraint: packed size budget")
        parser.add_argument("--max-mmacs", type=BUDGET, help="constraint: compute budget")
        parser.add_argument(
            "--min-accuracy", type=FRACTION, help="constraint: minimum validation accuracy (0..1)"
        )
        parser.add_argument(
            "--max-routing-share",
            type=FRACTION,
            help="constraint: a multi-expert model's gate + routing share of batch-1 latency (default 0.1)",
        )
        parser.add_argument(
            "--max-latency-per-mac",
            type=BUDGET,
            help="constraint: latency ratio to the teacher at measure.throughput_batch over the MACs ratio (e.g. 1.5)",
        )
        parser.add_argument(
            "--workers", type=COUNT, default=1, help="worker processes on this machine sharing the study"
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        _add_quiet(parser)

    def take_action(self, args: argparse.Namespace) -> int:
        from search.study import completed_trials, evaluated_trials, run_search
        from search.workspace import study_dir

        cfg = _load_cfg(args)
        study = run_search(
            cfg, storage_url=args.storage, show_progress=not args.no_progress, workers=args.workers
        )
        folder = study_dir(cfg.study.name)
        evaluated = len(evaluated_trials(study))
        repeats = len(completed_trials(study)) - evaluated
        reused = f" (+{repeats} repeated configuration(s), results reused)" if repeats else ""
        print(f"\n{evaluated} completed trials{reused} in {folder}. Next: hycomp front {folder}")
        return 0


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="study folder, e.g. results/bloodmnist-resnet20")
    parser.add_argument("--storage", help="storage URL if the study is not in the folder's study.db")


def _open(args: argparse.Namespace):
    from search.study import load_study
    from search.workspace import resolve_study_dir

    folder = resolve_study_dir(args.study)
    cfg, study = load_study(folder, getattr(args, "storage", None))
    return folder, cfg, study


class FrontCommand:
    name = "front"
    help = "show the Pareto front (table, CSV, PNG, HTML); --remeasure re-times its models quietly first"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _add_study_arguments(parser)
        parser.add_argument(
            "--all", action="store_true", help="show every completed trial, not only the front"
        )
        parser.add_argument(
            "--remeasure",
            action="store_true",
            help="re-time the front's models now, one at a time against the study's teacher bundle, into "
            "remeasured.json (run it on an otherwise idle machine); the front then uses those latencies",
        )
        parser.add_argument(
            "--rounds", type=COUNT, help="with --remeasure: interleaved rounds per model (default 30)"
        )

    def take_action(self, args: argparse.Namespace) -> int:
        from pipelines.errors import ConfigError
        from search.latency import stored_reference
        from search.pareto import (
            empty_front_reason,
            failures_table,
            format_table,
            front_table,
            per_mac_note,
            repeat_count,
            trials_table,
        )
        from search.plots import plot_front_html, plot_front_png
        from search.remeasure import DEFAULT_ROUNDS, SIDECAR, load_remeasured, remeasure_front

        if args.rounds is not None and not args.remeasure:
            raise ConfigError("--rounds: sets how --remeasure times the models; pass --remeasure with it.")
        folder, cfg, study = _open(args)
        table = trials_table(study)
        if table.empty:
            raise ConfigError(
                f"study {study.study_name!r} in {folder} has no completed trials yet. Run `hycomp search` first."
            )
        if args.remeasure:
            rows = remeasure_front(cfg, study, folder, args.rounds or DEFAULT_ROUNDS)
            print(_remeasured_table(rows))
            print(f"wrote {folder / SIDECAR} (the search-time figures are kept beside the new ones)\n")
        remeasured = load_remeasured(folder)
        table = trials_table(study, remeasured)
        front = front_table(study, remeasured)
        baseline = study.user_attrs.get("baseline")
        reference = stored_reference(study)
        shown = table.sort_values("val_accuracy", ascending=False) if args.all else front
        repeats = repeat_count(table)
        reused = f", +{repeats} repeated configuration(s)" if repeats else ""
        print(
            f"Pareto front of {study.study_name} ({len(front)} of {len(table) - repeats} completed trials{reused}; "
            "objectives: val acc max, MMACs min, latency min)"
        )
        print(format_table(shown, baseline, reference))
        print(_latency_note(table, reference, bool(remeasured)))
        note = per_mac_note(table)
        if note:
            print(note)
        if front.empty and len(table) > repeats:
            print(f"\nThe front is empty: {empty_front_reason(study, remeasured)}")
        failures = failures_table(study)
        if not failures.empty:
            print(f"\n{len(failures)} failed, rejected or stopped trial(s):")
            print(failures.to_string(index=False, max_colwidth=260))  # an early-stop reason is long
        table.to_csv(folder / "trials.csv", index=False)
        front.to_csv(folder / "front.csv", index=False)
        png = plot_front_png(table, baseline, folder / "front.png")
        html = plot_front_html(study, folder)
        print(
            f"\nwrote {folder / 'front.csv'}, {folder / 'trials.csv'}, {png}, {', '.join(str(p) for p in html)}"
        )
        return 0


def _remeasured_table(rows: list[dict]) -> str:
    """trial, MMACs, search-time ms, quiet ms, ratio (and a multi-expert model's routing share and the latency
    per MAC, search-time and quiet): one line per re-timed model."""
    shares = any(row.get("quiet_routing_share") is not None for row in rows)
    header = f"{'trial':>5}  {'MMACs':>8}  {'search ms':>9}  {'quiet ms':>8}  {'x teacher':>9}"
    per_mac = any(row.get("quiet_latency_per_mac") is not None for row in rows)
    header += f"  {'routing share: search':>21}  {'quiet':>5}" if shares else ""
    lines = [header + (f"  {'latency per MAC: search':>22}  {'quiet':>6}" if per_mac else "")]
    for row in rows:
        line = (
            f"{row['trial']:>5}  {row['mmacs']:>8.3f}  {row['search_ms']:>9.3f}  {row['quiet_ms']:>8.3f}  "
            f"{row['ratio']:>9.3f}"
        )
        if shares:
            search, quiet = row.get("search_routing_share"), row.get("quiet_routing_share")
            line += f"  {'-' if search is None else f'{search:.1%}':>21}  {'-' if quiet is None else f'{quiet:.1%}':>5}"
        if per_mac:
            search, quiet = row.get("search_latency_per_mac"), row.get("quiet_latency_per_mac")
            line += f"  {'-' if search is None else f'{search:.2f}x':>22}  {'-' if quiet is None else f'{quiet:.2f}x':>6}"
        lines.append(line)
    return "\n".join(lines)


def _latency_note(table, reference, remeasured: bool) -> str:
    """What the latency column means for this study."""
    threads = int(table["latency_threads"].iloc[0])
    if reference is None:  # a study made before trials were timed against the teacher
        return (
            f"latency: median batch-1 ms on ONNX Runtime ({threads} thread(s)), precision in column 'engine'; "
            "teacher row: torch fp32 eager. MACs per input = gate + top_k experts (FLOPs = 2 x MACs)."
        )
    source = (
        "re-timed quietly by --remeasure where column 'remeasured' is true (trials.csv), at search time elsewhere"
        if remeasured
        else "timed during the search"
    )
    return (
        f"latency: batch-1 ms on {reference.engine} {reference.version} ({threads} thread(s)) = 'x teacher' (the "
        f"model's time over the int8 teacher's, timed interleaved) x the teacher's quiet {reference.teacher_median_ms:.3f} "
        f"ms at the study's start; {source}. MACs per input = gate + top_k experts (FLOPs = 2 x MACs)."
    )


BUDGET_FLAGS = ("--max-latency-ms", "--max-size-kb", "--max-mmacs")


def _check_choice(args: argparse.Namespace) -> None:
    """export chooses its trial one way: --trial, --pick, or budgets (which combine); before any work."""
    from pipelines.errors import ConfigError
    from search.pareto import PICKS

    if args.pick is not None and args.pick not in PICKS:
        raise ConfigError(f"--pick: unknown value {args.pick!r}. Valid values: {', '.join(PICKS)}.")
    budgets = [flag for flag in BUDGET_FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None]
    given = [
        f"--trial {args.trial}" if args.trial is not None else "",
        f"--pick {args.pick}" if args.pick is not None else "",
        " ".join(budgets),
    ]
    given = [text for text in given if text]
    if len(given) > 1:
        raise ConfigError(
            f"{' and '.join(given)}: these choose the trial to export in different ways. Give one: --trial N "
            f"(that trial), --pick {'|'.join(PICKS)} (a point of the front), or budgets "
            f"({', '.join(BUDGET_FLAGS)}; they combine: the most accurate front trial within all of them)."
        )


class ExportCommand:
    name = "export"
    help = "materialize one trial: model, ONNX bundle, config and report"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _add_study_arguments(parser)
        parser.add_argument("--trial", type=_whole(0, 3), help="trial number to export")
        parser.add_argument(
            "--pick", help="max-accuracy | knee | min-latency | min-macs (default max-accuracy)"
        )
        parser.add_argument("--max-latency-ms", type=BUDGET, help="best accuracy within this latency")
        parser.add_argument("--max-size-kb", type=BUDGET, help="best accuracy within this size")
        parser.add_argument("--max-mmacs", type=BUDGET, help="best accuracy within this compute")
        parser.add_argument(
            "--retrain", action="store_true", help="re-compress the configuration at the full export budget"
        )
        parser.add_argument(
            "--candidates",
            type=COUNT,
            default=1,
            help="with --retrain: retrain this many of the most accurate front trials within the budget at "
            "the full budget and export the best on validation (the cheap trial budget can misrank them)",
        )
        parser.add_argument(
            "--jobs",
            type=COUNT,
            default=1,
            help="candidates retrained at once, each in its own process and CPUs",
        )
        parser.add_argument("--force", action="store_true", help="overwrite an existing export folder")
        parser.add_argument("--out", help="export folder (default results/<study>/export/trial_<n>)")
        parser.add_argument("--data-root", help="folder holding the dataset file")
        _add_quiet(parser)

    def take_action(self, args: argparse.Namespace) -> int:
        from pipelines.errors import ConfigError
        from search.candidates import export_best
        from search.export import export_trial
        from search.pareto import pick_candidates, pick_trial
        from search.remeasure import load_remeasured

        _check_choice(args)
        folder, cfg, study = _open(args)
        remeasured = load_remeasured(folder)  # quiet latencies of `front --remeasure`, where there are any
        if args.data_root:
            cfg = cfg.replace(data={"root": args.data_root})
        elif cfg.data.root is None and os.environ.get("HYCOMP_DATA_ROOT"):
            cfg = cfg.replace(data={"root": os.environ["HYCOMP_DATA_ROOT"]})
        if args.candidates != 1 or args.jobs != 1:
            if not args.retrain or args.trial is not None or args.pick:
                raise ConfigError(
                    "--candidates/--jobs retrain several front trials at the full budget and choose among them: "
                    "pass --retrain, with a budget (--max-mmacs, --max-latency-ms, --max-size-kb) or none, and "
                    "without --trial or --pick."
                )
            picks = pick_candidates(
                study,
                args.candidates,
                max_latency_ms=args.max_latency_ms,
                max_size_kb=args.max_size_kb,
                max_mmacs=args.max_mmacs,
                latency=remeasured,
            )
            print(
                f"retraining {len(picks)} candidate(s) at the full budget ({args.jobs} at a time): trials "
                + ", ".join(str(pick.trial) for pick in picks)
            )
            report = export_best(
                cfg,
                study,
                folder,
                picks,
                jobs=args.jobs,
                force=args.force,
                out=Path(args.out) if args.out else None,
            )
            for row in report["candidates"]:
                print(
                    f"  trial {row['trial']}: val {row['trial_val_accuracy']:.4f} at the trial budget, "
                    f"{row['full_budget_val_accuracy']:.4f} at the full budget, {row['mmacs']:.2f} MMACs"
                )
            print(f"exporting trial {report['trial']}: {report['picked_because']}")
            return self._summary(report)
        pick = pick_trial(
            study,
            trial=args.trial,
            policy=args.pick,
            max_latency_ms=args.max_latency_ms,
            max_size_kb=args.max_size_kb,
            max_mmacs=args.max_mmacs,
            latency=remeasured,
        )
        print(f"exporting trial {pick.trial}: {pick.reason}")
        report = export_trial(
            cfg,
            study,
            folder,
            pick.trial,
            reason=pick.reason,
            retrain=args.retrain,
            force=args.force,
            out=Path(args.out) if args.out else None,
        )
        return self._summary(report)

    @staticmethod
    def _summary(report: dict) -> int:
        exported, baseline = report["exported"], report["baseline"]
        latency = exported["latency"]["latency"]
        print(
            f"test accuracy {exported['test_accuracy']:.4f} (baseline {baseline['test_accuracy']:.4f}), "
            f"{exported['mmacs']:.3f} MMACs (baseline {baseline['mmacs']:.3f}), {exported['size_kb']:.1f} KB, "
            f"latency {latency['median_ms']:.3f} ms ({latency['backend']}, {latency['threads']} thread(s), batch 1; "
            f"baseline torch fp32 {baseline['latency']['torch-fp32-eager']['median_ms']:.3f} ms)"
        )
        print(f"wrote {report['folder']} (report.md, report.json, config.yaml, model.pt/json, bundle/)")
        return 0


class BaselineCommand:
    name = "baseline"
    help = "train (or load from cache) the fp32 teacher(s) and print the record"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--space", required=True)
        parser.add_argument("--data-root")
        parser.add_argument("--download", action="store_true")
        parser.add_argument(
            "--jobs",
            type=COUNT,
            default=1,
            help="teachers trained at once, each pinned to its share of the CPUs",
        )
        _add_quiet(parser)

    def take_action(self, args: argparse.Namespace) -> int:
        from pipelines.reference_accuracy import reference_accuracy, reference_warning
        from search.setup import get_teachers, load_data, resolve_augment

        cfg = _load_cfg(args)
        data = load_data(cfg)
        cfg, probe = resolve_augment(cfg, data)
        _, record = get_teachers(cfg, data, threads=cfg.measure.latency_threads, jobs=args.jobs)
        keys = (
            "key",
            "arch",
            "source",
            "val_accuracy",
            "test_accuracy",
            "macs",
            "params",
            "train_seconds",
            "ensemble",
        )
        summary = {key: record[key] for key in keys if key in record}
        summary["augment"] = cfg.baseline.augment
        if probe is not None:
            summary["augment_probe"] = probe["summary"]
        published = reference_accuracy(data.name)
        if published is not None:
            summary["published_resnet18_28_test_accuracy"] = published  # MedMNIST v2, Yang et al. 2023
        print(json.dumps(summary, indent=2))
        warning = reference_warning(data.name, record["test_accuracy"], data.image_size)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        return 0


class ExperimentCommand:
    name = "experiment"
    help = (
        "the quality experiment: exported model vs best single net vs a plain net of equal MACs, over seeds"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study", help="the study folder (results/<study>)")
        parser.add_argument("--trial", type=int, required=True, help="the exported trial")
        parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        parser.add_argument("--threads", type=int, default=1, help="threads of the latency measurements")
        parser.add_argument(
            "--jobs", type=int, default=1, help="(row, seed) pairs run at once, each pinned to its own CPUs"
        )
        parser.add_argument("--out", default=None, help="default <study>/experiment/REPORT.md")
        parser.add_argument(
            "--also",
            type=int,
            nargs="+",
            default=[],
            help="more trials to re-run as rows (e.g. the best MoE)",
        )
        parser.add_argument(
            "--report-only",
            action="store_true",
            help="write the report from the (row, seed) pairs already saved; run nothing",
        )
        parser.add_argument(
            "--single-from",
            default=None,
            help="take the best single compressed net from this study (same data, teachers and budget)",
        )
        _add_quiet(parser)

    def take_action(self, args: argparse.Namespace) -> int:
        from pipelines.errors import ConfigError
        from search.experiment import run
        from search.workspace import resolve_study_dir

        for flag, value in (("--jobs", args.jobs), ("--threads", args.threads)):
            if value < 1:
                raise ConfigError(f"{flag}: {value} must be >= 1.")
        if not args.seeds or any(seed < 0 for seed in args.seeds):
            raise ConfigError(f"--seeds: {args.seeds} must be one or more seeds >= 0.")
        folder = resolve_study_dir(args.study)
        out = Path(args.out) if args.out else folder / "experiment" / "REPORT.md"
        single_from = resolve_study_dir(args.single_from) if args.single_from else None
        path = run(
            folder,
            args.trial,
            args.seeds,
            out,
            args.threads,
            args.jobs,
            tuple(args.also),
            args.report_only,
            single_from,
        )
        print(path.read_text())
        return 0


class PredictCommand:
    name = "predict"
    help = "classify images with an exported bundle (ONNX Runtime or OpenVINO, no torch)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("bundle", help="an export's bundle/ folder (or the export folder)")
        parser.add_argument(
            "inputs",
            nargs="+",
            help="a MedMNIST-style .npz (uses test_images/test_labels, or images/labels) or image files",
        )
        parser.add_argument("--split", default="test", help="which split of an .npz to read (default test)")
        parser.add_argument("--threads", type=COUNT, default=1, help="inference engine threads")
        parser.add_argument(
            "--engine",
            default="onnxruntime",
            help="CPU inference engine: onnxruntime (default) or openvino",
        )
        parser.add_argument("--limit", type=COUNT, help="print at most this many predictions")

    def take_action(self, args: argparse.Namespace) -> int:
        from search.predict import predict_files

        result = predict_files(
            Path(args.bundle),
            [Path(p) for p in args.inputs],
            split=args.split,
            threads=args.threads,
            engine=args.engine,
        )
        for index, (name, label) in enumerate(zip(result["names"], result["labels"], strict=True)):
            if args.limit is not None and index >= args.limit:
                break
            print(f"{name}\t{label}")
        if result.get("accuracy") is not None:
            print(f"accuracy {result['accuracy']:.6f} on {len(result['labels'])} labelled images")
        return 0


class ProfileCommand:
    name = "profile"
    help = "measure this machine's per-kernel latency table (or predict models' latency from a table)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "models", nargs="+", help="ONNX files, bundle folders or study folders whose kernels to profile"
        )
        parser.add_argument("--engine", default="onnxruntime", help="onnxruntime (default) or openvino")
        parser.add_argument("--threads", type=COUNT, default=1, help="engine threads (default 1)")
        parser.add_argument(
            "--repeats", type=COUNT, default=200, help="timed calls per kernel (minimum kept)"
        )
        parser.add_argument(
            "--profile",
            help="the table file (default: <results>/profiles/<cpu>-<engine>-<version>-t<threads>.json)",
        )
        parser.add_argument(
            "--any-cpu",
            action="store_true",
            help="accept a --profile made on another CPU: predict only (nothing is timed), for a cross-device estimate",
        )

    def take_action(self, args: argparse.Namespace) -> int:
        from pipelines.deploy.kernel_profile import profile_kernels
        from pipelines.deploy.latency_model import (
            deployed_kernels,
            kernels_of,
            predict_deployed,
            predict_latency,
        )
        from pipelines.deploy.latency_table import default_table_path, load_table
        from pipelines.deploy.manifest import SINGLE_FILE, read_manifest
        from pipelines.errors import ConfigError
        from search.workspace import results_root

        files: list[Path] = []
        bundles: list[Path] = []
        for text in args.models:
            path = Path(text)
            if path.suffix == ".onnx" and path.is_file():
                files.append(path)
            elif path.is_dir():
                found = sorted(manifest.parent for manifest in path.rglob("manifest.json"))
                bundles += found
                if not found:
                    files += sorted(path.rglob("*.onnx"))
            if not path.exists() or (not files and not bundles):
                raise ConfigError(
                    f"models: {text!r} is not an ONNX file or a folder holding bundles or ONNX files; pass a "
                    "deployed model (e.g. results/<study>/trials/trial_0/bundle)."
                )
        # A bundle is profiled as predict_deployed models it (gate and experts at each views batch; not its
        # one-file model.onnx); a shared-trunk bundle, which it does not model, by its parts' kernels.
        modelled = [bundle for bundle in bundles if read_manifest(bundle).layout == "separate"]
        parts = [
            onnx
            for bundle in bundles
            if bundle not in modelled
            for onnx in sorted(bundle.glob("*.onnx"))
            if onnx.name != SINGLE_FILE
        ]
        table_path = (
            Path(args.profile)
            if args.profile
            else default_table_path(results_root(), args.engine, args.threads)
        )
        table = load_table(table_path, args.engine, args.threads, any_cpu=args.any_cpu)
        if not args.any_cpu:
            kernels = [kernel for path in files + parts for kernel in kernels_of(path)]
            kernels += [kernel for bundle in modelled for kernel in deployed_kernels(bundle)]
            timed = profile_kernels(table, kernels, repeats=args.repeats)
            table.save(table_path)
            print(f"timed {timed} new kernel(s); {len(table.kernels)} in {table_path}")
        for path in files:
            print(f"{path}\tpredicted {predict_latency(path, table):.4f} ms")
        for bundle in modelled:
            print(f"{bundle}\tpredicted {predict_deployed(bundle, table):.4f} ms (bundle, batch 1)")
        for bundle in sorted(set(bundles) - set(modelled)):
            print(f"{bundle}\tnot predicted: a shared-trunk bundle (its parts' kernels were profiled)")
        return 0


class ReportCommand:
    name = "report"
    help = "write one page (Markdown + HTML) with the front, exported points, baseline and settings"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _add_study_arguments(parser)

    def take_action(self, args: argparse.Namespace) -> int:
        from pipelines.errors import ConfigError
        from search.report import write_report
        from search.study import completed_trials

        folder, cfg, study = _open(args)
        if not completed_trials(study):
            raise ConfigError(
                f"study {study.study_name!r} has no completed trials yet. Run `hycomp search` first."
            )
        markdown, page = write_report(cfg, study, folder)
        print(f"wrote {markdown} and {page}")
        return 0


COMMANDS = [
    SearchCommand(),
    FrontCommand(),
    ExportCommand(),
    ExperimentCommand(),
    BaselineCommand(),
    PredictCommand(),
    ProfileCommand(),
    ReportCommand(),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hycomp", description="Hybrid compression search: prune + quantize + MoE, Optuna Pareto front."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="more logging (and tracebacks on errors)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help)
        command.add_arguments(sub)
        sub.set_defaults(handler=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse printed usage and the bad flag (code 2), or --help (code 0)
        return stop.code if isinstance(stop.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if getattr(args, "quiet", False):  # progress is the "hycomp" logger's INFO lines (search.progress)
        log.setLevel(logging.WARNING)
    if args.command not in ("predict", "profile"):  # an inference engine alone: no Optuna, no torch
        import optuna

        from search.workers import quiet_warnings

        # A failed trial's reason is logged once by the objective (and kept in the study); Optuna would
        # repeat it with a full traceback, which only --verbose shows.
        optuna.logging.set_verbosity(optuna.logging.WARNING if args.verbose else optuna.logging.ERROR)
        quiet_warnings()
    from pipelines.errors import HycompError

    try:
        return args.handler.take_action(args)
    except HycompError as error:
        if args.verbose:
            raise
        print(f"hycomp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nhycomp {args.command}: interrupted. Completed trials are saved and the running one is marked "
            "failed; a teacher in training keeps its last finished epoch. Re-run the same command to resume.",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:
        # the reader of stdout stopped (`hycomp front ... | head`): nothing is wrong with the work, so no
        # traceback; stdout goes to devnull so the interpreter's own flush at exit cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
