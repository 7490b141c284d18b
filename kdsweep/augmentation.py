"""Training-time augmentation of whole batches on the training device, with kornia's ops.

A model's ``augment`` setting maps op names to their settings, for example
``teacher.augment: {translate: {pixels: 2}}``. Each op draws its own random parameters for every
sample of the batch from torch's global generator, which Lightning seeds with the run's seed, so
an augmented run repeats exactly on CPU. Validation and test batches are never augmented.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import kornia.augmentation as K
from torch import nn

# The ops that an augment setting may name, with the settings each accepts.
OPS = {"translate": ("pixels",)}


def build_augmentation(settings: Optional[Mapping[str, Any]], input_shape: Sequence[int],
                       key: str) -> Optional[nn.Module]:
    """Build the augmentation that ``settings`` describes for images of ``input_shape`` (C, H, W).

    Return None when ``settings`` is empty. Raise ValueError naming ``key`` (the setting's dotted
    path, such as ``teacher.augment``) for an unknown op or an invalid value.
    """
    if not settings:
        return None
    if not isinstance(settings, Mapping):
        raise ValueError(f"{key}={settings!r}: give a mapping of op names to their settings, "
                         f"e.g. {{translate: {{pixels: 2}}}}")
    ops = []
    for name, options in settings.items():
        if name not in OPS:
            raise ValueError(f"{key}.{name}: unknown augmentation op; choose one of {', '.join(OPS)}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPS[name]))
        if unknown:
            raise ValueError(f"{key}.{name}.{unknown[0]}: unknown setting of op {name}; "
                             f"it takes {', '.join(OPS[name])}")
        ops.append(_translate(options, input_shape, f"{key}.{name}"))
    return nn.Sequential(*ops)


def _translate(options: dict[str, Any], input_shape: Sequence[int], key: str) -> nn.Module:
    """Shift each image by up to ``pixels`` pixels along each axis, drawn uniformly per sample.

    The shifts are fractional, with bilinear interpolation. The uncovered border repeats the edge
    pixels, which are background in digit images, so no band of another intensity is added.
    """
    pixels = options.get("pixels", 2)
    height, width = input_shape[-2:]
    if isinstance(pixels, bool) or not isinstance(pixels, (int, float)) or not 0 < pixels < min(height, width) / 2:
        raise ValueError(f"{key}.pixels={pixels!r}: must be a number of pixels > 0 and below half the image "
                         f"side ({min(height, width) / 2:g} for {height}x{width} images)")
    return K.RandomAffine(degrees=0.0, translate=(pixels / width, pixels / height), padding_mode="border", p=1.0)
