"""Expert-training benchmark: a study's trials trained again with ``moe.expert_training`` joint and group
(same configuration, trial budget and seed), with the validation accuracy after every stage.

    python -m search.benchmarks.expert_training --study results/shared-trunk --trials 27 10 18 \
        [--data-root ../shared/data] [--layouts shared separate] [--threads 1] [--out rows.json]

Both modes run here, one after the other, so the comparison is like for like; the study's stored stage
accuracies are printed beside them as a sanity check (joint should land close to them). The study folder
is only read: its study.db is opened from a temporary copy, and the teachers and distillation targets
come from the results root's baselines/ (cached by the search that made the study).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipelines.data import Split
from pipelines.errors import ConfigError
from pipelines.moe import EXPERT_TRAININGS, MixtureOfExperts
from search.config import load_config
from search.evaluation import train_model
from search.record import TrialRecord
from search.setup import load_data, trial_context
from search.study import load_study

__all__ = ["study_parameters", "run", "main"]

STAGES = ("finetuned", "moe", "quantized")


def study_parameters(study: Path, trials: list[int]) -> dict[int, tuple[dict, dict]]:
    """(parameters, stored stage accuracies) of each of ``trials`` of the study in ``study``, read from a
    temporary copy of its storage so that the study itself is never opened for writing."""
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("config.yaml", "study.db"):
            shutil.copy2(study / name, Path(scratch) / name)
        _, optuna_study = load_study(Path(scratch))
        found = {}
        for trial in optuna_study.get_trials(deepcopy=False):
            if trial.number in trials:
                record = TrialRecord.of(trial)
                stored = record.training.stage_val_accuracy if record.training else {}
                found[trial.number] = (record.parameters(trial.params), dict(stored))
    missing = sorted(set(trials) - set(found))
    if missing:
        raise ConfigError(
            f"--trials: {missing} are not trials of the study at {study}; pick from its trials."
        )
    return found


@torch.no_grad()
def routing_diagnostics(moe: MixtureOfExperts, val: Split) -> dict[str, float]:
    """Where the trained MoE's errors come from: ``routed_to_group``, the share of ``val`` whose first choice
    is the expert of its label's class group, and ``oracle``, the accuracy when every image goes to that
    expert alone (routing by label, what group training trains for)."""
    moe.eval()
    groups = torch.as_tensor(moe.class_to_expert)
    routed = correct = 0
    for images, labels in val.batches(512):
        target = groups[labels]
        _, top_index, _ = moe.route(images)
        routed += int((top_index[:, 0] == target).sum())
        features = moe.expert_input(images)
        for expert_id, expert in enumerate(moe.experts):
            rows = torch.nonzero(target == expert_id).flatten()
            if len(rows):
                correct += int((expert(features[rows]).argmax(dim=1) == labels[rows]).sum())
    return {"routed_to_group": routed / len(val), "oracle": correct / len(val)}


def run(
    study: Path, trials: list[int], layouts: list[str] | None, data_root: str | None, threads: int
) -> list[dict]:
    """One row per trial, layout and expert training: the stage accuracies on validation and the seconds."""
    torch.set_num_threads(threads)
    cfg = load_config(study / "config.yaml", source="study folder")
    if data_root is not None:
        cfg = cfg.replace(data={"root": data_root})
    configurations = study_parameters(study, trials)
    data = load_data(cfg)
    ctx, _ = trial_context(cfg, data, study)
    rows = []
    for number in trials:
        params, stored = configurations[number]
        for layout in layouts or [params.get("layout", "separate")]:
            for mode in EXPERT_TRAININGS:
                changed = {**params, "layout": layout, "expert_training": mode}
                started = time.perf_counter()
                model = train_model(ctx, changed, cfg.trial, cfg.seed, f"trial {number} {layout} {mode}")
                row = {
                    "trial": number,
                    "layout": layout,
                    "expert_training": mode,
                    **{stage: model.training.stage_val_accuracy.get(stage) for stage in STAGES},
                    **routing_diagnostics(model.moe, data.val),
                    "stored": stored if layout == params.get("layout", "separate") else {},
                    "seconds": time.perf_counter() - started,
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table: joint and group side by side per trial and layout."""
    lines = [
        "| trial | layout | training | finetuned | moe | quantized | routed to group | oracle "
        "| study's joint (moe / quantized) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        stored = row["stored"]
        study_value = f"{stored['moe']:.4f} / {stored['quantized']:.4f}" if stored else "-"
        lines.append(
            f"| {row['trial']} | {row['layout']} | {row['expert_training']} | {row['finetuned']:.4f} | "
            f"{row['moe']:.4f} | {row['quantized']:.4f} | {row['routed_to_group']:.4f} | {row['oracle']:.4f} | "
            f"{study_value} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="a study folder (config.yaml, study.db)")
    parser.add_argument("--trials", type=int, nargs="+", required=True)
    parser.add_argument("--layouts", nargs="+", help="train each trial in these layouts (default: its own)")
    parser.add_argument("--data-root", help="where the data is, if not where the study's config says")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args.study, args.trials, args.layouts, args.data_root, args.threads)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
