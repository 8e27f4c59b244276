"""Pictures of the front: a PNG with matplotlib (2-D projections) and Optuna's interactive plotly views."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd

__all__ = ["plot_front_png", "plot_front_html"]


def plot_front_png(table: pd.DataFrame, baseline: dict | None, path: Path) -> Path:
    """Accuracy against MMACs and against latency; the front is joined and labelled by trial number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    backend = ""
    if not table.empty:
        backend = f"{table['latency_backend'].iloc[0]}, {table['latency_threads'].iloc[0]} thread(s), batch 1"
    for axis, column, label in (
        (axes[0], "mmacs", "MMACs per input (gate + top-k experts)"),
        (axes[1], "latency_ms", f"latency ms ({backend})"),
    ):
        others = table[~table["on_front"]] if not table.empty else table
        front = table[table["on_front"]].sort_values(column) if not table.empty else table
        if not others.empty:
            axis.scatter(
                others[column], 100 * others["val_accuracy"], c="0.65", s=22, label="dominated trials"
            )
        if not front.empty:
            axis.plot(
                front[column],
                100 * front["val_accuracy"],
                "o-",
                c="tab:blue",
                ms=6,
                label="Pareto front (3 objectives)",
            )
            for _, row in front.iterrows():
                axis.annotate(
                    str(int(row["trial"])),
                    (row[column], 100 * row["val_accuracy"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
        if baseline is not None and column == "mmacs":
            axis.scatter(
                [baseline["macs"] / 1e6],
                [100 * baseline["val_accuracy"]],
                marker="*",
                s=160,
                c="tab:red",
                label="fp32 teacher",
            )
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("validation accuracy %")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle("hycomp search: accuracy vs compute and latency")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_front_html(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's plotly Pareto-front (3-D) and hypervolume-free history views as HTML files."""
    from optuna.visualization import plot_pareto_front

    written = []
    names = ["val accuracy", "MMACs", "latency ms"]
    figure = plot_pareto_front(study, target_names=names, include_dominated_trials=True)
    path = folder / "front_3d.html"
    figure.write_html(str(path), include_plotlyjs="cdn")
    written.append(path)
    for pair, suffix in (((0, 1), "acc_macs"), ((0, 2), "acc_latency")):
        figure = plot_pareto_front(
            study,
            targets=lambda trial, p=pair: tuple(trial.values[i] for i in p),
            target_names=[names[i] for i in pair],
        )
        path = folder / f"front_{suffix}.html"
        figure.write_html(str(path), include_plotlyjs="cdn")
        written.append(path)
    return written
