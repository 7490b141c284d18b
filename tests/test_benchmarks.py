"""The benchmark suite in its quick form: every measurement runs and reads real runs back."""

import math
import re
import subprocess
import sys

from conftest import CHECKOUT, kdsweep_environment


def test_quick_suite_reports_every_figure(tmp_path):
    output = tmp_path / "table.md"
    environment = kdsweep_environment()
    environment.pop("OMP_NUM_THREADS")  # The suite sets the thread count of each command itself.
    environment["PYTHONPATH"] = str(CHECKOUT)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--mnist-root", str(tmp_path / "no-mnist"),
         "--workdir", str(tmp_path / "runs"), "--output", str(output)],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping the MNIST figures" in result.stderr
    rows = {}
    for line in output.read_text().splitlines():
        match = re.match(r"\| ((?:digits|loss)[^|]+) \| (\S+) ", line)
        if match:
            rows[match.group(1)] = float(match.group(2))
    expected = [
        "digits: trial / hand-written loop",
        "digits: teacher trainings in a sweep of 2 trials",
        "digits: MLflow time per epoch",
        "digits: training samples per second",
        "digits: distillation epoch / cross-entropy epoch",
        "digits: start-up, process start to first training step",
        "digits: steady-state throughput, 2 concurrent trials / 1",
        "digits: whole-sweep throughput, 2 concurrent trials / 1",
        "loss on 128x10 logits: distillation / cross-entropy",
        "digits: epochs saved by pruning",
        "digits: best val/acc, unpruned minus pruned",
    ]
    assert sorted(rows) == sorted(expected)
    assert rows["digits: teacher trainings in a sweep of 2 trials"] == 1
    for name in expected[:8]:
        assert math.isfinite(rows[name]), f"{name} is {rows[name]}"
        assert rows[name] > 0, f"{name} is {rows[name]}"
    assert "teacher logits computed 1 time(s)" in output.read_text()


def test_unwritable_paths_rejected_at_once(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    environment = {**kdsweep_environment(), "PYTHONPATH": str(CHECKOUT)}
    for option, value in (("--workdir", a_file), ("--output", tmp_path / "missing" / "table.md")):
        result = subprocess.run([sys.executable, "-m", "benchmarks", option, str(value)], cwd=tmp_path,
                                env=environment, capture_output=True, text=True, timeout=60)

        assert result.returncode == 2, option
        assert f"error: {option} {value}" in result.stderr
