"""The table printed at the end of a sweep: the teacher, the alpha = 0 baseline and the best distilled student."""

from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsweep import footprint

TEMPERATURE_KEY = "distill.temperature"
ALPHA_KEY = "distill.alpha"
# The footprint columns beside the accuracy: their header and how each cell shows a run's metrics.
FOOTPRINT_COLUMNS = (
    ("params", footprint.PARAMETER_COUNT_METRIC, lambda value: f"{value:.0f}"),
    ("size kB", footprint.SIZE_METRIC, lambda value: f"{value / 1e3:.1f}"),
    ("latency ms", footprint.LATENCY_METRIC, lambda value: f"{value:.3f}"),
    ("images/s", footprint.THROUGHPUT_METRIC, lambda value: f"{value:.0f}"),
)


def summarize(study: optuna.Study, metrics: list[str], tracking_uri: str) -> str:
    """Format the sweep's result table from the trials' stored metrics, with the MLflow run of each row.

    A single-objective study shows the teacher, the alpha = 0 baseline and the best distilled
    student; a multi-objective study shows its Pareto front.
    """
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    lines = [
        f"Study {study.study_name}: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.FAIL]} failed, "
        f"{counts[TrialState.PRUNED]} pruned"
    ]
    if len(metrics) > 1:
        lines += _pareto_front_table(study, metrics)
    else:
        lines += _best_table(study, metrics[0], [t for t in trials if t.state == TrialState.COMPLETE], trials)
    lines.append(f"Open the MLflow UI on this store: {ui_command(tracking_uri)}")
    return "\n".join(lines)


def _best_table(study: optuna.Study, metric: str, completed: list[FrozenTrial],
                trials: list[FrozenTrial]) -> list[str]:
    lines = []
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    baseline = _best([t for t in completed if _alpha(t) == 0], maximize)
    distilled = _best([t for t in completed if (_alpha(t) or 0) > 0], maximize)
    teacher = next((t.user_attrs["teacher"] for t in completed if t.user_attrs.get("teacher")), None)

    header = ("", "trial", "T", "alpha", metric, "test/acc", *_footprint_header(), "MLflow run")
    rows = []
    if teacher is not None:
        rows.append(("teacher", "-", "-", "-", _number(teacher["metrics"].get(metric)),
                     _number(teacher["metrics"].get("test/acc")), *_footprint_cells(teacher["metrics"]),
                     teacher["run_id"]))
    for label, trial in (("baseline (alpha=0)", baseline), ("best distilled", distilled)):
        if trial is None:
            rows.append((label, "-", "-", "-", "not run", "", *("" for _ in FOOTPRINT_COLUMNS), ""))
            continue
        distill = trial.user_attrs.get("distill", {})
        metrics = trial.user_attrs["metrics"]
        rows.append((label, str(trial.number), _number(distill.get(TEMPERATURE_KEY)), _number(distill.get(ALPHA_KEY)),
                     _number(trial.value), _number(metrics.get("test/acc")), *_footprint_cells(metrics),
                     trial.user_attrs.get("mlflow_run_id") or ""))

    lines += _format_table(header, rows)
    attempts = [t for t in trials if t.params.get(ALPHA_KEY) == 0]
    if baseline is None and attempts:
        states = ", ".join(f"trial {t.number} {t.state.name}" for t in attempts)
        lines.append(f"The alpha = 0 baseline did not complete ({states}); run the sweep again with a higher "
                     f"hydra.sweeper.n_trials to retry it.")
    elif baseline is None:
        lines.append(f"No alpha = 0 baseline ran; add {ALPHA_KEY}: 0.0 to hydra.sweeper.enqueue to include one.")
    return lines


def _pareto_front_table(study: optuna.Study, metrics: list[str]) -> list[str]:
    header = ("Pareto front", "T", "alpha", *metrics, "test/acc", *_footprint_header(), "MLflow run")
    rows = []
    for trial in sorted(study.best_trials, key=lambda t: t.number):
        distill = trial.user_attrs.get("distill", {})
        run_metrics = trial.user_attrs["metrics"]
        rows.append((f"trial {trial.number}", _number(distill.get(TEMPERATURE_KEY)), _number(distill.get(ALPHA_KEY)),
                     *(_number(value) for value in trial.values), _number(run_metrics.get("test/acc")),
                     *_footprint_cells(run_metrics), trial.user_attrs.get("mlflow_run_id") or ""))
    return _format_table(header, rows)


def _footprint_header() -> tuple[str, ...]:
    return tuple(header for header, _, _ in FOOTPRINT_COLUMNS)


def _footprint_cells(metrics: dict[str, float]) -> tuple[str, ...]:
    """Format a run's footprint metrics; runs logged before kdsweep measured them show "-"."""
    return tuple("-" if metrics.get(name) is None else show(metrics[name]) for _, name, show in FOOTPRINT_COLUMNS)


def _format_table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def _alpha(trial: FrozenTrial) -> Optional[float]:
    return trial.user_attrs.get("distill", {}).get(ALPHA_KEY)


def _best(trials: list[FrozenTrial], maximize: bool) -> Optional[FrozenTrial]:
    if not trials:
        return None
    return (max if maximize else min)(trials, key=lambda t: t.value)


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
