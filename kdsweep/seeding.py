"""The run's seed: the configured one, or one drawn at random and written into the config when it is absent."""

import logging
import os
import secrets

from omegaconf import DictConfig, open_dict

from kdsweep.checks import MAX_SEED

log = logging.getLogger(__name__)

# Lightning starts data-parallel ranks 1 and up by running the command again, with this process's
# environment. A drawn seed goes through this variable, so that every rank uses the same seed.
DRAWN_SEED_ENV = "KDSWEEP_DRAWN_SEED"


def draw_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def resolve_seed(cfg: DictConfig) -> int:
    """Return ``cfg.seed``; when it is null or absent, draw one, set it in ``cfg`` and log it.

    The config then contains the seed that was used, so the logged config repeats the run. ``seed=0``
    is a seed like any other.
    """
    seed = cfg.get("seed")
    if seed is not None:
        return seed
    drawn = os.environ.get(DRAWN_SEED_ENV)
    seed = int(drawn) if drawn else draw_seed()
    os.environ[DRAWN_SEED_ENV] = str(seed)
    with open_dict(cfg):
        cfg.seed = seed
    log.info("The config sets no seed; drew seed=%d, which the run logs", seed)
    return seed
