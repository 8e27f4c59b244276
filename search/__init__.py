"""hycomp's Optuna layer: search spaces, the trial objective, studies, the Pareto front, export, CLI."""
