import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, MNIST_ROOT
from kdsweep.data import IndexBatchSampler, _load_splits, load_splits


def digits_config(**changes):
    settings = {"name": "digits", "test_fraction": 0.2, "val_fraction": 0.2, "split_seed": 0, **changes}
    return OmegaConf.create(settings)


def test_digits_split_sizes_and_shapes():
    splits = load_splits(digits_config())

    assert (len(splits.train), len(splits.val), len(splits.test)) == (1149, 288, 360)
    assert splits.input_shape == (1, 8, 8)
    assert splits.num_classes == 10


def test_digits_split_repeats_with_same_seed():
    first = load_splits(digits_config(split_seed=3))
    _load_splits.cache_clear()
    second = load_splits(digits_config(split_seed=3))
    other = load_splits(digits_config(split_seed=4))

    assert first is not second
    assert torch.equal(first.test.tensors[0], second.test.tensors[0])
    assert torch.equal(first.train.tensors[1], second.train.tensors[1])
    assert not torch.equal(first.test.tensors[0], other.test.tensors[0])


def test_digits_splits_are_disjoint():
    splits = load_splits(digits_config())
    rows = {tuple(x.flatten().tolist()) + (int(y),) for part in (splits.train, splits.val)
            for x, y in zip(*part.tensors)}
    test_rows = [tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(*splits.test.tensors)]

    # The digits data contains a few exact duplicate images, so allow a handful of coincidences.
    assert sum(row in rows for row in test_rows) <= 5


def test_training_data_is_standardised():
    train_images = load_splits(digits_config()).train.tensors[0]

    assert train_images.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train_images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_batch_sampler_covers_each_index_once():
    sampler = IndexBatchSampler(103, 10, shuffle=True, seed=0)

    batches = list(sampler)
    indices = torch.cat(batches)

    assert len(batches) == len(sampler) == 11
    assert sorted(indices.tolist()) == list(range(103))
    assert not torch.equal(indices, torch.arange(103))
    assert not torch.equal(torch.cat(list(sampler)), indices), "each epoch should draw a new order"


def test_batch_sampler_repeats_with_seed():
    first = torch.cat(list(IndexBatchSampler(50, 8, shuffle=True, seed=7)))
    second = torch.cat(list(IndexBatchSampler(50, 8, shuffle=True, seed=7)))

    assert torch.equal(first, second)


@pytest.mark.skipif(not (MNIST_ROOT / "MNIST" / "raw").is_dir(), reason="MNIST files not present")
def test_mnist_student_trains_one_epoch(kdsweep, tmp_path):
    result = kdsweep(*FAST, "data=mnist", f"data.root={MNIST_ROOT}", "student.max_epochs=1", "distill.alpha=0",
                     "student.model.hidden_sizes=[32]")

    assert "Student run" in result.stdout + result.stderr
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kdsweep-mnist")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.name"] == "mnist"
    assert run.data.metrics["test/acc"] > 0.8
