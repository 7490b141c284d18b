"""Provenance: what a run needs to be traced and repeated, gathered as MLflow tags and one JSON record.

Every function here only reads state (the git checkout, the installed packages, the hardware, the
command line, tensors); :mod:`kdsweep.tracking` logs what they return.
"""

import functools
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

from kdsweep import __version__

# The checkout whose state a run records: the folder above the kdsweep package.
CHECKOUT = Path(__file__).resolve().parents[1]
# Distributions whose versions every run records (python's own version is added).
PACKAGES = ("torch", "torchvision", "pytorch-lightning", "hydra-core", "optuna", "mlflow", "torchmetrics", "kornia")
# An untracked file larger than this goes into the diff by name only.
MAX_UNTRACKED_BYTES = 1_000_000

GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_DIRTY_TAG = "kdsweep.git_dirty"
GIT_DIFF_HASH_TAG = "kdsweep.git_diff_sha256"
COMMAND_TAG = "kdsweep.command"
OVERRIDES_TAG = "kdsweep.overrides"
# The config-group options a run was composed from, one tag per group: kdsweep.choice.augment = heavy.
CHOICE_TAG_PREFIX = "kdsweep.choice."
VERSION_TAG_PREFIX = "kdsweep.version."
CPU_MODEL_TAG = "kdsweep.cpu_model"
CPU_COUNT_TAG = "kdsweep.cpu_count"
GPU_NAMES_TAG = "kdsweep.gpu_names"
GPU_COUNT_TAG = "kdsweep.gpu_count"
SEED_TAG = "kdsweep.seed"
DATA_FINGERPRINT_TAG = "kdsweep.data_fingerprint"
CHECKPOINT_HASH_TAG = "kdsweep.checkpoint_sha256"
TEACHER_CHECKPOINT_HASH_TAG = "kdsweep.teacher_checkpoint_sha256"
DIFF_ARTIFACT = "git_diff.patch"
RECORD_ARTIFACT = "provenance.json"


@dataclass(frozen=True)
class CodeState:
    """The git state of the checkout that ran: None fields outside a git checkout."""

    commit: Optional[str]
    dirty: Optional[bool]
    # Uncommitted changes as a patch against ``commit``, untracked files included; "" when clean.
    diff: str

    @property
    def diff_sha256(self) -> str:
        return hashlib.sha256(self.diff.encode()).hexdigest() if self.diff else ""


@functools.lru_cache(maxsize=4)
def code_state(checkout: Path = CHECKOUT) -> CodeState:
    """Read the commit, whether the tree has uncommitted changes, and those changes as a patch.

    Files that .gitignore lists (mlflow.db, teacher_cache/, ...) do not count as changes.
    """
    commit = _git(checkout, "rev-parse", "HEAD")
    if commit is None:
        return CodeState(commit=None, dirty=None, diff="")
    status = _git(checkout, "status", "--porcelain", "--untracked-files=all") or ""
    if not status:
        return CodeState(commit=commit, dirty=False, diff="")
    parts = [_git(checkout, "diff", "HEAD", "--binary") or ""]
    untracked = (_git(checkout, "ls-files", "--others", "--exclude-standard", "-z") or "").split("\0")
    for name in filter(None, untracked):
        path = checkout / name
        if path.is_file() and path.stat().st_size <= MAX_UNTRACKED_BYTES:
            # `git diff --no-index` exits 1 when the files differ, which they always do here.
            parts.append(_git(checkout, "diff", "--no-index", "--binary", "--", "/dev/null", name,
                              accept_codes=(0, 1)) or "")
        else:
            parts.append(f"# untracked file {name} is not included (larger than {MAX_UNTRACKED_BYTES} bytes)\n")
    return CodeState(commit=commit, dirty=True, diff="".join(part for part in parts if part))


def _git(checkout: Path, *arguments: str, accept_codes: tuple[int, ...] = (0,)) -> Optional[str]:
    try:
        result = subprocess.run(["git", *arguments], cwd=checkout, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode not in accept_codes:
        return None
    return result.stdout.strip() if arguments[0] == "rev-parse" else result.stdout


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Return the versions of python, kdsweep and the packages in PACKAGES ("not installed" if absent)."""
    versions = {"python": platform.python_version(), "kdsweep": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@functools.lru_cache(maxsize=1)
def hardware() -> dict[str, str]:
    """Return the CPU model and core count, and the names and count of the CUDA GPUs visible to this process."""
    count = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(index) for index in range(count)]
    return {"cpu_model": cpu_model(), "cpu_count": str(os.cpu_count()), "gpu_names": ", ".join(names) or "none",
            "gpu_count": str(count)}


def cpu_model() -> str:
    """Return the CPU's model name from /proc/cpuinfo on Linux, else what the platform module reports."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hydra_overrides() -> list[str]:
    """Return the task overrides of the running Hydra job, or [] outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def hydra_choices() -> dict[str, str]:
    """Return the config-group options of the running Hydra job (augment: heavy, data: mnist), or {}.

    Hydra's own groups and the groups placed at another package (with @) are left out.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {group: str(option) for group, option in HydraConfig.get().runtime.choices.items()
            if option is not None and not group.startswith("hydra/") and "@" not in group}


def tensors_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """Hash the dtype, shape and bytes of each tensor, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hash a model's weights, key by key in sorted order, so equal weights give equal hashes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(tensors_sha256([state_dict[key]]).encode())
    return digest.hexdigest()


def process_tags() -> dict[str, str]:
    """Return the tags that every run of this process shares: code, command line, versions and hardware."""
    code = code_state()
    tags = {
        COMMAND_TAG: shlex.join(sys.argv),
        OVERRIDES_TAG: json.dumps(hydra_overrides()),
        **{f"{VERSION_TAG_PREFIX}{name}": version for name, version in package_versions().items()},
        **{f"kdsweep.{key}": value for key, value in hardware().items()},
        **{f"{CHOICE_TAG_PREFIX}{group}": option for group, option in hydra_choices().items()},
    }
    if code.commit is not None:
        tags[GIT_COMMIT_TAG] = code.commit
        tags[GIT_DIRTY_TAG] = str(code.dirty).lower()
        if code.dirty:
            tags[GIT_DIFF_HASH_TAG] = code.diff_sha256
    return tags


def record(tags: Mapping[str, str]) -> str:
    """Return a run's provenance tags as one JSON document, with the lists and numbers decoded."""
    document = {key: value for key, value in sorted(tags.items())}
    if OVERRIDES_TAG in document:
        document[OVERRIDES_TAG] = json.loads(document[OVERRIDES_TAG])
    return json.dumps(document, indent=2)
