"""Measure how well cached teachers classify augmented validation images.

``python -m benchmarks.teacher_under_augmentation TEACHER_CACHE [--data mnist] [--data-root DIR]
[--teacher cnn]`` prints, for each cached teacher, its top-1 accuracy and mean top-1 probability
on the validation split under each augmentation preset, and under each op of the heavy preset
alone. docs/augmentation.md uses it to explain why high alpha fails under heavy augmentation.
The teachers must have been trained on that data with that teacher config.
"""

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kdsweep.augmentation import build_augmentation
from kdsweep.data import load_splits
from kdsweep.models import build_model
from kdsweep.provenance import CHECKOUT

CONF = CHECKOUT / "conf"


def augmentation_cases(family: str) -> dict[str, dict]:
    """Return the presets of ``family`` by level, then each op of its heavy preset alone."""
    cases = {level: OmegaConf.to_container(OmegaConf.load(CONF / "augment_presets" / f"{family}_{level}.yaml"))
             for level in ("none", "light", "heavy")}
    cases.update({f"heavy: {op} alone": {op: settings} for op, settings in cases["heavy"].items()})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.teacher_under_augmentation", description=__doc__)
    parser.add_argument("cache", type=Path, help="a teacher cache folder (teacher_cache_dir of the runs)")
    parser.add_argument("--data", default="mnist", help="the data config the teachers were trained on")
    parser.add_argument("--data-root", help="data.root, for the torchvision datasets")
    parser.add_argument("--teacher", default="cnn", help="the teacher config the teachers were built from")
    arguments = parser.parse_args()
    for option, folder, name in (("--data", "data", arguments.data), ("--teacher", "teacher", arguments.teacher)):
        if not (CONF / folder / f"{name}.yaml").exists():
            choices = ", ".join(sorted(path.stem for path in (CONF / folder).glob("*.yaml")))
            parser.error(f"{option} {name}: no such config; choose one of {choices}")
    if not sorted(arguments.cache.glob("*.json")):
        parser.error(f"cache {arguments.cache}: no cached teacher found (no <key>.json file)")

    data_cfg = OmegaConf.load(CONF / "data" / f"{arguments.data}.yaml")
    data_cfg.pop("defaults", None)
    if arguments.data_root:
        data_cfg.root = arguments.data_root
    family = "colour" if arguments.data.startswith("cifar") else "grey"
    splits = load_splits(data_cfg)
    inputs, labels = splits.val.tensors
    model_cfg = OmegaConf.load(CONF / "teacher" / f"{arguments.teacher}.yaml").model

    for metadata in sorted(arguments.cache.glob("*.json")):
        run_id = json.loads(metadata.read_text())["run_id"]
        model = build_model(model_cfg, splits.input_shape, splits.num_classes)
        model.load_state_dict(torch.load(metadata.with_suffix(".pt"), weights_only=True))
        model.eval()
        for name, settings in augmentation_cases(family).items():
            augment = build_augmentation(settings, splits.input_shape, splits.num_classes, "augment",
                                         splits.mean, splits.std)
            torch.manual_seed(0)
            images = inputs if augment is None else augment(inputs, labels)[0]
            with torch.no_grad():
                probabilities = model(images).softmax(dim=1)
            accuracy = (probabilities.argmax(dim=1) == labels).float().mean().item()
            confidence = probabilities.max(dim=1).values.mean().item()
            print(f"teacher run {run_id}  {name:24s} accuracy {accuracy:.4f}  mean top-1 probability {confidence:.4f}")


if __name__ == "__main__":
    main()
