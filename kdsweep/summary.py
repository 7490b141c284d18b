"""The table printed at the end of a sweep: the teacher, the alpha = 0 baseline and the best distilled student."""

from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

TEMPERATURE_KEY = "distill.temperature"
ALPHA_KEY = "distill.alpha"


def summarize(study: optuna.Study, metric: str, tracking_uri: str) -> str:
    """Format the sweep's result table from the trials' stored metrics, with the MLflow run of each row."""
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    lines = [
        f"Study {study.study_name}: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.FAIL]} failed, "
        f"{counts[TrialState.PRUNED]} pruned"
    ]

    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    baseline = _best([t for t in completed if _alpha(t) == 0], maximize)
    distilled = _best([t for t in completed if (_alpha(t) or 0) > 0], maximize)
    teacher = next((t.user_attrs["teacher"] for t in completed if t.user_attrs.get("teacher")), None)

    header = ("", "trial", "T", "alpha", metric, "test/acc", "MLflow run")
    rows = []
    if teacher is not None:
        rows.append(("teacher", "-", "-", "-", _number(teacher["metrics"].get(metric)),
                     _number(teacher["metrics"].get("test/acc")), teacher["run_id"]))
    for label, trial in (("baseline (alpha=0)", baseline), ("best distilled", distilled)):
        if trial is None:
            rows.append((label, "-", "-", "-", "not run", "", ""))
            continue
        distill = trial.user_attrs.get("distill", {})
        rows.append((label, str(trial.number), _number(distill.get(TEMPERATURE_KEY)), _number(distill.get(ALPHA_KEY)),
                     _number(trial.value), _number(trial.user_attrs["metrics"].get("test/acc")),
                     trial.user_attrs.get("mlflow_run_id") or ""))

    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    if baseline is None:
        lines.append(f"No alpha = 0 baseline ran; add {ALPHA_KEY}: 0.0 to hydra.sweeper.enqueue to include one.")
    lines.append(f"Open the MLflow UI on this store: {ui_command(tracking_uri)}")
    return "\n".join(lines)


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
