"""The benchmark measurements: most run the real ``kdsweep`` command in their own folder and read
the figures back from the MLflow runs and the Optuna study that the command wrote.

Each measurement returns :class:`Figure` rows. A figure with a target compares two things
measured in the same benchmark run on the same machine, so that it does not depend on how fast
the machine is.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import optuna
import torch
import yaml
from mlflow import MlflowClient

CHECKOUT = Path(__file__).resolve().parents[1]
STUDY = "benchmark"


@dataclass
class Figure:
    """One row of the benchmark table."""

    measure: str
    value: float
    unit: str
    target: Optional[str] = None  # e.g. "<= 1.10"; None for a figure that is only reported.
    detail: str = ""

    @property
    def met(self) -> Optional[bool]:
        if self.target is None:
            return None
        operator, bound = self.target.split()
        return self.value <= float(bound) if operator == "<=" else self.value >= float(bound)


@dataclass
class Settings:
    """Sizes of the measurements. ``quick`` shrinks every one, to check that the suite runs.

    ``pretrain`` fills the teacher cache with a run of its own before the parallel and pruning
    sweeps, so that their first trials do not train the teacher. The quick form leaves it to them.
    """

    workdir: Path
    mnist_root: Optional[Path]
    repeats: int = 3
    digits_epochs: int = 60
    mnist_epochs: int = 2
    parallel_trials: int = 10
    pruning_trials: int = 20
    pruner_options: dict = field(default_factory=lambda: {"n_startup_trials": 5, "n_warmup_steps": 5})
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    pretrain: bool = True
    teacher_epochs: int = 10
    # The inference timing of each run: its large batch and its seconds per batch size.
    inference_batch_size: int = 1024
    inference_min_run_time: float = 0.5

    @classmethod
    def quick(cls, workdir: Path, mnist_root: Optional[Path]) -> "Settings":
        return cls(workdir=workdir, mnist_root=mnist_root, repeats=1, digits_epochs=3, parallel_trials=4,
                   pruning_trials=4, pruner_options={"n_startup_trials": 1, "n_warmup_steps": 1}, pretrain=False,
                   teacher_epochs=2, inference_batch_size=64, inference_min_run_time=0.01)


# Overrides of every kdsweep command in the suite: no progress bar in the saved output.
COMMON = ["trainer.enable_progress_bar=false"]


def digits_workload(settings: Settings) -> list[str]:
    """Return the overrides for digits with the default networks, the teacher trained 10 epochs (2 when quick)."""
    return [*COMMON, f"teacher.max_epochs={settings.teacher_epochs}", f"student.max_epochs={settings.digits_epochs}",
            *inference_timing(settings)]


def mnist_workload(settings: Settings) -> list[str]:
    """Return the overrides for MNIST with the networks of Hinton, Vinyals and Dean (2015).

    The teacher trains for one epoch only: its accuracy does not change any timing here.
    """
    return [*COMMON, "data=mnist", f"data.root={settings.mnist_root}", "teacher=mlp_1200x2", "student=mlp_800x2",
            "teacher.max_epochs=1", f"student.max_epochs={settings.mnist_epochs}", *inference_timing(settings)]


def inference_timing(settings: Settings) -> list[str]:
    return [f"inference.batch_size={settings.inference_batch_size}",
            f"inference.min_run_time={settings.inference_min_run_time}"]


# ---------------------------------------------------------------------------------------------
# Running kdsweep and reading what it logged


def run_kdsweep(arguments: list[str], folder: Path, threads: int) -> float:
    """Run the ``kdsweep`` command in ``folder`` with ``threads`` CPU threads; return its wall-clock seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KDSWEEP_"))}
    environment["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "kdsweep.cli", *arguments], cwd=folder, env=environment,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    with open(folder / "kdsweep.log", "a") as log:
        log.write(f"$ kdsweep {' '.join(arguments)}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        raise RuntimeError(f"kdsweep {' '.join(arguments)} exited {result.returncode} in {folder}:\n"
                           f"{result.stderr[-3000:]}")
    return seconds


def sweep_arguments(folder: Path, sweeper: dict) -> list[str]:
    """Write a sweep definition beside the runs and return the arguments that select it."""
    sweep_folder = folder / "extra" / "sweep"
    sweep_folder.mkdir(parents=True, exist_ok=True)
    definition = {"hydra": {"mode": "MULTIRUN", "sweeper": {"study_name": STUDY, "metric": "val/acc",
                                                            "direction": "maximize", **sweeper}}}
    (sweep_folder / "benchmark.yaml").write_text("# @package _global_\n" + yaml.safe_dump(definition))
    return ["-cd", str(folder / "extra"), "sweep=benchmark"]


SEARCH_SPACE = {"distill.temperature": "tag(log, interval(1, 20))", "distill.alpha": "interval(0.05, 1)"}


def load_study(folder: Path) -> optuna.Study:
    backend = optuna.storages.journal.JournalFileBackend(str(folder / "optuna.journal"))
    return optuna.load_study(study_name=STUDY, storage=optuna.storages.JournalStorage(backend))


def runs(folder: Path, role: str) -> list:
    """Return the finished MLflow runs of ``role`` (teacher or student) logged in ``folder``."""
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiment_ids, filter_string=f"tags.`kdsweep.role` = '{role}'")


def metric_of(found_runs: list, name: str) -> list[float]:
    return [run.data.metrics[name] for run in found_runs if name in run.data.metrics]


def duration(trial: optuna.trial.FrozenTrial) -> float:
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


# ---------------------------------------------------------------------------------------------
# 1. Overhead of a trial against a hand-written loop


def measure_overhead(settings: Settings, name: str, workload: list[str]) -> list[Figure]:
    """Compare one sweep trial with the reference loop on the same data, teacher logits and student.

    The sweep runs ``repeats + 1`` trials in one process and drops the first, which pays the
    process's first Trainer and MLflow connection. The cache is filled by a run before the sweep.
    """
    folder = settings.workdir / f"overhead-{name}"
    run_kdsweep([*workload, "student.max_epochs=1"], folder, settings.threads)
    sweep = sweep_arguments(folder, {"n_trials": settings.repeats + 1, "params": SEARCH_SPACE, "seed": 0})
    run_kdsweep([*sweep, *workload], folder, settings.threads)
    trials = sorted(load_study(folder).get_trials(deepcopy=False), key=lambda t: t.number)[1:]
    trial_seconds = statistics.median(duration(t) for t in trials)

    reference = reference_seconds(settings, folder, workload)
    teacher_runs = runs(folder, "teacher")
    students = runs(folder, "student")
    computed = sum(run.data.tags.get("kdsweep.teacher_logits") == "computed" for run in students)
    trial_runs = [run for run in students if run.data.tags.get("optuna.trial_number")]
    return [
        Figure(f"{name}: trial / hand-written loop", trial_seconds / reference, "ratio", "<= 1.10",
               f"trial {trial_seconds:.2f} s (median of {len(trials)}), loop {reference:.2f} s"),
        Figure(f"{name}: teacher trainings in a sweep of {len(trials) + 1} trials", len(teacher_runs), "runs",
               "<= 1", f"teacher logits computed {computed} time(s) for {len(students)} student runs"),
        *logging_figures(name, trial_runs),
        *device_figures(name, trial_runs),
    ]


def device_figures(name: str, trial_runs: list) -> list[Figure]:
    """Report training throughput, and the peak GPU memory when the trials ran on a GPU."""
    figures = [Figure(f"{name}: training samples per second", statistics.median(
        metric_of(trial_runs, "perf/train_samples_per_second")), "samples/s", detail="median over the trials")]
    memory = metric_of(trial_runs, "perf/gpu_max_memory_mb")
    if memory:
        figures.append(Figure(f"{name}: peak GPU memory of a trial", max(memory), "MiB"))
    return figures


def reference_seconds(settings: Settings, folder: Path, workload: list[str]) -> float:
    """Time the hand-written loop in a fresh process on the data and logits of the kdsweep runs."""
    cfg = composed_config(workload)
    from kdsweep.data import load_splits

    splits = load_splits(cfg.data)
    (logits_file,) = (folder / "teacher_cache").glob("*.logits.pt")
    logits = torch.load(logits_file, weights_only=True)
    tensors = {"train_x": splits.train.tensors[0], "train_y": splits.train.tensors[1], "train_logits": logits["train"],
               "val_x": splits.val.tensors[0], "val_y": splits.val.tensors[1],
               "test_x": splits.test.tensors[0], "test_y": splits.test.tensors[1]}
    torch.save(tensors, folder / "reference_tensors.pt")
    reference = {
        "tensors": str(folder / "reference_tensors.pt"),
        "hidden_sizes": list(cfg.student.model.hidden_sizes),
        "num_classes": splits.num_classes,
        "lr": cfg.student.optimizer.lr,
        "weight_decay": cfg.student.optimizer.weight_decay,
        "batch_size": cfg.student.batch_size,
        "epochs": cfg.student.max_epochs,
        "temperature": 4.0,
        "alpha": 0.5,
        "repeats": settings.repeats,
    }
    (folder / "reference.json").write_text(json.dumps(reference))
    environment = {**os.environ, "OMP_NUM_THREADS": str(settings.threads)}
    result = subprocess.run([sys.executable, "-m", "benchmarks.reference_loop", str(folder / "reference.json")],
                            cwd=CHECKOUT, env=environment, capture_output=True, text=True, check=True)
    return statistics.median(json.loads(result.stdout)["seconds"])


def composed_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CHECKOUT / "conf"), version_base=None):
        return compose("config", overrides=overrides)


# ---------------------------------------------------------------------------------------------
# 2. Distillation epochs with cached teacher logits against plain cross-entropy epochs


def measure_teacher_reuse(settings: Settings, name: str, workload: list[str]) -> list[Figure]:
    """Compare epochs with alpha 0.5 (cached logits) and alpha 0 (cross-entropy only) in one process.

    One sweep process runs enqueued trials that alternate the two, after a first trial that warms
    the process up and is left out, so that both sides share the process and its state. Between
    processes the same epoch varies by about 10 percent on a small virtual machine. Two single
    runs afterwards give the start-up figure.
    """
    folder = settings.workdir / f"reuse-{name}"
    run_kdsweep([*workload, "student.max_epochs=1"], folder, settings.threads)
    alphas = [0.5] + [0.0, 0.5] * settings.repeats
    sweep = sweep_arguments(folder, {
        "n_trials": len(alphas),
        "params": {"distill.alpha": "interval(0, 1)", "distill.temperature": "interval(1, 20)"},
        # The sweeper skips an enqueued point that repeats an earlier one, so each trial gets its own
        # temperature, which does not change the cost of a step.
        "enqueue": [{"distill.alpha": alpha, "distill.temperature": 2.0 + index} for index, alpha in enumerate(alphas)],
    })
    run_kdsweep([*sweep, *workload], folder, settings.threads)
    for _ in range(2):
        run_kdsweep(workload, folder, settings.threads)

    students = runs(folder, "student")
    trials = [r for r in students if int(r.data.tags.get("optuna.trial_number", "0")) > 0]
    distilled = [r for r in trials if r.data.params["distill.alpha"] != "0.0"]
    plain = [r for r in trials if r.data.params["distill.alpha"] == "0.0"]
    distilled_epoch = statistics.median(metric_of(distilled, "perf/epoch_seconds"))
    plain_epoch = statistics.median(metric_of(plain, "perf/epoch_seconds"))
    single_runs = [r for r in students if "optuna.trial_number" not in r.data.tags and
                   r.data.tags.get("kdsweep.teacher_logits") == "cached"]
    startup = statistics.median(metric_of(single_runs, "perf/startup_seconds"))
    return [
        Figure(f"{name}: distillation epoch / cross-entropy epoch", distilled_epoch / plain_epoch, "ratio", "<= 1.05",
               f"{distilled_epoch * 1000:.1f} ms against {plain_epoch * 1000:.1f} ms per epoch "
               f"(medians of {len(distilled)} and {len(plain)} alternating trials in one process)"),
        Figure(f"{name}: start-up, process start to first training step", startup, "s",
               detail=f"median of {len(single_runs)} single runs with a cached teacher"),
    ]


def measure_loss_cost(batch_size: int = 128, num_classes: int = 10, repeats: int = 2000) -> list[Figure]:
    """Time the distillation loss against cross-entropy alone, forward and backward, in this process.

    This isolates what the soft-target term adds to every training step once the teacher's
    logits come from the cache.
    """
    import torch.nn.functional as F

    from kdsweep.losses import distillation_loss

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(batch_size, num_classes, generator=generator, requires_grad=True)
    teacher = torch.randn(batch_size, num_classes, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)

    def microseconds(step) -> float:
        for _ in range(repeats // 10):
            step()
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        return (time.perf_counter() - started) / repeats * 1e6

    cross_entropy = microseconds(lambda: F.cross_entropy(student, labels).backward())
    distillation = microseconds(lambda: distillation_loss(student, teacher, labels, temperature=4.0,
                                                          alpha=0.5).total.backward())
    return [Figure(f"loss on {batch_size}x{num_classes} logits: distillation / cross-entropy",
                   distillation / cross_entropy, "ratio",
                   detail=f"{distillation:.0f} us against {cross_entropy:.0f} us, forward and backward")]


# ---------------------------------------------------------------------------------------------
# 3. Parallel trials


def measure_parallel(settings: Settings) -> list[Figure]:
    """Run the same digits sweep with 1 and with 2 concurrent trials; compare trials per minute.

    The steady-state throughput counts the trials that end after the first ``n_jobs`` have ended,
    over the time since then, so it leaves out the one-off start of the worker processes. The
    whole-sweep throughput counts every trial from the first trial's start, start-up included.
    """
    steady, whole = {}, {}
    for n_jobs in (1, 2):
        folder = settings.workdir / f"parallel-{n_jobs}"
        if settings.pretrain:
            run_kdsweep([*digits_workload(settings), "student.max_epochs=1"], folder, settings.threads)
        sweep = sweep_arguments(folder, {"n_trials": settings.parallel_trials, "n_jobs": n_jobs,
                                         "params": SEARCH_SPACE, "seed": 0})
        run_kdsweep([*sweep, *digits_workload(settings)], folder, settings.threads)
        trials = load_study(folder).get_trials(deepcopy=False)
        ends = sorted(t.datetime_complete for t in trials)
        first_start = min(t.datetime_start for t in trials)
        whole[n_jobs] = 60 * len(ends) / (ends[-1] - first_start).total_seconds()
        steady[n_jobs] = 60 * (len(ends) - n_jobs) / (ends[-1] - ends[n_jobs - 1]).total_seconds()
    return [
        Figure("digits: steady-state throughput, 2 concurrent trials / 1", steady[2] / steady[1], "ratio", ">= 1.7",
               f"{steady[1]:.1f} and {steady[2]:.1f} trials per minute, {settings.parallel_trials} trials, "
               f"{settings.threads} cores"),
        Figure("digits: whole-sweep throughput, 2 concurrent trials / 1", whole[2] / whole[1], "ratio",
               detail=f"{whole[1]:.1f} and {whole[2]:.1f} trials per minute, worker start-up included"),
    ]


# ---------------------------------------------------------------------------------------------
# 4. Pruning


PRUNER = "median"


def measure_pruning(settings: Settings) -> list[Figure]:
    """Run the same seeded digits sweep without and with a pruner; compare epochs and best accuracy."""
    outcome = {}
    for pruner in ("none", PRUNER):
        folder = settings.workdir / f"pruning-{pruner}"
        if settings.pretrain:
            run_kdsweep([*digits_workload(settings), "student.max_epochs=1"], folder, settings.threads)
        options = settings.pruner_options if pruner != "none" else {}
        sweep = sweep_arguments(folder, {"n_trials": settings.pruning_trials, "params": SEARCH_SPACE, "seed": 0,
                                         "pruner": pruner, "pruner_options": options})
        run_kdsweep([*sweep, *digits_workload(settings)], folder, settings.threads)
        study = load_study(folder)
        epochs = sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False))
        pruned = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
        outcome[pruner] = (epochs, study.best_value, pruned)
    (full_epochs, full_best, _), (pruned_epochs, pruned_best, pruned_count) = outcome["none"], outcome[PRUNER]
    options = ", ".join(f"{k}={v}" for k, v in settings.pruner_options.items())
    return [
        Figure("digits: epochs saved by pruning", 1 - pruned_epochs / full_epochs, "fraction", ">= 0.40",
               f"{pruned_epochs} against {full_epochs} epochs, {pruned_count} of {settings.pruning_trials} trials "
               f"pruned ({PRUNER}: {options})"),
        Figure("digits: best val/acc, unpruned minus pruned", 100 * (full_best - pruned_best), "points", "<= 0.3",
               f"{100 * full_best:.2f} against {100 * pruned_best:.2f} percent"),
    ]


# ---------------------------------------------------------------------------------------------
# 5. Logging cost


def logging_figures(name: str, students: list) -> list[Figure]:
    per_epoch = statistics.median(metric_of(students, "perf/mlflow_seconds_per_epoch"))
    share = statistics.median(metric_of(students, "perf/mlflow_share"))
    setup = statistics.median(metric_of(students, "perf/mlflow_setup_seconds"))
    return [
        Figure(f"{name}: MLflow time per epoch", per_epoch * 1000, "ms",
               detail=f"{100 * share:.1f} percent of the epoch; creating the run and logging the config "
                      f"takes {setup:.2f} s per trial"),
    ]


def run_all(settings: Settings) -> list[Figure]:
    """Run every measurement, MNIST ones only when ``settings.mnist_root`` contains MNIST."""
    figures = measure_overhead(settings, "digits", digits_workload(settings))
    if settings.mnist_root is not None:
        figures += measure_overhead(settings, "MNIST", mnist_workload(settings))
    figures += measure_teacher_reuse(settings, "digits", digits_workload(settings))
    if settings.mnist_root is not None:
        figures += measure_teacher_reuse(settings, "MNIST", mnist_workload(settings))
    figures += measure_loss_cost()
    figures += measure_parallel(settings)
    figures += measure_pruning(settings)
    return figures
