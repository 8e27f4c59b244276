"""The search's progress on the terminal: a tqdm bar over evaluated trials with its ETA, and one line per
finished trial (an Optuna callback)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from pipelines.hybrid import DEFAULT_EXPERT_INIT
from pipelines.moe import DEFAULT_ROUTING
from search.record import TrialRecord

__all__ = ["Progress"]


class Progress:
    """A tqdm bar over completed trials with ETA, plus a one-line summary per trial."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total, initial=done, unit="trial", desc="search", disable=not enabled, dynamic_ncols=True
        )
        self._tqdm = tqdm

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        record = TrialRecord.of(trial)
        if trial.state == TrialState.COMPLETE and record.is_repeat:
            self._tqdm.write(
                f"trial {trial.number}: same configuration as trial {record.repeat_of}; result reused (not counted)"
            )
        elif trial.state == TrialState.COMPLETE:
            self._bar.update(1)
            accuracy, mmacs, latency = trial.values
            stages = ", ".join(f"{key} {value:.0f}s" for key, value in record.seconds.items())
            self._tqdm.write(
                f"trial {trial.number}: val {accuracy:.4f}  {mmacs:.2f} MMACs  {latency:.3f} ms  "
                f"[{_describe(record.parameters(trial.params))}]  ({stages})"
            )
        else:
            reason = record.fail_reason or trial.state.name
            self._tqdm.write(f"trial {trial.number}: {trial.state.name} - {reason}")

    def close(self) -> None:
        self._bar.close()


def _describe(config: dict) -> str:
    text = (
        f"{config.get('pruner')} {config.get('sparsity', 0):.2f}, {config.get('bits')}-bit, "
        f"{config.get('num_experts')} expert(s) top-{config.get('effective_top_k', config.get('top_k'))}, gate {config.get('gate_size')}"
    )
    if config.get("num_experts", 1) > 1:
        text += f", {config.get('routing', DEFAULT_ROUTING)} routing, experts from {config.get('expert_init', DEFAULT_EXPERT_INIT)}"
    return text
