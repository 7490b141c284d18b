#!/usr/bin/env bash
# Check kdsweep on a GPU machine in one run that ends within its time budget (540 s by default).
#
#   benchmarks/gpu_check.sh [MNIST_ROOT [WORKDIR]]
#
# Steps, all in a new work folder:
#   1. Print the GPU, the torch, CUDA and library versions, and check that kdsweep imports.
#   2. An MNIST sweep of 4 trials with the networks of Hinton, Vinyals and Dean (2015)
#      (teacher=mlp_1200x2 student=mlp_800x2), trainer.accelerator=gpu trainer.precision=bf16-mixed,
#      3 epochs for the teacher and for each student.
#   3. A sweep of 1 distilled trial with DDP on one GPU (trainer=ddp trainer.devices=1).
#   4. Read every trial back from MLflow and Optuna and print its wall time, training samples per
#      second and peak GPU memory. A trial that did not complete, a missing metric, or a NaN or
#      infinite metric or loss at any epoch fails the check.
#   5. `python -m benchmarks --quick` in the time left. The suite has no accelerator option: its
#      runs use kdsweep's default trainer.accelerator=auto, which trains on the GPU in 32-bit
#      precision. If the suite fails or runs out of time, the figures of the runs it finished are
#      read back from its MLflow stores instead.
#
# Settings (environment variables; the arguments win over the first two):
#   KDSWEEP_GPU_CHECK_MNIST_ROOT   folder that contains MNIST/raw in torchvision's layout. Default:
#                                  ../shared/data beside the checkout, else shared/data inside it.
#   KDSWEEP_GPU_CHECK_WORKDIR      new or empty folder for every run, log and result. Default: a
#                                  new folder made by mktemp -d.
#   KDSWEEP_GPU_CHECK_ACCELERATOR  gpu (default) or cpu. cpu trains every model on the CPU, the
#                                  DDP trial with gloo (trainer=ddp_cpu), and hides any GPU from
#                                  the benchmark suite, so that the script can be tested without a GPU.
#   KDSWEEP_GPU_CHECK_QUICK        1 for 2 trials of 2 epochs each, on scikit-learn's digits data
#                                  unless KDSWEEP_GPU_CHECK_DATA is set. Default 0.
#   KDSWEEP_GPU_CHECK_DATA         mnist or digits. Default: mnist, or digits when QUICK is 1.
#   KDSWEEP_GPU_CHECK_SECONDS      time budget of the whole script in seconds (default 540). The
#                                  sweep is stopped after 2/5 of it and the DDP sweep after 1/4.
#                                  The benchmark suite gets what is left less 30 seconds, and is
#                                  skipped when that is under 90.
#   KDSWEEP_GPU_CHECK_PYTHON       Python interpreter with kdsweep's dependencies. Default:
#                                  .venv/bin/python in the checkout if it exists, else python3.
#                                  The checkout is put first on PYTHONPATH, so kdsweep itself
#                                  needs no installation.
#
# A machine without network access needs kdsweep's dependencies other than torch and torchvision
# as wheels: download them here with `pip download --no-deps -d WHEELS hydra-core omegaconf
# antlr4-python3-runtime optuna mlflow ...` (the list in pyproject.toml and its dependencies), carry
# WHEELS, and install them there with `pip install --no-index --find-links WHEELS -e .`.
# NOTE: this script has run only on CPU so far (KDSWEEP_GPU_CHECK_ACCELERATOR=cpu below).
#
# Without a GPU, check the script itself with the command below. Three runs on a shared 2-core
# CPU machine took 3 to 3.7 minutes, 2.4 to 3 of them in the benchmark suite.
#   KDSWEEP_GPU_CHECK_ACCELERATOR=cpu KDSWEEP_GPU_CHECK_QUICK=1 benchmarks/gpu_check.sh
#
# Output in the work folder: gpu_check.log (everything printed), summary.txt (versions, trial
# tables, check results, benchmark table), benchmarks.md (the suite's table), the MLflow store
# mlflow.db, the Optuna journal optuna.journal, the sweeps' folders under multirun/ and the
# benchmark runs under benchmarks/. When OUT is set, gpu_check.log and summary.txt are written
# into it as the script runs, and benchmarks.md is copied there at the end.
#
# Exit status: 0 when every check passed, 1 when a step or check failed (summary.txt lists each),
# 2 on invalid settings or a missing dependency.

set -euo pipefail

CHECKOUT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

fail_setup() {
    echo "gpu_check: error: $*" >&2
    exit 2
}

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    # The header comment above is the help text.
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [[ "${1:-}" == -* ]]; then
    fail_setup "$1: unknown option; the arguments are [MNIST_ROOT [WORKDIR]], see --help"
fi

# Settings.

accelerator="${KDSWEEP_GPU_CHECK_ACCELERATOR:-gpu}"
quick="${KDSWEEP_GPU_CHECK_QUICK:-0}"
budget="${KDSWEEP_GPU_CHECK_SECONDS:-540}"
case "$accelerator" in
    gpu | cpu) ;;
    *) fail_setup "KDSWEEP_GPU_CHECK_ACCELERATOR=$accelerator: expected gpu or cpu" ;;
esac
case "$quick" in
    0 | 1) ;;
    *) fail_setup "KDSWEEP_GPU_CHECK_QUICK=$quick: expected 0 or 1" ;;
esac
[[ "$budget" =~ ^[0-9]+$ ]] || fail_setup "KDSWEEP_GPU_CHECK_SECONDS=$budget: expected a whole number of seconds"
if [[ "$quick" == 1 ]]; then
    data="${KDSWEEP_GPU_CHECK_DATA:-digits}"
    sweep_trials=2
    epochs=2
else
    data="${KDSWEEP_GPU_CHECK_DATA:-mnist}"
    sweep_trials=4
    epochs=3
fi
case "$data" in
    mnist | digits) ;;
    *) fail_setup "KDSWEEP_GPU_CHECK_DATA=$data: expected mnist or digits" ;;
esac

has_mnist() {
    compgen -G "$1/MNIST/raw/train-images-idx3-ubyte*" >/dev/null &&
        compgen -G "$1/MNIST/raw/t10k-images-idx3-ubyte*" >/dev/null
}

mnist_root="${1:-${KDSWEEP_GPU_CHECK_MNIST_ROOT:-}}"
if [[ -n "$mnist_root" ]]; then
    has_mnist "$mnist_root" || [[ "$data" != mnist ]] ||
        fail_setup "MNIST root $mnist_root: MNIST/raw/train-images-idx3-ubyte and t10k-images-idx3-ubyte" \
            "not found there"
else
    for candidate in "$CHECKOUT/../shared/data" "$CHECKOUT/shared/data"; do
        if has_mnist "$candidate"; then
            mnist_root="$candidate"
            break
        fi
    done
    if [[ -z "$mnist_root" && "$data" == mnist ]]; then
        fail_setup "MNIST not found under $CHECKOUT/../shared/data/MNIST/raw or $CHECKOUT/shared/data/MNIST/raw;" \
            "give the folder that contains MNIST/raw as the first argument or in KDSWEEP_GPU_CHECK_MNIST_ROOT"
    fi
fi
if [[ -n "$mnist_root" ]]; then
    mnist_root="$(cd "$mnist_root" && pwd)"
fi

work="${2:-${KDSWEEP_GPU_CHECK_WORKDIR:-}}"
if [[ -z "$work" ]]; then
    work="$(mktemp -d -t kdsweep-gpu-check-XXXXXX)"
else
    mkdir -p "$work" || fail_setup "work folder $work: cannot be created"
    # Leftover studies in the folder would continue instead of running new trials.
    [[ -z "$(ls -A "$work")" ]] || fail_setup "work folder $work: not empty; give a new or empty folder"
fi
work="$(cd "$work" && pwd)"
# Paths go into Hydra overrides as quoted strings, which cannot contain the quote itself.
[[ "$work$mnist_root" != *"'"* ]] || fail_setup "the work folder and MNIST root must not contain a single quote (')"

if [[ -n "${KDSWEEP_GPU_CHECK_PYTHON:-}" ]]; then
    python="$KDSWEEP_GPU_CHECK_PYTHON"
elif [[ -x "$CHECKOUT/.venv/bin/python" ]]; then
    python="$CHECKOUT/.venv/bin/python"
else
    python="python3"
fi
command -v "$python" >/dev/null || fail_setup "Python interpreter $python: not found; set KDSWEEP_GPU_CHECK_PYTHON"

export PYTHONPATH="$CHECKOUT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A store or sweep of the calling shell must not receive these runs.
unset MLFLOW_TRACKING_URI KDSWEEP_PARENT_RUN_ID KDSWEEP_STUDY_NAME KDSWEEP_TRIAL_NUMBER
if [[ "$accelerator" == cpu ]]; then
    export CUDA_VISIBLE_DEVICES=""
fi

# Logging: everything printed goes to gpu_check.log, and the summary lines also to summary.txt,
# both in the work folder and, while the script runs, in $OUT.

log_files=("$work/gpu_check.log")
summary_files=("$work/summary.txt")
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    log_files+=("$OUT/gpu_check.log")
    summary_files+=("$OUT/summary.txt")
fi
exec 3>&1 4>&2
exec > >(tee -a "${log_files[@]}") 2>&1
tee_pid=$!

failures=()

finish() {
    local status=$?
    exec 1>&3 2>&4
    wait "$tee_pid" 2>/dev/null || true
    exit "$status"
}
trap finish EXIT

summary() {
    printf '%s\n' "$@" | tee -a "${summary_files[@]}"
}

record_failure() {
    failures+=("$*")
    summary "FAILED: $*"
}

seconds_left() {
    echo $((budget - SECONDS))
}

# Run the kdsweep command in the work folder, stopped with Ctrl-C (SIGINT) after $1 seconds, so
# that its MLflow runs end as KILLED.
run_kdsweep() {
    local limit="$1"
    shift
    echo "\$ (cd $work && timeout $limit $python -m kdsweep.cli $*)"
    (cd "$work" && timeout --signal=INT --kill-after=30 "$limit" "$python" -m kdsweep.cli "$@")
}

# The reader of the sweeps' results, run by the steps below.
cat >"$work/read_runs.py" <<'PYTHON'
"""Print and check what the sweeps of benchmarks/gpu_check.sh logged to MLflow and Optuna.

``sweep`` prints one line per trial of a study and its teachers, and exits 1 when a trial did not
complete, a run lacks a metric, or any logged value is NaN or infinite. ``benchmark-runs`` prints
the figures of the benchmark suite's runs from their MLflow stores, for when the suite ended early.
"""

import argparse
import math
import statistics
import sys
from pathlib import Path

import optuna
from mlflow import MlflowClient

STUDENT_METRICS = ("val/acc", "val/loss", "train/loss", "test/acc", "perf/epoch_seconds",
                   "perf/train_samples_per_second", "perf/run_seconds")
TEACHER_METRICS = ("val/acc", "train/loss", "perf/epoch_seconds", "perf/train_samples_per_second")
GPU_MEMORY = "perf/gpu_max_memory_mb"


def load_study(journal: Path, name: str) -> optuna.Study:
    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def search(client: MlflowClient, filter_string: str) -> list:
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    return client.search_runs(experiment_ids, filter_string=filter_string)


def run_problems(client: MlflowClient, run, label: str, required: tuple[str, ...], accelerator: str) -> list[str]:
    """Return what is wrong with one run: its status, missing metrics, non-finite values, hardware tags."""
    problems = []
    if run.info.status != "FINISHED":
        reason = run.data.tags.get("kdsweep.fail_reason", "no kdsweep.fail_reason tag")
        problems.append(f"{label}: MLflow run {run.info.run_id} ended {run.info.status} ({reason})")
    expected = (*required, GPU_MEMORY) if accelerator == "gpu" else required
    missing = [name for name in expected if name not in run.data.metrics]
    if missing:
        problems.append(f"{label}: metrics missing: {', '.join(missing)}")
    for name in sorted(run.data.metrics):
        for point in client.get_metric_history(run.info.run_id, name):
            if not math.isfinite(point.value):
                problems.append(f"{label}: {name} is {point.value} at step {point.step}")
    device_type = run.data.tags.get("kdsweep.accelerator")
    if device_type != ("cuda" if accelerator == "gpu" else "cpu"):
        problems.append(f"{label}: trained on {device_type}, expected {accelerator}")
    if run.data.tags.get("kdsweep.device_count") != "1":
        problems.append(f"{label}: kdsweep.device_count is {run.data.tags.get('kdsweep.device_count')}, expected 1")
    return problems


def figure(run, name: str, width: int, digits: int) -> str:
    value = run.data.metrics.get(name) if run is not None else None
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def check_sweep(arguments: argparse.Namespace) -> int:
    try:
        study = load_study(arguments.journal, arguments.study)
    except KeyError:
        print(f"FAILED: study {arguments.study} not found in {arguments.journal}")
        return 1
    client = MlflowClient(arguments.tracking_uri)
    students = search(client, f"tags.`optuna.study_name` = '{arguments.study}' and tags.`kdsweep.role` = 'student'")
    run_of_trial = {run.data.tags.get("optuna.trial_number"): run for run in students}
    trials = sorted(study.get_trials(deepcopy=False), key=lambda trial: trial.number)
    problems = []
    if len(trials) != arguments.trials:
        problems.append(f"study {arguments.study}: {len(trials)} trials, expected {arguments.trials}")

    print(f"Study {arguments.study}: trial wall time from Optuna; run, epoch, samples/s and GPU memory from MLflow")
    print(f"{'trial':>5} {'T':>7} {'alpha':>6} {'state':<8} {'val/acc':>7} {'test/acc':>8} {'trial s':>8} "
          f"{'run s':>7} {'epoch s':>8} {'samples/s':>10} {'GPU MiB':>8}  device")
    for trial in trials:
        label = f"study {arguments.study}, trial {trial.number}"
        run = run_of_trial.get(str(trial.number))
        if trial.state != optuna.trial.TrialState.COMPLETE:
            reason = trial.user_attrs.get("fail_reason", "no fail_reason recorded")
            problems.append(f"{label}: ended {trial.state.name} ({reason})")
        elif not all(math.isfinite(value) for value in trial.values):
            problems.append(f"{label}: objective values {trial.values}")
        if run is None:
            problems.append(f"{label}: no MLflow student run")
        else:
            problems += run_problems(client, run, label, STUDENT_METRICS, arguments.accelerator)
        seconds = ((trial.datetime_complete - trial.datetime_start).total_seconds()
                   if trial.datetime_complete and trial.datetime_start else float("nan"))
        device = "-" if run is None else (f"{run.data.tags.get('kdsweep.device_name', '?')} "
                                          f"x{run.data.tags.get('kdsweep.device_count', '?')}")
        print(f"{trial.number:>5} {trial.params.get('distill.temperature', float('nan')):>7.3f} "
              f"{trial.params.get('distill.alpha', float('nan')):>6.3f} {trial.state.name:<8} "
              f"{figure(run, 'val/acc', 7, 4)} {figure(run, 'test/acc', 8, 4)} {seconds:>8.1f} "
              f"{figure(run, 'perf/run_seconds', 7, 1)} {figure(run, 'perf/epoch_seconds', 8, 2)} "
              f"{figure(run, 'perf/train_samples_per_second', 10, 0)} {figure(run, GPU_MEMORY, 8, 0)}  {device}")

    teacher_ids = sorted({run.data.tags["kdsweep.teacher_run_id"] for run in students
                          if "kdsweep.teacher_run_id" in run.data.tags})
    for run_id in teacher_ids:
        teacher = client.get_run(run_id)
        problems += run_problems(client, teacher, f"teacher run {run_id}", TEACHER_METRICS, arguments.accelerator)
        print(f"teacher {run_id}: {teacher.info.status}, val/acc {figure(teacher, 'val/acc', 0, 4)}, "
              f"epoch {figure(teacher, 'perf/epoch_seconds', 0, 2)} s, "
              f"{figure(teacher, 'perf/train_samples_per_second', 0, 0)} samples/s, "
              f"GPU {figure(teacher, GPU_MEMORY, 0, 0)} MiB")

    for problem in problems:
        print(f"FAILED: {problem}")
    print(f"Study {arguments.study}: {'all checks passed' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def benchmark_runs(arguments: argparse.Namespace) -> int:
    stores = sorted(arguments.folder.glob("*/mlflow.db"))
    if not stores:
        print(f"No MLflow store under {arguments.folder}/*/")
    for store in stores:
        client = MlflowClient(f"sqlite:///{store}")
        students = search(client, "tags.`kdsweep.role` = 'student'")
        states = ", ".join(f"{sum(run.info.status == state for run in students)} {state}"
                           for state in sorted({run.info.status for run in students}))
        line = f"{store.parent.name}: {len(students)} student runs ({states or 'none'})"
        for name, unit in (("perf/train_samples_per_second", "samples/s"), ("perf/epoch_seconds", "s per epoch"),
                           ("perf/run_seconds", "s per run")):
            values = [run.data.metrics[name] for run in students if name in run.data.metrics]
            if values:
                line += f"; median {statistics.median(values):.3g} {unit}"
        memory = [run.data.metrics[GPU_MEMORY] for run in students if GPU_MEMORY in run.data.metrics]
        if memory:
            line += f"; peak GPU memory {max(memory):.0f} MiB"
        devices = sorted({run.data.tags.get("kdsweep.device_name", "?") for run in students})
        print(f"{line}; device {', '.join(devices) or '-'}")
    return 0


def main() -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep")
    sweep.add_argument("--tracking-uri", required=True)
    sweep.add_argument("--journal", type=Path, required=True)
    sweep.add_argument("--study", required=True)
    sweep.add_argument("--trials", type=int, required=True, help="number of trials the study must contain")
    sweep.add_argument("--accelerator", choices=("gpu", "cpu"), required=True)
    benchmarks = commands.add_parser("benchmark-runs")
    benchmarks.add_argument("--folder", type=Path, required=True)
    arguments = parser.parse_args()
    return check_sweep(arguments) if arguments.command == "sweep" else benchmark_runs(arguments)


if __name__ == "__main__":
    sys.exit(main())
PYTHON

# 1. Machine, versions and imports.

commit="$(git -C "$CHECKOUT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
summary "kdsweep GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $commit" \
    "work folder: $work" \
    "accelerator: $accelerator, data: $data${mnist_root:+ (MNIST root $mnist_root)}, quick: $quick" \
    "time budget: ${budget} s" \
    "Python: $python"
if command -v nvidia-smi >/dev/null; then
    summary "$(nvidia-smi -L 2>&1 || true)"
    summary "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true)"
else
    summary "nvidia-smi: not found"
fi

if versions="$("$python" - <<'PYTHON' 2>&1
import importlib.metadata
import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"CUDA available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}")
for index in range(torch.cuda.device_count()):
    properties = torch.cuda.get_device_properties(index)
    print(f"GPU {index}: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, "
          f"compute capability {properties.major}.{properties.minor}, bf16 supported: {torch.cuda.is_bf16_supported()}")
packages = ("pytorch-lightning", "torchmetrics", "torchvision", "hydra-core", "optuna", "mlflow")
installed = []
for name in packages:
    try:
        installed.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        installed.append(f"{name} not installed")
print(", ".join(installed))
PYTHON
)"; then
    summary "$versions"
else
    fail_setup "reading the versions with $python failed:"$'\n'"$versions"
fi

missing="$("$python" - <<'PYTHON' 2>&1
import importlib

for module in ("kdsweep.cli", "kdsweep.train", "hydra_plugins.kdsweep_optuna_sweeper.optuna_sweeper",
               "hydra_plugins.kdsweep_sweeps.sweeps_source", "benchmarks.suite", "torchvision"):
    try:
        importlib.import_module(module)
    except ImportError as error:
        print(f"{module}: {error}")
PYTHON
)" || fail_setup "the import check failed: $missing"
[[ -z "$missing" ]] || fail_setup "kdsweep cannot be imported with $python:"$'\n'"$missing"

if [[ "$accelerator" == gpu ]]; then
    "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" ||
        fail_setup "torch sees no CUDA GPU; run with KDSWEEP_GPU_CHECK_ACCELERATOR=cpu to check on the CPU"
    trainer=(trainer.accelerator=gpu trainer.precision=bf16-mixed)
    ddp_trainer=(trainer=ddp trainer.devices=1)
else
    trainer=(trainer.accelerator=cpu trainer.precision=bf16-mixed)
    ddp_trainer=(trainer=ddp_cpu trainer.devices=1 trainer.precision=bf16-mixed)
fi

tracking_uri="sqlite:///$work/mlflow.db"
common=(
    sweep=temperature_alpha teacher=mlp_1200x2 student=mlp_800x2
    "teacher.max_epochs=$epochs" "student.max_epochs=$epochs" trainer.enable_progress_bar=false
    "tracking.uri='$tracking_uri'" "hydra.sweeper.storage='$work/optuna.journal'"
)
if [[ "$data" == mnist ]]; then
    common+=(data=mnist "data.root='$mnist_root'")
fi

# Run one sweep, print kdsweep's table, then check its trials. Arguments: name, time limit in
# seconds, number of trials, then kdsweep overrides.
sweep_and_check() {
    local name="$1" limit="$2" trials="$3"
    shift 3
    local study="gpu-check-$name" started=$SECONDS
    summary "" "== Sweep $name: $trials trial(s), $* (limit ${limit} s)"
    if ! run_kdsweep "$limit" "${common[@]}" "$@" "hydra.sweeper.n_trials=$trials" \
        "hydra.sweeper.study_name=$study" "hydra.sweep.dir='$work/multirun/$name'"; then
        record_failure "sweep $name: kdsweep failed or timed out after ${limit} s (see gpu_check.log)"
    fi
    summary "sweep $name took $((SECONDS - started)) s"
    if [[ -f "$work/multirun/$name/summary.txt" ]]; then
        summary "$(cat "$work/multirun/$name/summary.txt")"
    fi
    if ! "$python" "$work/read_runs.py" sweep --tracking-uri "$tracking_uri" --journal "$work/optuna.journal" \
        --study "$study" --trials "$trials" --accelerator "$accelerator" 2>&1 | tee -a "${summary_files[@]}"; then
        record_failure "sweep $name: the checks of its trials failed (see above)"
    fi
}

# 2. The sweep over T and alpha.

sweep_and_check sweep $((budget * 2 / 5)) "$sweep_trials" "${trainer[@]}"

# 3. One distilled trial with data parallelism on a single device. Its trainer settings differ,
# so it trains its own teacher, under DDP too.

sweep_and_check ddp $((budget / 4)) 1 "${ddp_trainer[@]}" \
    "hydra.sweeper.enqueue=[{distill.alpha: 0.5, distill.temperature: 4.0}]"

# 4. The benchmark suite in the time left. Its parallel-trials measurement runs 2 trials at once
# with trainer.accelerator=auto, so on one GPU the two trials share it. If the suite fails or runs
# out of time it prints no table, so the figures of its finished runs are read from MLflow below.

summary "" "== Benchmark suite (python -m benchmarks --quick)"
bench_limit=$(($(seconds_left) - 30))
if ((bench_limit < 90)); then
    summary "Not run: ${bench_limit} s left of the budget, under the 90 s it needs at least."
else
    # With digits as the data, the suite is pointed at a folder without MNIST so that it skips the
    # MNIST figures, as the sweeps did.
    bench_mnist="$mnist_root"
    if [[ "$data" != mnist || -z "$bench_mnist" ]]; then
        bench_mnist="$work/no-mnist"
    fi
    summary "limit ${bench_limit} s; the suite trains with trainer.accelerator=auto and 32-bit precision"
    bench_started=$SECONDS
    echo "\$ timeout $bench_limit $python -m benchmarks --quick --mnist-root $bench_mnist" \
        "--workdir $work/benchmarks --output $work/benchmarks.md"
    if (cd "$CHECKOUT" && timeout --signal=INT --kill-after=30 "$bench_limit" "$python" -m benchmarks --quick \
        --mnist-root "$bench_mnist" --workdir "$work/benchmarks" --output "$work/benchmarks.md"); then
        summary "benchmark suite took $((SECONDS - bench_started)) s" "$(cat "$work/benchmarks.md")"
    else
        status=$?
        record_failure "benchmark suite: failed with exit status $status after $((SECONDS - bench_started)) s" \
            "(status 124 or 130 means it timed out)"
        summary "Figures of the runs it finished, read from their MLflow stores:"
        "$python" "$work/read_runs.py" benchmark-runs --folder "$work/benchmarks" 2>&1 | tee -a "${summary_files[@]}" ||
            summary "reading the benchmark runs failed (see above)"
    fi
fi

# 5. Result.

if [[ -n "${OUT:-}" && -f "$work/benchmarks.md" ]]; then
    cp "$work/benchmarks.md" "$OUT/benchmarks.md"
fi
summary "" "== Result after $SECONDS s"
if ((${#failures[@]} > 0)); then
    summary "${#failures[@]} step(s) failed:" "${failures[@]/#/  - }"
    exit 1
fi
summary "All checks passed. Work folder: $work"
