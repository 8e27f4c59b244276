"""Pictures of the front: a PNG with matplotlib (2-D projections) and Optuna's interactive plotly views."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd

__all__ = ["plot_front_png", "plot_front_html"]


def _staircase(points: pd.DataFrame, column: str) -> pd.DataFrame:
    """The 2-D non-dominated subset (lower ``column``, higher accuracy), sorted by ``column``."""
    best, keep = -1.0, []
    for index, row in points.sort_values([column, "val_accuracy"], ascending=[True, False]).iterrows():
        if row["val_accuracy"] > best:
            keep.append(index)
            best = row["val_accuracy"]
    return points.loc[keep]


def plot_front_png(table: pd.DataFrame, baseline: dict | None, path: Path) -> Path:
    """Accuracy against MMACs and against latency. Trials on the 3-objective front are coloured by
    their number of experts and labelled; the line is the front of that 2-D projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    threads = int(table["latency_threads"].iloc[0]) if not table.empty else 1
    engine = str(table["engine"].iloc[0]).split()[0] if not table.empty else "onnxruntime"
    panels = (
        (axes[0], "mmacs", "MMACs per input (gate + top-k experts), log scale"),
        (axes[1], "latency_ms", f"latency ms ({engine}, {threads} thread, batch 1), log scale"),
    )
    colours = {1: "tab:blue", 2: "tab:orange", 3: "tab:green", 4: "tab:red"}
    for axis, column, label in panels:
        if not table.empty:
            dominated = table[~table["on_front"]]
            front = table[table["on_front"]]
            axis.scatter(
                dominated[column],
                100 * dominated["val_accuracy"],
                c="0.7",
                s=20,
                label="dominated (3 objectives)",
            )
            stair = _staircase(front, column)
            axis.step(stair[column], 100 * stair["val_accuracy"], where="post", c="0.3", lw=1, alpha=0.6)
            for experts, group in front.groupby("num_experts"):
                axis.scatter(
                    group[column],
                    100 * group["val_accuracy"],
                    s=55,
                    edgecolors="black",
                    linewidths=0.6,
                    c=colours.get(int(experts), "tab:purple"),
                    label=f"front, {int(experts)} expert(s)",
                    zorder=3,
                )
            for _, row in front.iterrows():
                axis.annotate(
                    f"#{int(row['trial'])}",
                    (row[column], 100 * row["val_accuracy"]),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=8,
                )
        if baseline is not None:
            x = baseline["macs"] / 1e6 if column == "mmacs" else baseline["latency"]["median_ms"]
            where = "" if column == "mmacs" else " (torch fp32 eager)"
            axis.scatter(
                [x],
                [100 * baseline["val_accuracy"]],
                marker="*",
                s=180,
                c="gold",
                edgecolors="black",
                label=f"fp32 teacher{where}",
                zorder=4,
            )
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, _pos: ""))
        axis.set_xlabel(label)
        axis.set_ylabel("validation accuracy %")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle("hycomp: accuracy vs compute and latency (int8 engine for quantized trials)")
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
