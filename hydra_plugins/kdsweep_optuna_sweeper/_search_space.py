"""Search spaces written in Hydra's override grammar, turned into Optuna distributions.

``interval(a, b)`` is a float range, ``range(a, b[, step])`` is a stepped range that excludes ``b``
as Python's ``range`` does, ``choice(...)`` (or ``a,b,c``) is categorical, and ``tag(log, ...)``
samples an interval or integer range on a log scale.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from kdsweep.checks import ConfigError


@dataclass
class SearchSpace:
    """The swept parameters as Optuna distributions, and the fixed overrides passed to every trial."""

    distributions: dict[str, BaseDistribution]
    fixed: list[str]


def build_search_space(params: Mapping[str, Any], arguments: Sequence[str]) -> SearchSpace:
    """Parse ``hydra.sweeper.params`` and the command line's overrides; the command line wins."""
    parser = OverridesParser.create()
    overrides: dict[str, Override] = {}
    for key, expression in params.items():
        overrides[str(key)] = _parse(parser, f"{key}={expression}", f"hydra.sweeper.params.{key}")
    for argument in arguments:
        override = _parse(parser, argument, argument)
        overrides[override.get_key_element()] = override

    distributions: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    for key, override in overrides.items():
        if override.is_sweep_override():
            distributions[override.get_key_element()] = to_distribution(key, override.value())
        else:
            fixed.append(override.input_line)
    return SearchSpace(distributions=distributions, fixed=fixed)


def _parse(parser: OverridesParser, line: str, where: str) -> Override:
    try:
        return parser.parse_override(line)
    except HydraException as error:
        raise ConfigError(f"{where}: invalid search range ({error})") from None


def to_distribution(key: str, sweep: Any) -> BaseDistribution:
    """Convert one parsed sweep to a distribution, rejecting empty, reversed and invalid log ranges."""
    where = f"hydra.sweeper.params.{key}"
    log = "log" in sweep.tags
    if isinstance(sweep, ChoiceSweep):
        if log:
            raise ConfigError(f"{where}: tag(log, ...) applies to interval() and range(), not to choice()")
        # Optuna stores only scalar choices, so a list or dict choice is kept as its override text.
        return CategoricalDistribution([_as_scalar(value) for value in sweep.list])

    if isinstance(sweep, IntervalSweep):
        low, high = float(sweep.start), float(sweep.end)
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ConfigError(f"{where}=interval({low}, {high}): the interval is empty; the lower bound must be "
                              f"below the upper bound")
        if log and low <= 0:
            raise ConfigError(f"{where}=tag(log, interval({low}, {high})): a log scale needs a lower bound > 0")
        return FloatDistribution(low, high, log=log)

    if isinstance(sweep, RangeSweep):
        return _range_distribution(where, sweep, log)

    raise ConfigError(f"{where}: {sweep!r} is not a search range; use interval(), range() or choice()")


def _range_distribution(where: str, sweep: RangeSweep, log: bool) -> BaseDistribution:
    start, stop, step = sweep.start, sweep.stop, sweep.step
    text = f"{where}=range({start}, {stop}, {step})"
    if step <= 0:
        raise ConfigError(f"{text}: the step must be > 0")
    count = math.ceil((stop - start) / step)
    if count < 1:
        raise ConfigError(f"{text}: the range is empty; stop must be above start")
    last = start + (count - 1) * step
    if log and (step != 1 or start <= 0):
        raise ConfigError(f"{text}: a log scale needs a start > 0 and a step of 1")
    if all(isinstance(v, int) for v in (start, stop, step)):
        return IntDistribution(start, last, log=log, step=1 if log else step)
    return FloatDistribution(float(start), float(last), step=float(step))


class OverrideText(str):
    """A choice kept as the override text of a list or dict, written back without quotes."""


def _as_scalar(value: Any) -> Any:
    return OverrideText(format_override_value(value)) if isinstance(value, (list, tuple, dict)) else value


def corner_values(distribution: BaseDistribution) -> list[Any]:
    """Return the extreme values of a distribution (every choice of a categorical one)."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def describe(distribution: BaseDistribution) -> str:
    """Write a distribution back in the override grammar, e.g. ``tag(log, interval(1.0, 20.0))``."""
    if isinstance(distribution, CategoricalDistribution):
        return f"choice({', '.join(format_override_value(v) for v in distribution.choices)})"
    if distribution.step is not None and not distribution.log:
        text = f"range({distribution.low}, {distribution.high + distribution.step}, {distribution.step})"
    elif isinstance(distribution, IntDistribution):
        text = f"range({distribution.low}, {distribution.high + 1})"
    else:
        text = f"interval({distribution.low}, {distribution.high})"
    return f"tag(log, {text})" if distribution.log else text


def format_override_value(value: Any) -> str:
    """Write a sampled value in Hydra's override grammar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(format_override_value(item) for item in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {format_override_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, OverrideText):
        return str(value)
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"

