import torch
from omegaconf import OmegaConf

from conftest import FAST, runs_of_role
from kdsweep.teacher_cache import teacher_cache_key


def test_second_run_reuses_cached_teacher(kdsweep, tmp_path, tracking_uri):
    first = kdsweep(*FAST, "distill.alpha=0.5")
    second = kdsweep(*FAST, "distill.alpha=0.9", "distill.temperature=2")

    (teacher,) = runs_of_role(tracking_uri, "teacher")
    students = runs_of_role(tracking_uri, "student")
    assert len(students) == 2
    assert all(run.data.tags["kdsweep.teacher_run_id"] == teacher.info.run_id for run in students)
    assert "is not cached; training it" in first.stdout + first.stderr
    assert "Reusing cached teacher" in second.stdout + second.stderr
    assert "is not cached" not in second.stdout + second.stderr
    logit_sources = sorted(run.data.tags["kdsweep.teacher_logits"] for run in students)
    assert logit_sources == ["cached", "computed"]
    (weights,) = (tmp_path / "teacher_cache").glob("*[0-9a-f].pt")
    state_dict = torch.load(weights, weights_only=True)
    assert all(isinstance(value, torch.Tensor) for value in state_dict.values())


def test_changed_teacher_setting_trains_new_teacher(kdsweep, tracking_uri):
    kdsweep(*FAST)
    kdsweep(*FAST, "teacher.optimizer.lr=0.01")

    assert len(runs_of_role(tracking_uri, "teacher")) == 2


def test_cache_key_ignores_data_location_and_student():
    cfg = OmegaConf.create({
        "data": {"name": "mnist", "root": "a", "download": False, "val_size": 5000, "split_seed": 0},
        "teacher": {"model": {"_target_": "kdsweep.models.MLP"}, "max_epochs": 3},
        "student": {"max_epochs": 1},
        "trainer": {"precision": "32-true", "enable_progress_bar": True},
        "distill": {"alpha": 0.5},
        "seed": 0,
    })
    moved = cfg.copy()
    moved.data.root = "elsewhere"
    moved.trainer.enable_progress_bar = False
    moved.student.max_epochs = 9
    moved.distill.alpha = 0.1
    reseeded = cfg.copy()
    reseeded.seed = 1
    resplit = cfg.copy()
    resplit.data.split_seed = 1

    assert teacher_cache_key(cfg) == teacher_cache_key(moved)
    assert teacher_cache_key(cfg) != teacher_cache_key(reseeded)
    assert teacher_cache_key(cfg) != teacher_cache_key(resplit)
