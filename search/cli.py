"""The ``hycomp`` command line: a table of commands, each with ``add_arguments`` and ``take_action``.

    hycomp search   --space search_spaces/bloodmnist.yaml [--data-root DIR] [--storage URL] [--trials N]
    hycomp baseline --space … [--jobs N]          train / load the cached fp32 teacher(s), N at a time
    hycomp front    results/<study>                Pareto front: table, front.csv, front.png, HTML views
    hycomp export   results/<study> --trial N | --pick knee | --max-latency-ms X …
    hycomp predict  BUNDLE IMAGES.npz|IMAGE…      run an exported bundle with ONNX Runtime alone

Bad input exits with code 2 and one message naming the field, the value and the fix (no traceback).
Ctrl-C stops cleanly: the running trial is marked failed, completed ones are kept; re-run to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("hycomp")


def _load_cfg(args: argparse.Namespace):
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
        for key in ("max_latency_ms", "max_size_kb", "min_accuracy", "max_mmacs")
        if getattr(args, key, None) is not None
    }
    if constraints:
        overrides["constraints"] = constraints
    return cfg.replace(**overrides) if overrides else cfg


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
            "--trials", type=int, help="number of completed trials to reach (overrides study.trials)"
        )
        parser.add_argument("--study-name", help="overrides study.name")
        parser.add_argument("--sampler", help="tpe | nsga2 | gp | random (overrides study.sampler.name)")
        parser.add_argument("--seed", type=int, help="overrides the global seed")
        parser.add_argument("--max-latency-ms", type=float, help="constraint: latency budget")
        parser.add_argument("--max-size-kb", type=float, help="constraint: packed size budget")
        parser.add_argument("--max-mmacs", type=float, help="constraint: compute budget")
        parser.add_argument(
            "--min-accuracy", type=float, help="constraint: minimum validation accuracy (0..1)"
        )
        parser.add_argument(
            "--workers", type=int, default=1, help="worker processes on this machine sharing the study"
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
        _add_quiet(parser)

    def take_action(self, args: argparse.Namespace) -> int:
        from search.study import completed_trials, evaluated_trials, run_search
        from search.workspace import study_dir

        cfg = _load_cfg(args)
        if args.trials is not None and args.trials < 1:
            from pipelines.errors import ConfigError

            raise ConfigError(f"--trials: {args.trials} must be a positive number of trials.")
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
    help = "show the Pareto front (table, CSV, PNG, HTML)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _add_study_arguments(parser)
        parser.add_argument(
            "--all", action="store_true", help="show every completed trial, not only the front"
        )

    def take_action(self, args: argparse.Namespace) -> int:
        from pipelines.errors import ConfigError
        from search.pareto import failures_table, format_table, front_table, repeat_count, trials_table
        from search.plots import plot_front_html, plot_front_png

        folder, cfg, study = _open(args)
        table = trials_table(study)
        if table.empty:
            raise ConfigError(
                f"study {study.study_name!r} in {folder} has no completed trials yet. Run `hycomp search` first."
            )
        front = front_table(study)
        baseline = study.user_attrs.get("baseline")
        shown = table.sort_values("val_accuracy", ascending=False) if args.all else front
        repeats = repeat_count(table)
        reused = f", +{repeats} repeated configuration(s)" if repeats else ""
        print(
            f"Pareto front of {study.study_name} ({len(front)} of {len(table) - repeats} completed trials{reused}; "
            "objectives: val acc max, MMACs min, latency min)"
        )
        print(format_table(shown, baseline))
        threads = int(table["latency_threads"].iloc[0])
        print(
            f"latency: median batch-1 ms on ONNX Runtime ({threads} thread(s)), precision in column 'engine'; "
            "teacher row: torch fp32 eager. MACs per input = gate + top_k experts (FLOPs = 2 x MACs)."
        )
        failures = failures_table(study)
        if not failures.empty:
            print(f"\n{len(failures)} failed/rejected trial(s):")
            print(failures.to_string(index=False, max_colwidth=120))
        table.to_csv(folder / "trials.csv", index=False)
        front.to_csv(folder / "front.csv", index=False)
        png = plot_front_png(table, baseline, folder / "front.png")
        html = plot_front_html(study, folder)
        print(
            f"\nwrote {folder / 'front.csv'}, {folder / 'trials.csv'}, {png}, {', '.join(str(p) for p in html)}"
        )
        return 0


class ExportCommand:
    name = "export"
    help = "materialize one trial: model, ONNX bundle, config and report"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _add_study_arguments(parser)
        parser.add_argument("--trial", type=int, help="trial number to export")
        parser.add_argument(
            "--pick", help="max-accuracy | knee | min-latency | min-macs (default max-accuracy)"
        )
        parser.add_argument("--max-latency-ms", type=float, help="best accuracy within this latency")
        parser.add_argument("--max-size-kb", type=float, help="best accuracy within this size")
        parser.add_argument("--max-mmacs", type=float, help="best accuracy within this compute")
        parser.add_argument(
            "--retrain", action="store_true", help="re-compress the configuration at the full export budget"
        )
        parser.add_argument(
            "--candidates",
            type=int,
            default=1,
            help="with --retrain: retrain this many of the most accurate front trials within the budget at "
            "the full budget and export the best on validation (the cheap trial budget can misrank them)",
        )
        parser.add_argument(
            "--jobs",
            type=int,
            default=1,
            help="candidates retrained at once, each in its own process and CPUs",
        )
        parser.add_argument("--force", action="store_true", help="overwrite an existing export folder")
        parser.add_argument("--out", help="export folder (default results/<study>/export/trial_<n>)")
        parser.add_argument("--data-root", help="folder holding the dataset file")
        _add_quiet(parser)

    def take_action(self, args: argparse.Namespace) -> int:
        from pipelines.errors import ConfigError
        from search.export import export_best, export_trial
        from search.pareto import pick_candidates, pick_trial

        folder, cfg, study = _open(args)
        if args.data_root:
            cfg = cfg.replace(data={"root": args.data_root})
        elif cfg.data.root is None and os.environ.get("HYCOMP_DATA_ROOT"):
            cfg = cfg.replace(data={"root": os.environ["HYCOMP_DATA_ROOT"]})
        if args.candidates != 1 or args.jobs != 1:
            if args.candidates < 1 or args.jobs < 1:
                raise ConfigError(
                    f"--candidates {args.candidates} / --jobs {args.jobs}: both must be at least 1."
                )
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
            type=int,
            default=1,
            help="teachers trained at once, each pinned to its share of the CPUs",
        )
        _add_quiet(parser)

    def take_action(self, args: argparse.Namespace) -> int:
        from pipelines.errors import ConfigError
        from pipelines.reference_accuracy import reference_accuracy, reference_warning
        from search.setup import get_teachers, load_data, resolve_augment

        if args.jobs < 1:
            raise ConfigError(f"--jobs: {args.jobs} must be >= 1.")
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


class PredictCommand:
    name = "predict"
    help = "classify images with an exported bundle (ONNX Runtime only)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("bundle", help="an export's bundle/ folder (or the export folder)")
        parser.add_argument(
            "inputs",
            nargs="+",
            help="a MedMNIST-style .npz (uses test_images/test_labels, or images/labels) or image files",
        )
        parser.add_argument("--split", default="test", help="which split of an .npz to read (default test)")
        parser.add_argument("--threads", type=int, default=1)
        parser.add_argument("--limit", type=int, help="print at most this many predictions")

    def take_action(self, args: argparse.Namespace) -> int:
        from search.predict import predict_files

        result = predict_files(
            Path(args.bundle), [Path(p) for p in args.inputs], split=args.split, threads=args.threads
        )
        for index, (name, label) in enumerate(zip(result["names"], result["labels"], strict=True)):
            if args.limit is not None and index >= args.limit:
                break
            print(f"{name}\t{label}")
        if result.get("accuracy") is not None:
            print(f"accuracy {result['accuracy']:.6f} on {len(result['labels'])} labelled images")
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
    BaselineCommand(),
    PredictCommand(),
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if getattr(args, "quiet", False):  # progress is the "hycomp" logger's INFO lines (search.progress)
        log.setLevel(logging.WARNING)
    if args.command != "predict":  # predict runs on ONNX Runtime alone: no Optuna, no torch
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


if __name__ == "__main__":
    sys.exit(main())
