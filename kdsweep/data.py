"""Datasets held as tensors in memory, split once with a fixed seed, and batched by index tensors.

Every built-in dataset is small enough to live in memory as one float32 tensor per split, so a
batch is a single indexing operation rather than per-sample Python work.
"""

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler, TensorDataset

from kdsweep.provenance import tensors_sha256

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")

# Settings that locate the files rather than choose the data, so cache keys leave them out.
LOCATION_KEYS = ("root", "download")


@dataclass(frozen=True)
class DataSplits:
    """Standardised train, validation and test tensors of one dataset."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    # SHA-256 of the standardised split tensors (images and labels of train, val and test, in order).
    fingerprint: str = ""
    # Per-channel mean and standard deviation of the raw training pixels (in [0, 1]), which
    # standardised every split. Augmentation un-standardises with them to work on pixel values.
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing from ``data.root`` and ``data.download`` is false."""


def load_splits(data_cfg: DictConfig) -> DataSplits:
    """Load, split and standardise the dataset that ``data_cfg`` names (cached per process)."""
    settings = OmegaConf.to_container(data_cfg, resolve=True)
    return _load_splits(json.dumps(settings, sort_keys=True))


def raw_split(data_cfg: DictConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the images (pixel values in [0, 1], not standardised) and labels of one split: train, val or test."""
    settings = OmegaConf.to_container(data_cfg, resolve=True)
    train, val, test = _read_splits(settings)
    return {"train": train, "val": val, "test": test}[split]


@functools.lru_cache(maxsize=2)
def _load_splits(settings_json: str) -> DataSplits:
    train, val, test = _read_splits(json.loads(settings_json))
    mean, std = _channel_statistics(train[0])
    datasets = [TensorDataset((x - mean) / std, y) for x, y in (train, val, test)]
    num_classes = int(max(int(y.max()) for _, y in (train, val, test)) + 1)
    fingerprint = tensors_sha256(tensor for dataset in datasets for tensor in dataset.tensors)
    return DataSplits(*datasets, input_shape=tuple(train[0].shape[1:]), num_classes=num_classes,
                      fingerprint=fingerprint, mean=tuple(mean.flatten().tolist()), std=tuple(std.flatten().tolist()))


def _read_splits(settings: dict) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Read the dataset and split it into raw (images, labels) pairs for train, val and test."""
    name = settings["name"]
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r} is not a known dataset; choose one of {', '.join(DATASETS)}")

    if name == "digits":
        images, labels = _read_digits()
        split_seed = settings["split_seed"]
        rest, test_idx = _stratified_split(labels, settings["test_fraction"], split_seed)
        images, labels, test = images[rest], labels[rest], (images[test_idx], labels[test_idx])
        train_idx, val_idx = _stratified_split(labels, settings["val_fraction"], split_seed)
        train = (images[train_idx], labels[train_idx])
        val = (images[val_idx], labels[val_idx])
    else:
        (train_images, train_labels), test = _read_torchvision(name, settings["root"], settings["download"])
        train_idx, val_idx = _random_split(len(train_labels), settings["val_size"], settings["split_seed"])
        train = (train_images[train_idx], train_labels[train_idx])
        val = (train_images[val_idx], train_labels[val_idx])
    return train, val, test


def with_extra_tensors(splits: DataSplits, train: torch.Tensor, val: torch.Tensor) -> DataSplits:
    """Return ``splits`` whose training and validation samples carry one more tensor each (e.g. logits)."""
    return dataclasses.replace(
        splits,
        train=TensorDataset(*splits.train.tensors, train),
        val=TensorDataset(*splits.val.tensors, val),
    )


def _read_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    return images, torch.from_numpy(digits.target.astype(np.int64))


def _read_torchvision(name: str, root: str, download: bool):
    from torchvision import datasets

    dataset_class = {
        "mnist": datasets.MNIST,
        "fashion_mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]
    root_path = Path(root).expanduser()
    try:
        parts = [dataset_class(str(root_path), train=train, download=download) for train in (True, False)]
    except RuntimeError as error:
        if download:
            raise
        raise DatasetNotFoundError(
            f"data.root={root!r}: {dataset_class.__name__} files not found ({error}); "
            f"point data.root at the folder that contains them or set data.download=true"
        ) from None

    splits = []
    for part in parts:
        images = torch.as_tensor(np.asarray(part.data))
        if images.ndim == 3:  # (N, H, W) greyscale
            images = images.unsqueeze(1)
        else:  # (N, H, W, C) colour
            images = images.permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(part.targets), dtype=torch.int64)
        splits.append((images.float().div_(255.0).contiguous(), labels))
    return splits[0], splits[1]


def _stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    try:
        remaining, held_out = train_test_split(indices, test_size=fraction, random_state=seed,
                                               stratify=labels.numpy())
    except ValueError as error:
        raise ValueError(f"data: a fraction of {fraction} cannot split {len(labels)} images by class ({error})") from None
    return np.sort(remaining), np.sort(held_out)


def _random_split(size: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < val_size < size:
        raise ValueError(f"data.val_size={val_size} must be between 1 and {size - 1}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def _channel_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the training images, shaped to broadcast."""
    mean = images.mean(dim=(0, 2, 3), keepdim=True)
    std = images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return mean, std


class IndexBatchSampler(Sampler[torch.Tensor]):
    """Yield whole batches of indices as tensors: a fresh permutation per epoch when shuffling.

    ``TensorDataset`` indexes every tensor with the batch at once, so a batch costs one gather.
    Under data parallelism each of ``num_replicas`` processes takes every ``num_replicas``-th
    index, starting at its ``rank``. All processes draw the same permutation from the shared
    seed. When shuffling (training), the permutation is padded by wrapping around so that every
    process runs the same number of steps. Without shuffling (evaluation), nothing is padded or
    dropped, so every sample counts exactly once in the metrics, and the shards may differ by one
    sample.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.size = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator) if self.shuffle else torch.arange(self.size)
        if self.shuffle and self.num_replicas > 1:
            padded_size = -(-self.size // self.num_replicas) * self.num_replicas
            order = order.repeat(-(-padded_size // self.size))[:padded_size]
        yield from order[self.rank::self.num_replicas].split(self.batch_size)

    def __len__(self) -> int:
        if self.shuffle:
            shard = -(-self.size // self.num_replicas)
        else:
            shard = len(range(self.rank, self.size, self.num_replicas))
        return -(-shard // self.batch_size)


class TensorDataModule(pl.LightningDataModule):
    """Serve in-memory splits to a Lightning Trainer, batched by :class:`IndexBatchSampler`.

    Under data parallelism it shards the batches itself, so the Trainer needs
    ``use_distributed_sampler=False``. ``batch_size`` is then the batch of each process.
    """

    def __init__(self, splits: DataSplits, batch_size: int, seed: int, eval_batch_size: int = 1024) -> None:
        super().__init__()
        self.splits = splits
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        sampler = IndexBatchSampler(len(self.splits.train), self.batch_size, shuffle=True, seed=self.seed,
                                    **self._shard())
        return DataLoader(self.splits.train, sampler=sampler, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.splits.val)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.splits.test)

    def _eval_loader(self, dataset: TensorDataset) -> DataLoader:
        sampler = IndexBatchSampler(len(dataset), self.eval_batch_size, shuffle=False, **self._shard())
        return DataLoader(dataset, sampler=sampler, batch_size=None)

    def _shard(self) -> dict[str, int]:
        if self.trainer is None:
            return {}
        return {"num_replicas": self.trainer.world_size, "rank": self.trainer.global_rank}
