"""Built-in networks, and the builder that fits any ``torch.nn.Module`` to a dataset's shapes."""

import inspect
import math
from collections.abc import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn


class MLP(nn.Module):
    """A fully connected classifier: flatten, then Linear-ReLU(-Dropout) blocks, then a linear head."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_sizes: Sequence[int] = (256,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_architecture(hidden_sizes, "hidden_sizes", dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv-BatchNorm-ReLU-MaxPool blocks, then one hidden linear layer with dropout and a head.

    Each block halves the height and width, so the input must be at least 2^len(channels) pixels
    on each side (8x8 digits allow up to 3 blocks).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden_size: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_architecture([*channels, hidden_size], "channels and hidden_size", dropout)
        if not channels:
            raise ValueError("channels is empty; give at least one convolution block, e.g. [32, 64]")
        in_channels, height, width = input_shape
        blocks: list[nn.Module] = []
        for out_channels in channels:
            blocks += [
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(
                f"SmallCNN with {len(channels)} blocks needs inputs of at least "
                f"{2 ** len(channels)}x{2 ** len(channels)} pixels, got {tuple(input_shape)}"
            )
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * height * width, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _check_architecture(widths: Sequence[int], name: str, dropout: float) -> None:
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{name} must be whole numbers >= 1, got {list(widths)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def build_model(model_cfg: DictConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Instantiate ``model_cfg`` (a Hydra ``_target_`` node) for a dataset's input shape and classes.

    ``input_shape`` and ``num_classes`` are passed only to constructors that accept them (by name
    or through ``**kwargs``) and that the config does not set itself, so any ``torch.nn.Module``
    can be plugged in.
    """
    factory = instantiate(model_cfg, _partial_=True)
    parameters = inspect.signature(factory.func).parameters
    takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    configured = set(OmegaConf.to_container(model_cfg).keys())

    extra = {}
    for name, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if name not in configured and (name in parameters or takes_any_keyword):
            extra[name] = value
    model = factory(**extra)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{model_cfg._target_} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class StandardizedClassifier(nn.Module):
    """A trained network behind the standardisation of its training data, so that it takes raw pixels.

    kdsweep trains on images standardised with the training split's per-channel mean and standard
    deviation. This wrapper applies them first, so the logged and exported models take images
    of the dataset's shape with pixel values in [0, 1] and return one logit per class.
    """

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network((pixels - self.mean) / self.std)
