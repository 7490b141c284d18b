"""A cache of trained teachers, keyed by everything that determines the teacher's weights.

Each entry is ``<key>.pt`` (a plain state dict, read back with ``torch.load(weights_only=True)``)
and ``<key>.json`` (the MLflow run that trained it and its metrics), plus ``<key>.logits.pt``, the
teacher's logits on the training and validation splits, once a student has needed them. A file
lock per key lets one process train a missing teacher while others wait for it and then reuse it.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from kdsweep.data import LOCATION_KEYS

# Bump when the meaning of a cached entry changes, so old entries are not reused.
CACHE_FORMAT = 1


@dataclass
class CachedTeacher:
    """Metadata stored beside a cached teacher's weights."""

    key: str
    run_id: str
    tracking_uri: str
    metrics: dict[str, float] = field(default_factory=dict)


def teacher_cache_key(cfg: DictConfig) -> str:
    """Hash the data, the teacher's model and training settings, the trainer settings and the seed."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in LOCATION_KEYS}
    identity = {
        "format": CACHE_FORMAT,
        "data": data,
        "teacher": OmegaConf.to_container(cfg.teacher, resolve=True),
        "trainer": {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                    if k != "enable_progress_bar"},
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class TeacherCache:
    """A folder of cached teachers."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def lock(self, key: str) -> FileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.folder / f"{key}.lock"))

    def load(self, key: str) -> Optional[tuple[dict[str, torch.Tensor], CachedTeacher]]:
        """Return the state dict and metadata for ``key``, or None when it is not cached."""
        weights, metadata = self._paths(key)
        if not (weights.exists() and metadata.exists()):
            return None
        try:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
            entry = CachedTeacher(**json.loads(metadata.read_text()))
        except Exception as error:  # torch and json raise many types for a damaged file.
            raise RuntimeError(f"cached teacher {weights} cannot be read ({type(error).__name__}: {error}); "
                               f"delete {weights} and {metadata} to train it again") from None
        return state_dict, entry

    def save(self, state_dict: dict[str, torch.Tensor], entry: CachedTeacher) -> None:
        """Write the weights, then the metadata, each atomically; the metadata marks the entry complete."""
        self.folder.mkdir(parents=True, exist_ok=True)
        weights, metadata = self._paths(entry.key)
        _write_atomically(weights, lambda path: torch.save(state_dict, path))
        _write_atomically(metadata, lambda path: path.write_text(json.dumps(asdict(entry), indent=2)))

    def load_logits(self, key: str, sizes: dict[str, int]) -> Optional[dict[str, torch.Tensor]]:
        """Return the cached logits per split, or None when missing or not of the given split sizes."""
        path = self._logits_path(key)
        if not path.exists():
            return None
        try:
            logits = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a damaged file.
            raise RuntimeError(f"cached teacher logits {path} cannot be read ({type(error).__name__}: {error}); "
                               f"delete the file to compute them again") from None
        if {split: len(logits.get(split, ())) for split in sizes} != sizes:
            return None
        return logits

    def save_logits(self, key: str, logits: dict[str, torch.Tensor]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self._logits_path(key), lambda path: torch.save(logits, path))

    def _logits_path(self, key: str) -> Path:
        return self.folder / f"{key}.logits.pt"

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.pt", self.folder / f"{key}.json"


def _write_atomically(path: Path, write) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    write(partial)
    os.replace(partial, path)
