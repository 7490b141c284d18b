"""Study housekeeping: the lock that keeps the trial count exact, trials left by dead processes, and results."""

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
import yaml
from filelock import FileLock
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

HOST_ATTR = "kdsweep.host"
PROCESS_ATTR = "kdsweep.process"
HEARTBEAT_ATTR = "kdsweep.heartbeat"
# A trial of another host is stale once its heartbeat is this many intervals old.
STALE_INTERVALS = 3


@contextlib.contextmanager
def trial_claim_lock(location: str) -> Iterator[None]:
    """Hold a lock shared by every sweep process on this study's storage while one counts trials and requests the next.

    A journal or SQLite file is locked with a file lock beside it (processes on one host). A
    PostgreSQL database is locked with an advisory lock (processes on any host).
    """
    if location.startswith("postgresql"):
        with _postgres_advisory_lock(location):
            yield
        return
    if "://" in location and not location.startswith("sqlite:///"):
        # NOTE: other databases get no lock, so concurrent sweep processes may overshoot n_trials.
        yield
        return
    path = location.removeprefix("sqlite:///")
    with FileLock(f"{path}.claim.lock"):
        yield


@contextlib.contextmanager
def _postgres_advisory_lock(url: str) -> Iterator[None]:
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(b"kdsweep-trial-claim").digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    engine.dispose()


def process_identity(pid: int) -> Optional[str]:
    """Return ``"<pid>:<start time>"`` for a live process on this host, or None when it is gone.

    The start time (from /proc on Linux) distinguishes a reused pid from the original process.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return f"{pid}:{fields[19]}"  # Field 22 of stat: the start time in clock ticks since boot.
    except (OSError, IndexError):
        return f"{pid}:unknown"


def mark_trial_owner(trial: optuna.Trial) -> None:
    """Record which process on which host runs the trial, so a later sweep can tell when it died."""
    trial.set_user_attr(HOST_ATTR, socket.gethostname())
    trial.set_user_attr(PROCESS_ATTR, process_identity(os.getpid()))
    trial.set_user_attr(HEARTBEAT_ATTR, time.time())


class Heartbeat:
    """A daemon thread that stamps the current time on this process's running trials every ``interval`` seconds.

    Optuna's own heartbeat runs only inside ``study.optimize``, not for ask-and-tell trials.
    """

    def __init__(self, study: optuna.Study, interval: float) -> None:
        self.study = study
        self.interval = interval
        self.trial_ids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="kdsweep-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            for trial_id in list(self.trial_ids):
                try:
                    self.study._storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())
                except optuna.exceptions.UpdateFinishedTrialError:
                    self.trial_ids.discard(trial_id)
                except Exception as error:  # A storage hiccup must not end the sweep; the next beat retries.
                    log.warning("Heartbeat for trial id %d failed: %s", trial_id, error)

    def stop(self) -> None:
        self._stop.set()


def fail_orphaned_trials(study: optuna.Study, heartbeat_interval: float) -> list[FrozenTrial]:
    """Mark FAIL the RUNNING trials whose sweep process has died; return them.

    On this host a process is checked directly. A trial of another host counts as orphaned once its
    heartbeat is STALE_INTERVALS intervals old. NOTE: that assumes the hosts' clocks roughly agree.
    """
    host = socket.gethostname()
    now = time.time()
    orphaned = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(PROCESS_ATTR)
        owner_host = trial.user_attrs.get(HOST_ATTR)
        if owner is None:
            continue
        if owner_host == host:
            pid = int(owner.split(":")[0])
            if process_identity(pid) == owner:
                continue
            reason = f"the sweep process {pid} on {host} ended while the trial was running"
        else:
            age = now - trial.user_attrs.get(HEARTBEAT_ATTR, 0.0)
            if age < STALE_INTERVALS * heartbeat_interval:
                continue
            reason = f"the sweep process on {owner_host} sent no heartbeat for {age:.0f} s"
        if fail_running_trial(study, trial, reason):
            orphaned.append(trial)
    return orphaned


def fail_running_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with ``reason``; return False when another process finished it first."""
    try:
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    log.warning("Trial %d finished: state=FAIL (%s)", trial.number, reason)
    return True


def write_results(study: optuna.Study, folder: Path) -> Path:
    """Write the best trial (or the Pareto front) and the trial counts to ``folder/results.yaml``."""
    trials = study.get_trials(deepcopy=False)
    results: dict[str, Any] = {
        "study_name": study.study_name,
        "directions": [direction.name.lower() for direction in study.directions],
        "trials": {state.name: sum(t.state == state for t in trials) for state in TrialState if state.is_finished()},
    }
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if completed and len(study.directions) == 1:
        best = study.best_trial
        results["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}
    elif completed:
        results["pareto_front"] = [
            {"number": t.number, "values": t.values, "params": t.params, "mlflow_run_id": t.user_attrs.get("mlflow_run_id")}
            for t in study.best_trials
        ]
    path = folder / "results.yaml"
    path.write_text(yaml.safe_dump(results, sort_keys=False))
    return path


def write_plots(study: optuna.Study, folder: Path, temperature_key: str, alpha_key: str) -> list[Path]:
    """Save Optuna's standard plots of the study as PNG files; a plot the study cannot support yet is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    target = None if len(study.directions) == 1 else (lambda t: t.values[0])
    swept = set(study.best_trials[0].params) if study.best_trials else set()
    plots = {
        "optimization_history": lambda: optuna_plots.plot_optimization_history(study, target=target),
        "param_importances": lambda: optuna_plots.plot_param_importances(study, target=target),
        "parallel_coordinate": lambda: optuna_plots.plot_parallel_coordinate(study, target=target),
    }
    if {temperature_key, alpha_key} <= swept:
        plots["contour_temperature_alpha"] = lambda: optuna_plots.plot_contour(
            study, params=[temperature_key, alpha_key], target=target)

    written = []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                # Optuna marks its matplotlib plots experimental, and small studies give degenerate axes.
                warnings.simplefilter("ignore")
                axes = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            log.info("Skipped the %s plot: %s", name, error)
            continue
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
