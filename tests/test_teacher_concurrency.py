"""Two kdsweep processes that need the same teacher at once: one trains it, the other waits for it."""

from conftest import FAST, runs_of_role, start_kdsweep, wait_for_success


def test_two_processes_train_one_teacher(tmp_path, tracking_uri):
    # The teacher trains for 30 epochs, so the second process requests it while the first trains it.
    arguments = [*FAST, "teacher.max_epochs=30"]
    processes = [start_kdsweep([*arguments, f"distill.alpha={alpha}"], tmp_path, f"run-{index}.log")
                 for index, alpha in enumerate((0.3, 0.7))]
    for index, process in enumerate(processes):
        wait_for_success(process, tmp_path / f"run-{index}.log")

    teachers = runs_of_role(tracking_uri, "teacher")
    students = runs_of_role(tracking_uri, "student")
    assert len(teachers) == 1
    assert len(students) == 2
    assert {run.data.tags["kdsweep.teacher_run_id"] for run in students} == {teachers[0].info.run_id}
    assert sorted(run.data.tags["kdsweep.teacher_logits"] for run in students) == ["cached", "computed"]
    logs = [(tmp_path / f"run-{index}.log").read_text() for index in range(2)]
    assert sum("is not cached; training it" in log for log in logs) == 1
    assert sum("Reusing cached teacher" in log for log in logs) == 1
