"""The ``kdsweep`` command: one Hydra application for single runs and Optuna sweeps.

``kdsweep`` trains (or reuses) the teacher and distils one student; ``kdsweep sweep=NAME`` runs
the Optuna sweep defined in ``sweeps/NAME.yaml``. Any config value can be overridden on the
command line with Hydra's syntax (``distill.alpha=0.7 data=mnist``).
"""

import importlib.util
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

CHECKOUT = Path(__file__).resolve().parents[1]
CONF_DIR = CHECKOUT / "conf"
SWEEPS_DIR = CHECKOUT / "sweeps"

# Overrides such as data=mnist or +sweep=temperature_alpha,foo that select config group options.
_GROUP_OVERRIDE = re.compile(r"^[+~]{0,2}([a-z_]+)=([A-Za-z0-9_.,-]+)$")
_LAUNCHER_OVERRIDE = re.compile(r"^hydra/launcher=(\S+)$")
# Launcher options that the hydra-submitit-launcher package provides, or that build on them.
SUBMITIT_LAUNCHERS = ("submitit_slurm", "submitit_local", "kdsweep_slurm")
# An environment variable that a config reads without a default: ${oc.env:NAME}.
_REQUIRED_VARIABLE = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)\}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> Optional[dict[str, Any]]:
    from kdsweep import distributed
    from kdsweep.checks import exit_on_config_error
    from kdsweep.train import run

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # The sweeper checked the configs before the first trial. A trial that still fails is
        # recorded as a failed trial and does not end the process.
        return run(cfg, sweep_job=True)
    with exit_on_config_error():
        result_file = os.environ.get(distributed.RESULT_FILE_ENV)
        if result_file:  # A single run that a multi-process sweep job started.
            return distributed.run_and_write_result(run, cfg, Path(result_file))
        return run(cfg)


def group_options() -> dict[str, list[str]]:
    """Return the options of each config group under conf/, and of ``sweep`` under sweeps/."""
    options = {
        folder.name: sorted(path.stem for path in folder.glob("*.yaml"))
        for folder in CONF_DIR.iterdir()
        if folder.is_dir()
    }
    options["sweep"] = sorted(path.stem for path in SWEEPS_DIR.glob("*.yaml"))
    return options


def check_arguments(arguments: list[str]) -> Optional[str]:
    """Return a one-line error for the first override that cannot be parsed or names a missing option.

    Hydra reports both itself, over several lines; this gives the short form before Hydra starts.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parsed, _ = get_args_parser().parse_known_args(arguments)
    parser = OverridesParser.create()
    for line in parsed.overrides:
        try:
            parser.parse_override(line)
        except HydraException as error:
            details = [text.strip() for text in str(error).splitlines()
                       if text.strip() and not text.startswith(("Error parsing override", "See https"))]
            return f"{line}: invalid override ({details[0] if details else error})"
    error = _check_launcher_package(parsed.overrides)
    if error:
        return error
    if parsed.config_dir is not None:
        return None  # Group options may also come from the extra config folder.

    options = group_options()
    for line in parsed.overrides:
        match = _GROUP_OVERRIDE.match(line)
        if not match or match.group(1) not in options:
            continue
        group, values = match.groups()
        for value in values.split(","):
            if value not in options[group] and value != "null":
                return f"{group}={value}: unknown {group}; choose one of {', '.join(options[group])}"
            if group == "cluster" and value != "null":
                missing = [name for name in _REQUIRED_VARIABLE.findall((CONF_DIR / group / f"{value}.yaml").read_text())
                           if not os.environ.get(name)]
                if missing:
                    return (f"cluster={value}: environment variable {missing[0]} is not set; export "
                            f"{', '.join(dict.fromkeys(missing))} first (see docs/cluster.md)")
    return None


def _check_launcher_package(overrides: list[str]) -> Optional[str]:
    """Return an error for a submitit launcher when the hydra-submitit-launcher package is missing."""
    for line in overrides:
        match = _LAUNCHER_OVERRIDE.match(line)
        if match and match.group(1) in SUBMITIT_LAUNCHERS and not _submitit_installed():
            return (f"hydra/launcher={match.group(1)}: the hydra-submitit-launcher package is not installed; "
                    f"install it with pip install 'kdsweep[cluster]'")
    return None


def _submitit_installed() -> bool:
    return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def main() -> None:
    error = check_arguments(sys.argv[1:])
    if error:
        print(f"kdsweep: error: {error}", file=sys.stderr)
        sys.exit(2)
    # Every built-in dataset is a tensor in memory, so worker processes would only add start-up time.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # The training augmentation runs in the LightningModule's hook on purpose, after the batch is on the device.
    warnings.filterwarnings("ignore", "You have overridden `on_after_batch_transfer`")
    # pytorch-lightning 2.6 calls a torch.utils._pytree API that torch 2.14 deprecates, on every run.
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    try:
        _app()
    except KeyboardInterrupt:
        # The runs and trials were already ended as KILLED and FAIL on the way out.
        print("kdsweep: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
