"""kdsweep's Hydra sweeper: Optuna studies over Hydra overrides, every trial an MLflow run."""
