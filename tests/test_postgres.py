"""Two sweep processes sharing one study on a real PostgreSQL server on loopback."""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

import optuna
import pytest
from optuna.trial import TrialState

from test_sweeper import write_sweep, STUDY
from conftest import FAST, start_kdsweep, wait_for_success


def postgres_binaries() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        message = "PostgreSQL server binaries are missing; .ci/run installs Debian's postgresql package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return os.path.dirname(found[-1])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres_url():
    """Start a throwaway PostgreSQL server on 127.0.0.1 and return a database URL on it."""
    binaries = postgres_binaries()
    folder = tempfile.mkdtemp(prefix="kdsweep-pg-")  # Outside pytest's folders, which only root may enter.
    data = os.path.join(folder, "data")
    run_as = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root.
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def postgres(*command: str) -> None:
        subprocess.run([*run_as, *command], check=True, capture_output=True, timeout=120)

    postgres(f"{binaries}/initdb", "-D", data, "-U", "kdsweep", "--auth=trust")
    postgres(f"{binaries}/pg_ctl", "-D", data, "-w", "-l", os.path.join(folder, "server.log"),
             "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        postgres(f"{binaries}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "kdsweep", "optuna")
        yield f"postgresql://kdsweep@127.0.0.1:{port}/optuna"
    finally:
        postgres(f"{binaries}/pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_processes_share_postgres_study(tmp_path, postgres_url):
    arguments = write_sweep(tmp_path, "postgres", {
        "n_trials": 4,
        "storage": postgres_url,
        "params": {"distill.temperature": "tag(log, interval(1, 20))"},
    })
    arguments += [*FAST, "distill.alpha=0"]
    processes = [start_kdsweep(arguments, tmp_path, f"sweep-{index}.log") for index in range(2)]
    for index, process in enumerate(processes):
        wait_for_success(process, tmp_path / f"sweep-{index}.log")

    study = optuna.load_study(study_name=STUDY, storage=postgres_url)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["kdsweep.process"] for t in study.trials}) == 2
