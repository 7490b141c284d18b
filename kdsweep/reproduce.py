"""The ``kdsweep-reproduce`` command: run a logged run again from its logged config, and compare the results.

The logged ``config.yaml`` is the whole resolved config, so the run is rebuilt without the
``conf/`` folder it came from. The reproduction runs as a single ``kdsweep`` run in a new process,
into a new MLflow run in the same experiment, tagged ``kdsweep.reproduction_of``. Every final
metric is compared, except the ``perf/`` and ``inference/`` timings, which change from run to run.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from kdsweep import distributed, provenance, tracking
from kdsweep.footprint import INFERENCE_PREFIX
from kdsweep.timing import PERF_PREFIX

# Default tolerance when the original or the reproduction ran on a GPU. NOTE: a guess, not measured:
# GPU kernels may sum in another order from run to run, and bf16 rounds coarsely.
GPU_TOLERANCE = 1e-3
# Tags that must match for the two runs to count as the same, whatever the tolerance.
SAME_DATA_TAGS = (provenance.DATA_FINGERPRINT_TAG,)
# Tags of the trained weights, which match only in an exact (tolerance 0) reproduction.
WEIGHT_TAGS = (provenance.CHECKPOINT_HASH_TAG, provenance.TEACHER_CHECKPOINT_HASH_TAG)
MATCH_TAG = "kdsweep.reproduction_match"


class ReproduceError(Exception):
    """Bad input: a run that cannot be reproduced, or an option out of range."""


@dataclass
class Comparison:
    """The metrics and tags of an original run and its reproduction, with those that differ."""

    rows: list[tuple[str, Optional[float], Optional[float]]]
    differing: list[str]
    tag_rows: list[tuple[str, str, str]]


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kdsweep-reproduce",
        description="Run a logged kdsweep teacher or student run again from its logged config, into a new MLflow "
                    "run, and compare every final metric. Exit 0 when all match within the tolerance, 1 when any "
                    "differs, 2 on bad input.")
    parser.add_argument("run_id", help="the MLflow run id of a teacher or student run")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides for settings that locate files on this machine, e.g. data.root=/data")
    parser.add_argument("--tracking-uri", help="the MLflow store of the run (default: $MLFLOW_TRACKING_URI, else "
                                               "mlflow.db in the working directory)")
    parser.add_argument("--tolerance", type=float,
                        help=f"the largest absolute difference allowed per metric (default: 0 when both runs "
                             f"trained on CPU, else {GPU_TOLERANCE})")
    parser.add_argument("--allow-code-change", action="store_true",
                        help="run even when this checkout's commit or uncommitted changes differ from the run's")
    parser.add_argument("--retrain-teacher", action="store_true",
                        help="for a student, train its teacher again in a new cache instead of reusing the cached one")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        client, uri = tracking.existing_store_client(arguments.tracking_uri)
        original = find_run(client, arguments.run_id, uri)
        role = run_role(original)
        check_tolerance(arguments.tolerance)
        with tempfile.TemporaryDirectory(prefix="kdsweep-reproduce-") as folder:
            config = download_config(client, original, Path(folder))
            check_code(original, arguments.allow_code_change)
            reproduction_id = run_again(original, role, config, uri, arguments)
    except (ReproduceError, FileNotFoundError) as error:
        print(f"kdsweep-reproduce: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("kdsweep-reproduce: interrupted", file=sys.stderr)
        sys.exit(130)

    reproduction = client.get_run(reproduction_id)
    tolerance = arguments.tolerance if arguments.tolerance is not None else default_tolerance(original, reproduction)
    comparison = compare(original, reproduction, tolerance)
    client.set_tag(reproduction_id, MATCH_TAG, str(not comparison.differing).lower())
    print(format_comparison(original, reproduction, comparison, tolerance))
    sys.exit(1 if comparison.differing else 0)


def find_run(client: MlflowClient, run_id: str, uri: str) -> Run:
    from mlflow.exceptions import MlflowException

    from sqlalchemy.exc import SQLAlchemyError

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ReproduceError(f"run_id={run_id}: no such run in the MLflow store {uri}") from None
    except SQLAlchemyError as error:
        raise ReproduceError(f"--tracking-uri={uri}: cannot be read as an MLflow store "
                             f"({type(error).__name__})") from None


def run_role(run: Run) -> str:
    role = run.data.tags.get(tracking.ROLE_TAG)
    if role == "sweep":
        raise ReproduceError(f"run_id={run.info.run_id}: a sweep's parent run; give the run id of one of its "
                             f"trials (its child runs)")
    if role not in ("teacher", "student"):
        raise ReproduceError(f"run_id={run.info.run_id}: not a kdsweep teacher or student run (tag "
                             f"{tracking.ROLE_TAG}={role!r})")
    if run.info.status != "FINISHED":
        raise ReproduceError(f"run_id={run.info.run_id}: the run ended {run.info.status}, so it has no final "
                             f"metrics to compare; reproduce a FINISHED run")
    return role


def check_tolerance(tolerance: Optional[float]) -> None:
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise ReproduceError(f"--tolerance={tolerance}: must be a finite number >= 0")


def check_code(run: Run, allow_change: bool) -> None:
    """Raise ReproduceError when this checkout's code differs from the run's, unless ``allow_change``."""
    tags = run.data.tags
    logged_commit = tags.get(provenance.GIT_COMMIT_TAG)
    logged_diff = tags.get(provenance.GIT_DIFF_HASH_TAG, "")
    code = provenance.code_state()
    if logged_commit is None or code.commit is None:
        where = f"run {run.info.run_id}" if logged_commit is None else "this installation of kdsweep"
        problem = f"{where} records no git commit, so the code cannot be compared"
    elif logged_commit != code.commit:
        problem = f"run {run.info.run_id} ran commit {logged_commit}, but this checkout is at {code.commit}; " \
                  f"check out {logged_commit[:12]}"
    elif logged_diff != code.diff_sha256:
        if logged_diff:
            fix = f"apply the run's artifact {provenance.DIFF_ARTIFACT} to a clean checkout of that commit"
        else:
            fix = "commit or stash this checkout's changes"
        state = "with uncommitted changes" if logged_diff else "on a clean tree"
        problem = f"run {run.info.run_id} ran commit {logged_commit[:12]} {state}, but this checkout's uncommitted " \
                  f"changes differ; {fix}"
    else:
        return
    if allow_change:
        print(f"kdsweep-reproduce: warning: {problem}; running anyway (--allow-code-change)", file=sys.stderr)
        return
    raise ReproduceError(f"{problem}, or pass --allow-code-change to run anyway")


def download_config(client: MlflowClient, run: Run, folder: Path) -> Path:
    from mlflow.exceptions import MlflowException

    try:
        path = client.download_artifacts(run.info.run_id, tracking.CONFIG_ARTIFACT, str(folder))
    except (MlflowException, OSError):
        raise ReproduceError(f"run_id={run.info.run_id}: the run has no logged config "
                             f"({tracking.CONFIG_ARTIFACT} artifact), so it cannot be rebuilt") from None
    return Path(path)


def run_again(original: Run, role: str, config: Path, uri: str, arguments: argparse.Namespace) -> str:
    """Run the logged config as a new ``kdsweep`` single run; return the new MLflow run id of ``role``."""
    folder = config.parent
    result_file = folder / "result.json"
    overrides = [f"tracking.uri={uri}", *arguments.overrides]
    repeated = {role: original.info.run_id}
    if role == "teacher":
        # A fresh cache, so that the teacher trains again rather than being found in the cache.
        overrides += ["++teacher_only=true", f"teacher_cache_dir={folder / 'teacher_cache'}"]
    elif arguments.retrain_teacher:
        overrides.append(f"teacher_cache_dir={folder / 'teacher_cache'}")
        teacher_run = original.data.tags.get(tracking.TEACHER_RUN_TAG)
        if teacher_run:
            repeated["teacher"] = teacher_run
    command = [sys.executable, "-m", "kdsweep.cli", "--config-path", str(folder), "--config-name", config.stem,
               *overrides]
    environment = {
        **{key: value for key, value in os.environ.items() if not key.startswith("KDSWEEP_")},
        tracking.REPRODUCTION_ENV: json.dumps(repeated),
        distributed.RESULT_FILE_ENV: str(result_file),
    }
    print(f"kdsweep-reproduce: running {role} run {original.info.run_id} again: kdsweep "
          f"{' '.join(overrides)}", file=sys.stderr, flush=True)
    returncode = subprocess.run(command, env=environment).returncode
    if returncode != 0 or not result_file.exists():
        print(f"kdsweep-reproduce: the reproduction failed (exit status {returncode}); its output is above",
              file=sys.stderr)
        sys.exit(1)
    outcome = json.loads(result_file.read_text())
    return outcome["result"]["run_id"]


def default_tolerance(original: Run, reproduction: Run) -> float:
    on_cpu = all(run.data.tags.get(tracking.ACCELERATOR_TAG) == "cpu" for run in (original, reproduction))
    return 0.0 if on_cpu else GPU_TOLERANCE


def compare(original: Run, reproduction: Run, tolerance: float) -> Comparison:
    """Compare every final metric but the timings, and the data and weight fingerprints."""
    names = sorted({*original.data.metrics, *reproduction.data.metrics} - {"step"})
    rows, differing = [], []
    for name in names:
        if name.startswith((PERF_PREFIX, INFERENCE_PREFIX)):
            continue
        before, after = original.data.metrics.get(name), reproduction.data.metrics.get(name)
        rows.append((name, before, after))
        if before is None or after is None or not abs(after - before) <= tolerance:
            differing.append(name)

    tag_rows = []
    for name in (*SAME_DATA_TAGS, *WEIGHT_TAGS):
        before, after = original.data.tags.get(name), reproduction.data.tags.get(name)
        if before is None and after is None:
            continue
        tag_rows.append((name, before or "-", after or "-"))
        counts = name in SAME_DATA_TAGS or tolerance == 0
        if counts and before is not None and before != after:
            differing.append(name)
    return Comparison(rows=rows, differing=differing, tag_rows=tag_rows)


def format_comparison(original: Run, reproduction: Run, comparison: Comparison, tolerance: float) -> str:
    header = ("metric", "original", "reproduction", "difference")
    lines = [f"Run {original.info.run_id} ({original.data.tags.get(tracking.ROLE_TAG)}) reproduced as run "
             f"{reproduction.info.run_id}, compared with tolerance {tolerance:g}:"]
    table = [header]
    for name, before, after in comparison.rows:
        difference = "missing" if before is None or after is None else f"{after - before:.3g}"
        table.append((name, _value(before), _value(after), difference))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    for name, before, after in comparison.tag_rows:
        lines.append(f"{name}: {'equal' if before == after else f'{before} before, {after} now'}")
    if comparison.differing:
        lines.append(f"DIFFERENT: {len(comparison.differing)} differ beyond tolerance {tolerance:g}: "
                     f"{', '.join(comparison.differing)}")
    else:
        lines.append(f"REPRODUCED: all {len(comparison.rows)} metrics within tolerance {tolerance:g}")
    return "\n".join(lines)


def _value(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.10g}"


if __name__ == "__main__":
    main()
