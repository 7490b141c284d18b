"""Training-time augmentation of whole batches on the training device, with kornia and torchvision ops.

A model's ``augment`` setting maps op names to their settings, for example
``student.augment: {rotate: {degrees: 30}, noise: {std: 0.2}}``. The presets of
``conf/augment_presets`` fill it in from ``augment=none|light|heavy`` (the student) and
``teacher_augment=...`` (the teacher).

The ops work on the images' pixel values in [0, 1]: each batch is un-standardised first and
standardised again after the ops, so a noise level or an erased patch means the same on every
dataset. They run in a fixed order, whatever the order of the setting: the geometric ops, then the
intensity ops, then erasing, then MixUp or CutMix. Every op draws its own random parameters for
every sample of the batch (MixUp and CutMix draw one mixing weight per batch, as in their papers)
from torch's global generator, which Lightning seeds with the run's seed, so an augmented run
repeats exactly on CPU. Validation and test batches are never augmented.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import kornia.augmentation as K
import torch
from torch import nn
from torchvision.transforms import v2


@dataclass(frozen=True)
class Setting:
    """One setting of an op: its default and a check that returns what is allowed, or None if valid."""

    default: Any
    check: Callable[[Any, Sequence[int]], Optional[str]]


def _number_in(low: float, high: float, *, low_open: bool = True, high_open: bool = False):
    def check(value: Any, input_shape: Sequence[int]) -> Optional[str]:
        allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return allowed
        above_low = value > low if low_open else value >= low
        below_high = value < high if high_open else value <= high
        return None if above_low and below_high else allowed
    return check


def _positive(value: Any, input_shape: Sequence[int]) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return "a number > 0"
    return None


def _pixels_below_half_side(*, whole: bool):
    def check(value: Any, input_shape: Sequence[int]) -> Optional[str]:
        half = min(input_shape[-2:]) / 2
        kind = "a whole number of pixels" if whole else "a number of pixels"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
                or not 0 < value < half:
            return f"{kind} > 0 and below half the image side ({half:g} for {input_shape[-2]}x{input_shape[-1]} images)"
        return None
    return check


# The ops an augment setting may name, in the order they run, with their settings.
OPS: dict[str, dict[str, Setting]] = {
    # Pad by `padding` pixels (reflecting the border), then crop back to the image size at a random offset.
    "crop": {"padding": Setting(4, _pixels_below_half_side(whole=True))},
    # Mirror left to right with probability p.
    "flip": {"p": Setting(0.5, _number_in(0, 1))},
    # Shift along each axis by up to `fraction` of the side, or by up to `pixels` pixels.
    "translate": {"fraction": Setting(None, _number_in(0, 0.5, high_open=True)),
                  "pixels": Setting(None, _pixels_below_half_side(whole=False))},
    # Rotate by an angle drawn from [-degrees, degrees].
    "rotate": {"degrees": Setting(15, _number_in(0, 180))},
    # Zoom by a factor drawn from [min, max].
    "scale": {"min": Setting(0.9, _number_in(0, 4)), "max": Setting(1.1, _number_in(0, 4))},
    # TrivialAugment: one op per image from trivial_augment_ops(), at a magnitude drawn from its range.
    "trivial_augment": {},
    # Add Gaussian noise of standard deviation std, in pixel-value units.
    "noise": {"std": Setting(0.1, _number_in(0, 1))},
    # With probability p, blank a rectangle of 2% to max_area of the image.
    "erase": {"p": Setting(0.5, _number_in(0, 1)), "max_area": Setting(0.25, _number_in(0.02, 1, high_open=True))},
    # Mix pairs of images and their labels with a weight drawn from Beta(alpha, alpha).
    "mixup": {"alpha": Setting(0.2, _positive)},
    # Paste a box of one image into another, labels weighted by area, the area drawn from Beta(alpha, alpha).
    "cutmix": {"alpha": Setting(1.0, _positive)},
}
# Ops that assume colour photographs: a flipped digit is another symbol or none, and TrivialAugment
# includes colour ops (saturation) that need three channels.
COLOUR_ONLY_OPS = ("flip", "trivial_augment")
MIXING_OPS = ("mixup", "cutmix")


def trivial_augment_ops() -> list[nn.Module]:
    """Return the TrivialAugment candidates (Müller and Hutter, 2021), with the magnitude ranges of
    kornia 0.9's RandAugment policy, except sharpness (narrowed to [0.1, 0.9]) and no solarize_add.

    Each candidate applies to every image it is given (p = 1) and draws its magnitude uniformly per image.
    """
    return [
        nn.Identity(),
        K.RandomAutoContrast(p=1.0),
        K.RandomEqualize(p=1.0),
        K.RandomAffine(degrees=30.0, p=1.0),
        K.RandomPosterize(bits=(4.0, 8.0), p=1.0),
        K.RandomSolarize(thresholds=0.5, additions=0.0, p=1.0),
        K.RandomSaturation(saturation=(0.1, 1.9), p=1.0),
        K.RandomContrast(contrast=(0.1, 1.9), p=1.0),
        K.RandomBrightness(brightness=(0.1, 1.9), p=1.0),
        K.RandomSharpness(sharpness=(0.1, 0.9), p=1.0),
        K.RandomShear(shear=(-17.0, 17.0, 0.0, 0.0), p=1.0),
        K.RandomShear(shear=(0.0, 0.0, -17.0, 17.0), p=1.0),
        K.RandomAffine(degrees=0.0, translate=(0.1, 0.0), p=1.0),
        K.RandomAffine(degrees=0.0, translate=(0.0, 0.1), p=1.0),
    ]


class OnePerSample(nn.Module):
    """Apply to each image one of ``ops``, drawn uniformly and independently per image.

    kornia's TrivialAugment and RandAugment (0.9) draw their ops once per batch, but this draws the op
    per image. The draws come from torch's CPU generator, so they are the same on every device.
    """

    def __init__(self, ops: Sequence[nn.Module]) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        choices = torch.randint(len(self.ops), (len(images),))
        output = images.clone()
        for index, op in enumerate(self.ops):
            rows = (choices == index).nonzero().squeeze(1).to(images.device)
            if len(rows):
                output[rows] = op(images[rows]).to(images.dtype)
        return output


class BatchAugmentation(nn.Module):
    """Augment a standardised batch: image ops in pixel space, then MixUp or CutMix on images and labels.

    ``forward(inputs, labels)`` returns the augmented inputs and the labels: class indices, or
    class probabilities (the mixed labels) when a mixing op is set.
    """

    def __init__(self, image_ops: Sequence[nn.Module], mixing: Optional[nn.Module], mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.image_ops = nn.Sequential(*image_ops) if image_ops else None
        self.mixing = mixing
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.image_ops is not None:
            pixels = inputs * self.std + self.mean
            inputs = ((self.image_ops(pixels) - self.mean) / self.std).to(inputs.dtype)
        if self.mixing is not None:
            inputs, labels = self.mixing(inputs, labels)
        return inputs, labels


def build_augmentation(settings: Optional[Mapping[str, Any]], input_shape: Sequence[int], num_classes: int,
                       key: str, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)
                       ) -> Optional[BatchAugmentation]:
    """Build the augmentation that ``settings`` describes for images of ``input_shape`` (C, H, W).

    ``mean`` and ``std`` are the per-channel statistics that standardised the images. Return None
    when ``settings`` is empty. Raise ValueError naming ``key`` (the setting's dotted path, such as
    ``student.augment``) for an unknown op, an invalid value or an op that does not suit the data.
    """
    if not settings:
        return None
    if not isinstance(settings, Mapping):
        raise ValueError(f"{key}={settings!r}: give a mapping of op names to their settings, "
                         f"e.g. {{rotate: {{degrees: 15}}}}")
    options = {name: _checked_options(name, settings[name], input_shape, f"{key}.{name}") for name in settings}
    image_ops = [_image_op(name, options[name], input_shape) for name in OPS
                 if name in options and name not in MIXING_OPS]
    mixers = [(v2.MixUp if name == "mixup" else v2.CutMix)(alpha=float(options[name]["alpha"]), num_classes=num_classes)
              for name in MIXING_OPS if name in options]
    mixing = None
    if len(mixers) == 1:
        mixing = mixers[0]
    elif len(mixers) > 1:  # MixUp and CutMix: one of the two per batch.
        mixing = v2.RandomChoice(mixers)
    return BatchAugmentation(image_ops, mixing, mean, std)


def _checked_options(name: str, options: Any, input_shape: Sequence[int], key: str) -> dict[str, Any]:
    if name not in OPS:
        raise ValueError(f"{key}: unknown augmentation op; choose from {', '.join(OPS)}")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{key}={options!r}: give the op's settings as a mapping, e.g. {{}} for its defaults")
    schema = OPS[name]
    unknown = sorted(set(options) - set(schema))
    if unknown:
        takes = f"it takes {', '.join(schema)}" if schema else "it takes no settings"
        raise ValueError(f"{key}.{unknown[0]}: unknown setting of op {name}; {takes}")
    channels = input_shape[0]
    if name in COLOUR_ONLY_OPS and channels != 3:
        raise ValueError(f"{key}: op {name} suits colour (3-channel) photographs only, and this data has {channels} "
                         f"channel(s); the ops for it are {', '.join(op for op in OPS if op not in COLOUR_ONLY_OPS)}")
    values = {setting: options.get(setting, spec.default) for setting, spec in schema.items()}
    for setting, value in values.items():
        if value is None:
            continue
        problem = schema[setting].check(value, input_shape)
        if problem:
            raise ValueError(f"{key}.{setting}={value!r}: must be {problem}")
    if name == "translate" and (values["fraction"] is None) == (values["pixels"] is None):
        raise ValueError(f"{key}={dict(options)!r}: give exactly one of fraction and pixels")
    if name == "scale" and values["min"] > values["max"]:
        raise ValueError(f"{key}.min={values['min']!r}: must not exceed {key}.max={values['max']!r}")
    return values


def _image_op(name: str, options: dict[str, Any], input_shape: Sequence[int]) -> nn.Module:
    height, width = input_shape[-2:]
    if name == "crop":
        return K.RandomCrop((height, width), padding=options["padding"], padding_mode="reflect")
    if name == "flip":
        return K.RandomHorizontalFlip(p=options["p"])
    if name == "translate":
        # The uncovered border repeats the edge pixels: background in digit images, so no band is added.
        if options["fraction"] is not None:
            shift = (options["fraction"], options["fraction"])
        else:
            shift = (options["pixels"] / width, options["pixels"] / height)
        return K.RandomAffine(degrees=0.0, translate=shift, padding_mode="border", p=1.0)
    if name == "rotate":
        return K.RandomAffine(degrees=float(options["degrees"]), p=1.0)
    if name == "scale":
        return K.RandomAffine(degrees=0.0, scale=(float(options["min"]), float(options["max"])), p=1.0)
    if name == "trivial_augment":
        return OnePerSample(trivial_augment_ops())
    if name == "noise":
        return K.RandomGaussianNoise(std=float(options["std"]), p=1.0)
    if name == "erase":
        return K.RandomErasing(scale=(0.02, float(options["max_area"])), p=float(options["p"]))
    raise AssertionError(f"no image op named {name}")
