"""Early-stop replay: what the rule of :mod:`search.early_stop` would have done on finished studies.

    python -m search.benchmarks.early_stop STUDY_FOLDER [STUDY_FOLDER ...] [--min-trials 4 2] \
        [--slack 0.005 0] [--quantile 1.0] [--out results/benchmarks/early_stop.md]

Each trained trial of a study is judged after each of its stages with only the trials completed before it
started (:func:`search.early_stop.replay`). The table counts the trials it would have stopped, after which
stage, the seconds they would have saved, and how many of them are on the study's final front: a safe
rule stops none of those. Studies are opened read-only through their ``config.yaml`` and ``study.db``;
copy a study folder elsewhere first when another process may write it.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path

import optuna

from search.config import EarlyStopSettings
from search.early_stop import Replay, Verdict, replay
from search.study import load_study

__all__ = ["run", "main"]


def _row(name: str, settings: EarlyStopSettings, result: Replay) -> str:
    stages = ", ".join(f"{stage} {count}" for stage, count in result.by_stage().items()) or "-"
    share = result.saved_seconds / result.total_seconds if result.total_seconds else 0.0
    stopped = ", ".join(str(number) for number, _ in result.stopped) or "-"
    return (
        f"| {name} | {settings.min_trials} | {settings.quantile:g} | {settings.slack:g} | {result.judged} | "
        f"{len(result.stopped)} ({stopped}) | {stages} | {result.saved_seconds:.0f} of "
        f"{result.total_seconds:.0f} s ({share:.0%}) | {len(result.stopped_on_front)} |"
    )


def _on_front(verdict: Verdict, values: list[float]) -> str:
    """Why a stopped trial still reached the front: its gain beat the learned one, or latency won."""
    accuracy = values[0]
    why = []
    if accuracy > verdict.reachable:
        why.append(
            f"its final val {accuracy:.4f} beat the reachable {verdict.reachable:.4f} (gain under-learned)"
        )
    if accuracy <= verdict.by_accuracy:
        why.append(
            f"its final val {accuracy:.4f} <= {verdict.by_accuracy:.4f} of trial {verdict.by_trial}: on the front "
            f"by latency ({values[2]:.4f} ms)"
        )
    return " **ON THE FINAL FRONT**: " + "; ".join(why)


def run(
    folders: list[Path],
    min_trials: list[int],
    slacks: list[float],
    quantile: float = 1.0,
) -> tuple[str, list[Replay]]:
    """The Markdown table of every (study, min_trials, slack), and the replays in that order."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lines = [
        "| study | min_trials | quantile | slack | trained trials judged | stopped (trials) | after stage "
        "| seconds saved | stopped but on the final front |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    results, reasons = [], []
    for folder in folders:
        _, study = load_study(folder)
        for minimum, slack in itertools.product(min_trials, slacks):
            settings = EarlyStopSettings(min_trials=minimum, quantile=quantile, slack=slack)
            result = replay(study, settings)
            results.append(result)
            lines.append(_row(folder.name, settings, result))
            final = {trial.number: trial.values for trial in study.get_trials(deepcopy=False) if trial.values}
            reasons += [
                f"- {folder.name} trial {number}: {verdict.reason}"
                + (_on_front(verdict, final[number]) if number in result.stopped_on_front else "")
                for number, verdict in result.stopped
            ]
    if reasons:
        lines += ["", "Reasons:", "", *sorted(set(reasons))]
    return "\n".join(lines) + "\n", results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="study folders (config.yaml + study.db)")
    parser.add_argument("--min-trials", nargs="+", type=int, default=[EarlyStopSettings.min_trials])
    parser.add_argument("--slack", nargs="+", type=float, default=[EarlyStopSettings.slack])
    parser.add_argument("--quantile", type=float, default=EarlyStopSettings.quantile)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    table, _ = run(args.folders, args.min_trials, args.slack, args.quantile)
    command = "python -m search.benchmarks.early_stop " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    text = f"Command: `{command}`\n\n{table}"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
