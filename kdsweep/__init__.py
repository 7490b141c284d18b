"""kdsweep: knowledge distillation sweeps on PyTorch Lightning, Hydra, Optuna and MLflow."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def default_precision(accelerator: str) -> str:
    """Return bf16-mixed for a CUDA GPU that supports bfloat16 (Ampere and later), else 32-true.

    The configs use it as ``${kdsweep_precision:${trainer.accelerator}}``. CPUs keep 32-bit
    precision: bf16 autocast made a CPU training step slower, not faster.
    """
    if accelerator not in ("auto", "gpu", "cuda"):
        return "32-true"
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


OmegaConf.register_new_resolver("kdsweep_precision", default_precision, replace=True)
