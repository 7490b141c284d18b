"""One kdsweep job: obtain the teacher (from the cache or by training it), then distil the student.

This is the body of the ``kdsweep`` command and of every sweep trial. Its return value contains
the student's final metrics; the sweeper reads its objective from them.
"""

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import optuna
import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.utilities import rank_zero_only
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdsweep import distributed, footprint, optuna_trial, provenance, registry, tracking
from kdsweep.augmentation import build_augmentation
from kdsweep.checks import ConfigError, check_config, check_logit_widths, check_optimizer
from kdsweep.data import DataSplits, DatasetNotFoundError, TensorDataModule, load_splits, with_extra_tensors
from kdsweep.models import build_model
from kdsweep.modules import ClassifierModule, DistillationModule, FrozenTeacher
from kdsweep.seeding import resolve_seed
from kdsweep.teacher_cache import CachedTeacher, TeacherCache, teacher_cache_key
from kdsweep.timing import PERF_PREFIX, TimingCallback

log = logging.getLogger(__name__)

# The metrics a student run returns that a sweep may optimise; val/agreement needs alpha > 0. The
# model's footprint is for multi-objective sweeps; its latency varies with the load on the machine.
OPTIMISABLE_METRICS = ("val/acc", "val/loss", "val/agreement", footprint.PARAMETER_COUNT_METRIC,
                       footprint.SIZE_METRIC, footprint.LATENCY_METRIC)
# Batch size of the teacher's forward passes when its logits are computed for the cache.
INFERENCE_BATCH_SIZE = 1024


@dataclass
class Prepared:
    """The data and the untrained models of a checked config."""

    splits: DataSplits
    teacher: nn.Module
    student: nn.Module
    # Processes that the trainer settings start per run: 1 unless a data-parallel strategy is set.
    processes: int
    # Whether Lightning starts processes 1 and up by running the command line again (not SLURM or torchrun).
    starts_processes_by_command: bool


def prepare(cfg: DictConfig, *, check_hardware: bool = True) -> Prepared:
    """Check the config, load the data and build both models, raising ConfigError on bad input.

    Nothing here trains or touches MLflow, so a sweep calls it on every config it will launch
    before any trial starts. ``check_hardware=False`` checks the trainer settings as if on CPU,
    for a sweep whose trials run on other machines.
    """
    check_config(cfg)
    try:
        splits = load_splits(cfg.data)
    except (DatasetNotFoundError, ValueError) as error:  # The split helpers name the data.* key.
        raise ConfigError(str(error)) from None
    student = _seeded_model(cfg, "student", splits)
    teacher = _seeded_model(cfg, "teacher", splits)
    for role in ("teacher", "student"):
        _augmentation(cfg, role, splits)
    check_logit_widths(teacher, student, splits.input_shape, splits.num_classes, cfg.data.name)
    check_optimizer(cfg.teacher.optimizer, teacher, "teacher.optimizer")
    check_optimizer(cfg.student.optimizer, student, "student.optimizer")
    trainer = _check_trainer(cfg, check_hardware)
    _check_cache_folder(Path(to_absolute_path(cfg.teacher_cache_dir)))
    return Prepared(splits=splits, teacher=teacher, student=student, processes=trainer.world_size,
                    starts_processes_by_command=distributed.starts_processes_by_command(trainer))


def _check_trainer(cfg: DictConfig, check_hardware: bool = True) -> pl.Trainer:
    """Build a Trainer from the trainer settings once, so that invalid ones fail before any run starts."""
    settings = OmegaConf.to_container(cfg.trainer, resolve=True)
    if not check_hardware:
        # Mixed precision settings may exist only for the other machines' accelerators.
        settings["accelerator"] = "cpu"
        settings.pop("precision", None)
    accelerator, devices = settings.get("accelerator"), settings.get("devices")
    _check_counts(settings)
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and isinstance(devices, int) and devices > gpus:
        fix = "lower trainer.devices, or train" if gpus else "train"
        raise ConfigError(f"trainer.accelerator={accelerator}, trainer.devices={devices}: {gpus} CUDA GPUs are "
                          f"present; {fix} on CPU with trainer.accelerator=cpu (or trainer=ddp_cpu for several "
                          f"processes)")
    try:
        trainer = pl.Trainer(**settings, logger=False, enable_checkpointing=False, enable_model_summary=False)
    except Exception as error:  # Lightning raises several types for unusable accelerators and devices.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        key = next((key for key in TRAINER_KEYS if key in message), None)
        where = f"trainer.{key}={settings.get(key)!r}" if key else "trainer"
        raise ConfigError(f"{where}: invalid Trainer setting ({type(error).__name__}: {message})") from None
    if check_hardware and trainer.world_size > 1 and isinstance(trainer.accelerator, CPUAccelerator) \
            and not _gloo_available():
        raise ConfigError(f"trainer.strategy={cfg.trainer.get('strategy')}, trainer.accelerator={accelerator}: "
                          f"processes on CPU synchronise through gloo, which this torch build lacks; set "
                          f"trainer.devices=1, or install a torch build with torch.distributed and gloo")
    return trainer


# Trainer settings that Lightning's error messages name, checked in this order to find the culprit.
TRAINER_KEYS = ("precision", "strategy", "num_nodes", "devices", "accelerator")
# Valid string forms of trainer.devices: "auto", a count such as "2" or -1, or device ids such as "0,1".
_DEVICES_TEXT = re.compile(r"^(auto|-1|\d+|\d+(,\d+)+,?)$")


def _check_counts(settings: dict) -> None:
    """Reject device and node counts that Lightning would reject with a message naming neither."""
    devices = settings.get("devices", "auto")
    valid = (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)) \
        or (isinstance(devices, str) and _DEVICES_TEXT.match(devices.strip()) and devices.strip() != "0") \
        or (isinstance(devices, list) and devices and all(isinstance(index, int) and index >= 0 for index in devices))
    if not valid:
        raise ConfigError(f"trainer.devices={devices!r}: give a number of devices >= 1, -1 for all of them, auto, "
                          f"or a list of device indices such as [0,1]")
    nodes = settings.get("num_nodes", 1)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes={nodes!r}: must be a whole number >= 1")


def _gloo_available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


def _check_cache_folder(folder: Path) -> None:
    """Check that the cache folder exists or can be created, without creating it."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"teacher_cache_dir={str(folder)!r}: cannot be created, because {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"teacher_cache_dir={str(folder)!r}: {existing} is not writable")


def run(cfg: DictConfig, *, sweep_job: bool = False) -> dict[str, Any]:
    """Train the teacher if it is not cached, then the student; return the student's results.

    A sweep job (``sweep_job=True``) whose trainer starts processes by running the command line
    again runs as a single run in a new process (see ``kdsweep.distributed``).
    """
    if rank_zero_only.rank > 0:
        _log_warnings_only_to_console()
        # A rank that outlives rank 0 would wait for it in the next collective until gloo or NCCL time out.
        distributed.end_with_parent()
    resolve_seed(cfg)
    prepared = prepare(cfg)
    if sweep_job and prepared.starts_processes_by_command:
        return distributed.run_as_single_run(cfg, prepared.processes)
    splits = prepared.splits
    if cfg.distill.alpha == 0 and not cfg.get("teacher_only"):
        return _train_student(cfg, prepared.student, None, None, splits)
    teacher_entry = _obtain_teacher(cfg, prepared.teacher, splits)
    if cfg.get("teacher_only"):
        return {"metrics": teacher_entry.metrics, "run_id": teacher_entry.run_id, "role": "teacher"}
    teacher = FrozenTeacher(prepared.teacher)
    tags = {provenance.TEACHER_CHECKPOINT_HASH_TAG: provenance.state_dict_sha256(prepared.teacher.state_dict())}
    if _augmentation(cfg, "student", splits) is not None:
        # The teacher must score each augmented batch that the student trains on, so no logits are cached.
        tags[tracking.TEACHER_LOGITS_TAG] = "online"
        return _train_student(cfg, prepared.student, teacher, teacher_entry, splits, tags=tags)
    logits, tags[tracking.TEACHER_LOGITS_TAG] = _teacher_logits(cfg, teacher, teacher_entry.key, splits)
    student_splits = with_extra_tensors(splits, logits["train"], logits["val"])
    return _train_student(cfg, prepared.student, teacher, teacher_entry, student_splits, tags=tags)


def _run_tags(cfg: DictConfig, splits: DataSplits) -> dict[str, str]:
    """Return the provenance tags of one run that its process does not share with other runs."""
    return {provenance.SEED_TAG: str(cfg.seed), provenance.DATA_FINGERPRINT_TAG: splits.fingerprint}


def _augmentation(cfg: DictConfig, role: str, splits: DataSplits) -> Optional[nn.Module]:
    """Build the training augmentation of ``role`` (teacher or student), or None if it has none."""
    settings = cfg[role].get("augment")
    try:
        if OmegaConf.is_config(settings):
            settings = OmegaConf.to_container(settings, resolve=True)
        return build_augmentation(settings, splits.input_shape, splits.num_classes, f"{role}.augment",
                                  splits.mean, splits.std)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _seeded_model(cfg: DictConfig, role: str, splits: DataSplits) -> nn.Module:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model_cfg = cfg[role].model
    try:
        return build_model(model_cfg, splits.input_shape, splits.num_classes)
    except Exception as error:  # Any failure of a user's constructor is a config error here.
        cause = error.__cause__ or error  # Hydra wraps the constructor's exception.
        raise ConfigError(f"{role}.model: building {model_cfg._target_} failed "
                          f"({type(cause).__name__}: {cause})") from None


def _obtain_teacher(cfg: DictConfig, teacher: nn.Module, splits: DataSplits) -> CachedTeacher:
    """Load the cached teacher into ``teacher``, training and caching it first if it is missing."""
    cache = TeacherCache(to_absolute_path(cfg.teacher_cache_dir))
    key = teacher_cache_key(cfg)
    with _cache_lock(cache, key):
        cached = cache.load(key)
        if cached is None:
            log.info("Teacher %s is not cached; training it", key)
            entry = _train_teacher(cfg, teacher, splits, key)
            if rank_zero_only.rank == 0:
                cache.save(teacher.state_dict(), entry)
            return entry

    state_dict, entry = cached
    teacher.load_state_dict(state_dict)
    log.info("Reusing cached teacher %s from MLflow run %s (val/acc %.4f)", key, entry.run_id,
             entry.metrics.get("val/acc", float("nan")))
    current_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    if entry.tracking_uri != current_uri:
        log.warning("Cached teacher %s was logged to %s, not to the current store %s", key, entry.tracking_uri,
                    current_uri)
    return entry


def _teacher_logits(cfg: DictConfig, teacher: FrozenTeacher, key: str,
                    splits: DataSplits) -> tuple[dict[str, torch.Tensor], str]:
    """Return the teacher's logits on the training and validation splits, and "cached" or "computed".

    The teacher is frozen and the inputs do not change between epochs, so its logits are computed
    once per teacher and reused by every student, instead of a teacher forward pass per batch.
    """
    cache = TeacherCache(to_absolute_path(cfg.teacher_cache_dir))
    sizes = {"train": len(splits.train), "val": len(splits.val)}
    with _cache_lock(cache, key):
        logits = cache.load_logits(key, sizes)
        if logits is not None:
            return logits, "cached"
        device = _inference_device(cfg.trainer.accelerator)
        logits = {split: teacher.logits_in_batches(getattr(splits, split).tensors[0], INFERENCE_BATCH_SIZE, device)
                  for split in sizes}
        if rank_zero_only.rank == 0:
            cache.save_logits(key, logits)
            log.info("Computed and cached the logits of teacher %s on %s", key, device)
    return logits, "computed"


def _cache_lock(cache: TeacherCache, key: str) -> contextlib.AbstractContextManager:
    """Return the cache's lock for ``key`` in rank 0, and no lock in the other data-parallel ranks.

    Lightning starts ranks 1 and up from inside rank 0's first fit, by running the command again.
    If rank 0 is training the teacher, it holds the lock and waits for them to join, so they must
    not wait for the lock. They still reach the same choice as rank 0: the entry cannot appear or
    vanish while rank 0 holds the lock, and once written it stays.
    """
    return cache.lock(key) if rank_zero_only.rank == 0 else contextlib.nullcontext()


def _log_warnings_only_to_console() -> None:
    """Keep a data-parallel rank other than 0 quiet on the console; its log file still gets every line.

    The other ranks repeat rank 0's steps, so rank 0 alone reports them on the console.
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def _inference_device(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _train_teacher(cfg: DictConfig, teacher: nn.Module, splits: DataSplits, key: str) -> CachedTeacher:
    logger = tracking.create_logger(cfg.tracking, role="teacher", run_name=f"teacher-{key[:8]}",
                                    tags={tracking.TEACHER_KEY_TAG: key, **_run_tags(cfg, splits)})
    tracking.log_config(logger, cfg)
    with tracking.run_status(logger):
        module = ClassifierModule(teacher, instantiate(cfg.teacher.optimizer), splits.num_classes,
                                  augment=_augmentation(cfg, "teacher", splits))
        metrics, device = _fit_and_test(cfg, module, logger, splits, cfg.teacher)
        tracking.set_tag(logger, provenance.CHECKPOINT_HASH_TAG, provenance.state_dict_sha256(teacher.state_dict()))
        metrics.update(_log_footprint_and_model(cfg, logger, teacher, splits, device))
    return CachedTeacher(key=key, run_id=logger.run_id, tracking_uri=tracking.resolve_tracking_uri(cfg.tracking.uri),
                         metrics=metrics)


def _train_student(cfg: DictConfig, student: nn.Module, teacher: Optional[FrozenTeacher],
                   teacher_entry: Optional[CachedTeacher], splits: DataSplits,
                   tags: Optional[dict[str, str]] = None) -> dict[str, Any]:
    tags = {**(tags or {}), **_run_tags(cfg, splits), **tracking.sweep_tags_from_environment()}
    if teacher_entry is not None:
        tags[tracking.TEACHER_RUN_TAG] = teacher_entry.run_id
        tags[tracking.TEACHER_KEY_TAG] = teacher_entry.key
    trial_number = tags.get(tracking.TRIAL_NUMBER_TAG)
    run_started = time.perf_counter()
    logger = tracking.create_logger(cfg.tracking, role="student", tags=tags,
                                    run_name=f"trial-{trial_number}" if trial_number is not None else "student")
    tracking.log_config(logger, cfg)
    mlflow_setup_seconds = time.perf_counter() - run_started
    callbacks = []
    sweep_trial = optuna_trial.trial_from_environment()
    if sweep_trial is not None:
        trial, monitor = sweep_trial
        if rank_zero_only.rank == 0:  # The other ranks have no MLflow run.
            trial.set_user_attr("mlflow_run_id", logger.run_id)
        if len(trial.study.directions) == 1:  # Optuna takes intermediate values from single-objective trials only.
            callbacks.append(optuna_trial.PruningCallback(trial, monitor))
    with tracking.run_status(logger, pruned=(optuna.TrialPruned,)):
        module = DistillationModule(
            student,
            instantiate(cfg.student.optimizer),
            splits.num_classes,
            teacher=teacher,
            temperature=cfg.distill.temperature,
            alpha=cfg.distill.alpha,
            augment=_augmentation(cfg, "student", splits),
        )
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        metrics, device = _fit_and_test(cfg, module, logger, splits, cfg.student, callbacks)
        tracking.set_tag(logger, provenance.CHECKPOINT_HASH_TAG, provenance.state_dict_sha256(student.state_dict()))
        metrics.update(_log_footprint_and_model(cfg, logger, student, splits, device))
        logger.log_metrics({
            f"{PERF_PREFIX}mlflow_setup_seconds": mlflow_setup_seconds,
            f"{PERF_PREFIX}run_seconds": time.perf_counter() - run_started,
        })
    if logger.run_id is not None:  # Data-parallel ranks other than 0 have no run.
        log.info("Student run %s finished: val/acc %.4f, test/acc %.4f", logger.run_id, metrics["val/acc"],
                 metrics["test/acc"])
    return {
        "metrics": metrics,
        "distill": {"distill.temperature": float(cfg.distill.temperature), "distill.alpha": float(cfg.distill.alpha)},
        "run_id": logger.run_id,
        "teacher": None if teacher_entry is None else {"run_id": teacher_entry.run_id,
                                                       "metrics": teacher_entry.metrics},
    }


@contextlib.contextmanager
def _cuda_check_by_runtime(trainer: pl.Trainer) -> Iterator[None]:
    """Let ``torch.cuda.is_available()`` ask the CUDA runtime, not NVML, while a CPU trainer runs.

    Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 when imported, so that the check does not
    initialise CUDA before a fork. Every ``optimizer.step()`` makes that check, and through NVML it
    loads the NVML library again each time: about 8 percent of a small student's step on a CPU
    machine with a CUDA build of torch 2.14 (profiled with py-spy). A CPU trainer's processes
    never use CUDA, so the runtime check is safe there.
    """
    variable = "PYTORCH_NVML_BASED_CUDA_CHECK"
    if not isinstance(trainer.accelerator, CPUAccelerator) or variable not in os.environ:
        yield
        return
    value = os.environ.pop(variable)
    try:
        yield
    finally:
        os.environ[variable] = value


def _fit_and_test(cfg: DictConfig, module: ClassifierModule, logger: tracking.RunLogger, splits: DataSplits,
                  training: DictConfig,
                  callbacks: Optional[list[pl.Callback]] = None) -> tuple[dict[str, float], torch.device]:
    """Fit for ``training.max_epochs``, then test; return the final validation and test metrics and the device."""
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        max_epochs=training.max_epochs,
        logger=logger,
        callbacks=[*(callbacks or []), TimingCallback(len(splits.train)),
                   distributed.ProcessGroupCleanup()],
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # TensorDataModule shards the data itself, without padding evaluation.
    )
    data = TensorDataModule(splits, batch_size=training.batch_size, seed=cfg.seed)
    tracking.log_hardware(logger, trainer)
    with _cuda_check_by_runtime(trainer):
        trainer.fit(module, datamodule=data)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        (test_metrics,) = trainer.test(module, datamodule=data, verbose=False)
    metrics.update({k: float(v) for k, v in test_metrics.items() if k.startswith("test/")})
    return metrics, trainer.strategy.root_device


def _log_footprint_and_model(cfg: DictConfig, logger: tracking.RunLogger, network: nn.Module, splits: DataSplits,
                             device: torch.device) -> dict[str, float]:
    """Measure the trained network's footprint on ``device``, log it and the network's MLflow model.

    Return the footprint metrics. Data-parallel ranks other than 0 have no run and return {}.
    """
    if logger.run_id is None:
        return {}
    model = registry.serving_model(network, splits)
    timing = footprint.InferenceTiming(device=device, batch_size=cfg.inference.batch_size,
                                       min_run_time=cfg.inference.min_run_time)
    metrics = footprint.measure(model, splits.input_shape, timing)
    logger.log_metrics(metrics)
    registry.log_model(model.cpu(), registry.input_example(splits), experiment_id=logger.experiment_id,
                       tracking_uri=tracking.resolve_tracking_uri(cfg.tracking.uri), run_id=logger.run_id)
    return metrics
