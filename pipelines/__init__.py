"""hycomp's torch layer: data, models, training, compression stages, MoE, measurement, deployment.

Knows nothing of Optuna or of the ``search`` package (dependencies run search -> pipelines)."""
