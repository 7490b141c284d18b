"""kdsweep: knowledge distillation sweeps on PyTorch Lightning, Hydra, Optuna and MLflow."""

__version__ = "0.1.0"
