"""Bad input is rejected with one line naming the key, the value and what is allowed, before any work."""

import logging
import os
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, run_in_process
from kdsweep import cli, train
from kdsweep.checks import ConfigError

SWEEP = ["sweep=temperature_alpha", "hydra.sweeper.n_trials=2"]

CASES = {
    "zero temperature": ([*FAST, "distill.temperature=0"], ["distill.temperature=0", "> 0"]),
    "negative temperature": ([*FAST, "distill.temperature=-2"], ["distill.temperature=-2", "> 0"]),
    "alpha above one": ([*FAST, "distill.alpha=1.5"], ["distill.alpha=1.5", "[0, 1]"]),
    "alpha below zero": ([*FAST, "distill.alpha=-0.1"], ["distill.alpha=-0.1", "[0, 1]"]),
    "unknown data group": ([*FAST, "data=imagenet"], ["data=imagenet", "digits", "mnist"]),
    "unknown data name": ([*FAST, "data.name=imagenet"], ["data.name='imagenet'", "digits"]),
    "unknown student group": ([*FAST, "student=resnet999"], ["student=resnet999", "mlp_small"]),
    "unknown model target": ([*FAST, "student.model._target_=nowhere.Net"],
                             ["student.model._target_='nowhere.Net'", "dotted path"]),
    "model arguments mismatch": ([*FAST, "student.model._target_=kdsweep.models.SmallCNN"],
                                 ["student.model", "kdsweep.models.SmallCNN", "hidden_sizes"]),
    "class count mismatch": ([*FAST, "+student.model.num_classes=5"], ["student.model outputs 5 logits", "10"]),
    "missing data root": ([*FAST, "data=mnist", "data.root=/nonexistent/kdsweep", "data.download=false"],
                          ["data.root='/nonexistent/kdsweep'", "data.download=true"]),
    "negative learning rate": ([*FAST, "student.optimizer.lr=-1"], ["student.optimizer", "learning rate"]),
    "unusable accelerator": ([*FAST, "trainer.accelerator=mps"], ["trainer.accelerator='mps'", "MPSAccelerator"]),
    "more GPUs than present": ([*FAST, "trainer=ddp", "trainer.devices=64"],
                               ["trainer.devices=64", "GPUs are present", "trainer=ddp_cpu"]),
    "unknown accelerator": ([*FAST, "trainer.accelerator=abacus"], ["trainer.accelerator='abacus'", "cpu"]),
    "test fraction above one": ([*FAST, "data.test_fraction=1.5"], ["data.test_fraction=1.5", "between 0 and 1"]),
    "seed past 32 bits": ([*FAST, "seed=99999999999"], ["seed=99999999999", "4294967295"]),
    "empty experiment name": ([*FAST, "tracking.experiment=''"], ["tracking.experiment=''", "non-empty"]),
    "registered model name with slash": ([*FAST, "tracking.registered_model_name=a/b"],
                                         ["tracking.registered_model_name='a/b'", "without /"]),
    "registered model name of dots": ([*FAST, "tracking.registered_model_name=..student"],
                                      ["tracking.registered_model_name='..student'", "starting with .."]),
    "registered model name too long": ([*FAST, f"tracking.registered_model_name={'k' * 257}"],
                                       ["tracking.registered_model_name='kkk", "1 to 256 characters"]),
    "zero inference batch": ([*FAST, "inference.batch_size=0"], ["inference.batch_size=0", "between 1 and 65536"]),
    "huge inference batch": ([*FAST, "inference.batch_size=1000000000000"],
                             ["inference.batch_size=1000000000000", "between 1 and 65536"]),
    "zero timing budget": ([*FAST, "inference.min_run_time=0"], ["inference.min_run_time=0", "(0, 60]"]),
    "huge timing budget": ([*FAST, "inference.min_run_time=1e9"], ["inference.min_run_time=1000000000.0", "(0, 60]"]),
    "file store": ([*FAST, "tracking.uri=/tmp/kdsweep-runs"], ["tracking.uri='/tmp/kdsweep-runs'", "sqlite:///"]),
    "unknown tracking scheme": ([*FAST, "tracking.uri=gopher://x"], ["tracking.uri='gopher://x'", "sqlite://"]),
    "cluster without its variables": ([*FAST, *SWEEP, "cluster=slurm"],
                                      ["cluster=slurm", "KDSWEEP_MLFLOW_URI is not set", "docs/cluster.md"]),
    "unknown augmentation op": ([*FAST, "+teacher.augment.shear.degrees=5"],
                                ["teacher.augment.shear", "unknown augmentation op", "rotate"]),
    "translation past half the image": ([*FAST, "teacher_augment=none", "+teacher.augment.translate.pixels=4"],
                                        ["teacher.augment.translate.pixels=4", "below half", "8x8"]),
    "unknown augmentation preset": ([*FAST, "augment=extreme"], ["augment=extreme", "heavy, light, none"]),
    "rotation past 180 degrees": ([*FAST, "augment=heavy", "student.augment.rotate.degrees=200"],
                                  ["student.augment.rotate.degrees=200", "(0, 180]"]),
    "MixUp with alpha 0": ([*FAST, "+student.augment.mixup.alpha=0"], ["student.augment.mixup.alpha=0", "> 0"]),
    "CutMix with negative alpha": ([*FAST, "+student.augment.cutmix.alpha=-1"],
                                   ["student.augment.cutmix.alpha=-1", "> 0"]),
    "colour op on digits": ([*FAST, "+student.augment.trivial_augment={}"],
                            ["student.augment.trivial_augment", "colour (3-channel)", "1 channel"]),
    "unknown experiment": ([*FAST, "experiment=hinton_cifar"], ["experiment=hinton_cifar", "hinton_mnist"]),
    "cache folder under a file": ([*FAST, "teacher_cache_dir=/dev/null/cache"],
                                  ["teacher_cache_dir='/dev/null/cache'", "not a folder"]),
    "zero hidden units": ([*FAST, "student.model.hidden_sizes=[0]"], ["student.model", "hidden_sizes", ">= 1"]),
    "zero epochs": ([*FAST, "student.max_epochs=0"], ["student.max_epochs=0", ">= 1"]),
    "reversed interval": ([*SWEEP, *FAST, "distill.alpha=interval(0.9, 0.1)"],
                          ["distill.alpha", "interval(0.9, 0.1)", "empty"]),
    "temperature range reaching zero": ([*SWEEP, *FAST, "distill.temperature=interval(0, 5)"],
                                        ["distill.temperature=0.0", "> 0"]),
    "alpha range above one": ([*SWEEP, *FAST, "distill.alpha=interval(0.5, 2)"], ["distill.alpha=2.0", "[0, 1]"]),
    "empty choice": ([*SWEEP, *FAST, "distill.alpha=choice()"], ["distill.alpha=choice()", "empty"]),
    "empty range": ([*SWEEP, *FAST, "student.max_epochs=range(3, 3)"], ["student.max_epochs", "empty"]),
    "log scale from zero": ([*SWEEP, *FAST, "distill.temperature=tag(log, interval(0, 4))"],
                            ["distill.temperature", "log scale", "> 0"]),
    "unknown sampler": ([*SWEEP, *FAST, "hydra.sweeper.sampler=bayes"], ["hydra.sweeper.sampler='bayes'", "tpe"]),
    "zero parallel jobs": ([*SWEEP, *FAST, "hydra.sweeper.n_jobs=0"], ["hydra.sweeper.n_jobs=0", ">= 1"]),
    "unknown pruner": ([*SWEEP, *FAST, "hydra.sweeper.pruner=early"], ["hydra.sweeper.pruner='early'", "median"]),
    "pruner with two objectives": ([*SWEEP, *FAST, "hydra.sweeper.pruner=median",
                                    "hydra.sweeper.metric=[val/acc,model/parameters]",
                                    "hydra.sweeper.direction=[maximize,minimize]"],
                                   ["hydra.sweeper.pruner='median'", "multi-objective"]),
    "unreachable storage": ([*SWEEP, *FAST, "hydra.sweeper.storage=postgresql://nobody@127.0.0.1:1/none"],
                            ["hydra.sweeper.storage='postgresql://nobody@127.0.0.1:1/none'", "cannot be opened"]),
    "storage folder missing": ([*SWEEP, *FAST, "hydra.sweeper.storage=/nonexistent/kdsweep/optuna.journal"],
                               ["hydra.sweeper.storage='/nonexistent/kdsweep/optuna.journal'", "does not exist"]),
    "failure rate above one": ([*SWEEP, *FAST, "hydra.sweeper.max_failure_rate=2"],
                               ["hydra.sweeper.max_failure_rate=2", "[0, 1]"]),
    "unknown metric": ([*SWEEP, *FAST, "hydra.sweeper.metric=val/nothing"],
                       ["hydra.sweeper.metric='val/nothing'", "val/acc"]),
    "agreement with baseline": ([*SWEEP, *FAST, "hydra.sweeper.metric=val/agreement"],
                                ["distill.alpha=0", "val/agreement"]),
    "zero heartbeat interval": ([*SWEEP, *FAST, "hydra.sweeper.heartbeat_interval=0"],
                                ["hydra.sweeper.heartbeat_interval=0", "> 0"]),
    "test metric objective": ([*SWEEP, *FAST, "hydra.sweeper.metric=test/acc"],
                              ["hydra.sweeper.metric='test/acc'", "validation"]),
}


def assert_rejected_before_work(status, stderr: str, folder, expected: list[str]) -> None:
    assert status != 0
    error_lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, f"expected one line, got:\n{stderr}"
    for fragment in expected:
        assert fragment in error_lines[0]
    assert "Traceback" not in stderr
    assert not (folder / "mlflow.db").exists(), "an MLflow store was created before the error"
    assert not (folder / "teacher_cache").exists(), "a teacher was trained before the error"
    assert not (folder / "optuna.journal").exists(), "an Optuna study was created before the error"


@pytest.mark.parametrize("arguments, expected", CASES.values(), ids=CASES.keys())
def test_bad_input_rejected_before_work(tmp_path, monkeypatch, capfd, arguments, expected):
    status, stderr = run_in_process(arguments, tmp_path, monkeypatch, capfd)

    assert_rejected_before_work(status, stderr, tmp_path, expected)


@pytest.mark.parametrize("case", ["zero temperature", "unknown data group", "unknown sampler"])
def test_command_exits_with_one_line(kdsweep, tmp_path, case):
    arguments, expected = CASES[case]

    result = kdsweep(*arguments, expect_success=False)

    assert result.returncode == 2
    assert_rejected_before_work(result.returncode, result.stderr, tmp_path, expected)


TRAINER_CASES = {
    "zero devices": ({"devices": 0}, "trainer.devices=0: give a number of devices >= 1, -1 for all of them, auto"),
    "negative devices": ({"devices": -3}, "trainer.devices=-3: give a number of devices >= 1"),
    "devices not a number": ({"devices": "abc"}, "trainer.devices='abc': give a number of devices >= 1"),
    "zero nodes": ({"num_nodes": 0}, "trainer.num_nodes=0: must be a whole number >= 1"),
    "unknown precision": ({"precision": "fp8"}, "trainer.precision='fp8': invalid Trainer setting .*bf16-mixed"),
    "GPU trainer without GPUs": ({"accelerator": "gpu"}, "trainer.accelerator=gpu, trainer.devices=1: 0 CUDA GPUs "
                                                         "are present; train on CPU with trainer.accelerator=cpu"),
}


@pytest.mark.parametrize("settings, message", TRAINER_CASES.values(), ids=TRAINER_CASES.keys())
def test_trainer_settings_rejected(monkeypatch, settings, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": 1, **settings}})

    with pytest.raises(ConfigError, match=message):
        train._check_trainer(cfg)
