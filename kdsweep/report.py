"""The ``kdsweep-report`` command: the tables and plots of a paper, from the MLflow runs of a sweep or experiment.

Runs are grouped by configuration: every logged param except the seed and the settings that only
locate files or stores. A group contains one run per seed (the latest, if a seed ran twice), and the
tables give its mean, sample standard deviation and number of seeds. Reproductions made by
kdsweep-reproduce are left out, as are runs that did not finish.

The rows of the table:
- the best distilled student: the group of the alpha > 0 student run with the best validation
  metric, which is the configuration a sweep selects;
- the alpha = 0 baseline: the same among the students trained without a teacher;
- the teacher: every teacher run with the configuration of the teacher that the best distilled
  student learned from, over the seeds present.

When the students were trained under more than one augmentation of their batches, as in
``sweep=alpha_under_augmentation``, the report adds a table per augmentation level (the alpha
with the best mean validation metric, its accuracy, and the alpha = 0 baseline) and the curves of
the validation metric against alpha and against T, one line per level.
"""

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from kdsweep import provenance, tracking

TEMPERATURE = "distill.temperature"
ALPHA = "distill.alpha"
# Params that do not change what a run computes: the seed varies within a group, the rest locate files.
IGNORED_PARAMS = ("seed", "teacher_cache_dir", "teacher_only", "data.root", "data.download",
                  "trainer.enable_progress_bar")
IGNORED_PREFIXES = ("tracking.",)
# The params that define a teacher; a teacher run also logs the student settings it never used.
TEACHER_PREFIXES = ("data.", "teacher.", "trainer.")
# Up to this many distinct values of the other parameter, a plot draws one line per value.
MAX_LINES = 6
REPORT_ROLE = "report"
ARTIFACT_FOLDER = "report"
# The params of the student's training augmentation, and the tag that names its preset.
AUGMENT_PREFIX = "student.augment"
AUGMENT_CHOICE_TAG = f"{provenance.CHOICE_TAG_PREFIX}augment"
# Overrides of the best run that `kdsweep sweep=seeds` sets itself.
SEED_SWEEP_OWNS = ("sweep", "seed", TEMPERATURE, ALPHA)


class ReportError(Exception):
    """Bad input: an unknown experiment or run, or one without runs to report."""


@dataclass
class Group:
    """The runs of one configuration, one per seed."""

    role: str
    runs: list[Run]

    @property
    def params(self) -> dict[str, str]:
        return self.runs[0].data.params

    @property
    def temperature(self) -> Optional[float]:
        """T of a distilled student; None for a teacher and a baseline, which use no soft targets."""
        return _float(self.params.get(TEMPERATURE)) if (self.alpha or 0) > 0 else None

    @property
    def alpha(self) -> Optional[float]:
        return _float(self.params.get(ALPHA)) if self.role == "student" else None

    @property
    def augmentation(self) -> tuple:
        """The student's augmentation settings, as sorted (param, value) pairs."""
        return tuple(sorted((key, value) for key, value in self.params.items() if key.startswith(AUGMENT_PREFIX)))

    def values(self, metric: str) -> list[float]:
        return [run.data.metrics[metric] for run in self.runs if metric in run.data.metrics]

    def mean(self, metric: str) -> float:
        values = self.values(metric)
        return statistics.fmean(values) if values else math.nan

    def std(self, metric: str) -> float:
        """Return the sample standard deviation over seeds, or NaN for a single seed."""
        values = self.values(metric)
        return statistics.stdev(values) if len(values) > 1 else math.nan


@dataclass
class Scope:
    """The runs a report covers, and where it logs its files."""

    name: str
    experiment_id: str
    students: list[Run]
    teachers: list[Run]
    parent_run_id: Optional[str]


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kdsweep-report",
        description="Write the table (Markdown, LaTeX, CSV) and plots of a sweep or an MLflow experiment to a folder, "
                    "and log them to MLflow: to the sweep's parent run, or to a new run of role report in the "
                    "experiment.")
    parser.add_argument("target", help="an MLflow experiment name, or the run id of a sweep's parent run")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: $MLFLOW_TRACKING_URI, else mlflow.db in "
                                               "the working directory)")
    parser.add_argument("--metric", default="val/acc",
                        help="the validation metric that selects the best configurations (default val/acc; a "
                             "metric whose name contains 'loss' is minimised)")
    parser.add_argument("--output", type=Path, help="the folder for the files (default reports/<target>)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        if not arguments.metric.startswith("val/"):
            raise ReportError(f"--metric={arguments.metric}: select on a validation metric such as val/acc; the "
                              f"test split is only reported")
        client, _ = tracking.existing_store_client(arguments.tracking_uri)
        scope = find_scope(client, arguments.target)
        output = arguments.output or Path("reports") / _safe_name(scope.name)
        check_output(output)
        report = build_report(scope, arguments.metric)
    except (ReportError, FileNotFoundError) as error:
        print(f"kdsweep-report: error: {error}", file=sys.stderr)
        sys.exit(2)

    files = write_report(report, output)
    run_id = log_report(client, scope, files)
    print(report.table.to_markdown(index=False))
    if report.augmentation is not None:
        print(f"\nBy augmentation of the student's batches:\n{report.augmentation.to_markdown(index=False)}")
    print(f"\nWrote {', '.join(path.name for path in files)} to {output} and logged them to MLflow run {run_id}")
    if report.seeds_command:
        print(f"To run the best configuration and its baseline over more seeds:\n  {report.seeds_command}")


def find_scope(client: MlflowClient, target: str) -> Scope:
    """Collect the finished runs of experiment ``target``, or of the sweep whose parent run is ``target``."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(target)
    parent = None
    if experiment is None:
        try:
            parent = client.get_run(target)
        except MlflowException:
            raise ReportError(f"target={target}: neither an MLflow experiment name nor a run id in this store") from None
        if parent.data.tags.get(tracking.ROLE_TAG) != "sweep":
            raise ReportError(f"target={target}: run of role {parent.data.tags.get(tracking.ROLE_TAG)!r}, not a "
                              f"sweep's parent run; give a sweep's parent run or an experiment name")
        experiment_id = parent.info.experiment_id
    else:
        experiment_id = experiment.experiment_id

    runs = [run for run in _finished_runs(client, experiment_id)
            if tracking.REPRODUCTION_OF_TAG not in run.data.tags]
    students = [run for run in runs if run.data.tags.get(tracking.ROLE_TAG) == "student"]
    teachers = [run for run in runs if run.data.tags.get(tracking.ROLE_TAG) == "teacher"]
    if parent is not None:
        # The sweep's trials, and the runs elsewhere in the experiment that repeat one of them with another seed.
        keys = {configuration_key(run) for run in students if run.data.tags.get(MLFLOW_PARENT_RUN_ID) == target}
        students = [run for run in students if configuration_key(run) in keys]
    if not students:
        where = f"sweep {target}" if parent is not None else f"experiment {target}"
        raise ReportError(f"target={target}: {where} has no finished student runs to report")
    name = parent.info.run_name if parent is not None else target
    return Scope(name=name, experiment_id=experiment_id, students=students, teachers=teachers,
                 parent_run_id=None if parent is None else target)


def _finished_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def configuration_key(run: Run) -> tuple:
    """Return what identifies a run's configuration: its params but the seed and location settings.

    A teacher keeps only its data, teacher and trainer params, and a student without a teacher
    (alpha = 0) drops the temperature, which it never uses.
    """
    role = run.data.tags.get(tracking.ROLE_TAG)
    params = run.data.params
    items = []
    for key, value in params.items():
        if key in IGNORED_PARAMS or key.startswith(IGNORED_PREFIXES):
            continue
        if role == "teacher" and not key.startswith(TEACHER_PREFIXES):
            continue
        if role == "student" and key == TEMPERATURE and _float(params.get(ALPHA)) == 0:
            continue
        items.append((key, value))
    return (role, *sorted(items))


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Group runs by configuration, keeping the latest run of each seed."""
    by_key: dict[tuple, dict[str, Run]] = defaultdict(dict)
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        by_key[configuration_key(run)][run.data.params.get("seed", "")] = run
    return [Group(role=key[0], runs=sorted(per_seed.values(), key=lambda r: _seed_order(r)))
            for key, per_seed in by_key.items()]


@dataclass
class Report:
    name: str
    metric: str
    table: pd.DataFrame
    csv: pd.DataFrame
    groups: list[Group]
    baseline: Optional[Group]
    students: list[Run]
    seeds_command: Optional[str]
    # Per augmentation level: the best alpha and the baseline (None when every student had the same augmentation).
    augmentation: Optional[pd.DataFrame] = None
    # Every configuration's mean and spread over seeds, with its augmentation level.
    curves: Optional[pd.DataFrame] = None


def build_report(scope: Scope, metric: str) -> Report:
    groups = group_runs(scope.students)
    if not any(metric in run.data.metrics for run in scope.students):
        raise ReportError(f"--metric={metric}: no student run logged it; choose a metric such as val/acc")
    maximize = "loss" not in metric
    baseline = _best_group([g for g in groups if g.alpha == 0], metric, maximize)
    distilled = _best_group([g for g in groups if (g.alpha or 0) > 0], metric, maximize)
    teacher = _teacher_group(scope.teachers, distilled)

    rows = [("teacher", teacher), ("baseline student (alpha = 0)", baseline), ("best distilled student", distilled)]
    records = []
    for label, group in rows:
        if group is None:
            continue
        records.append({
            "model": label,
            "T": group.temperature,
            "alpha": group.alpha,
            "seeds": len(group.runs),
            "test/acc mean": group.mean("test/acc"),
            "test/acc std": group.std("test/acc"),
            f"{metric} mean": group.mean(metric),
            "runs": " ".join(run.info.run_id for run in group.runs),
        })
    csv = pd.DataFrame.from_records(records)
    table = pd.DataFrame({
        "model": csv["model"],
        "T": [_format(value, ".4g") for value in csv["T"]],
        "alpha": [_format(value, ".4g") for value in csv["alpha"]],
        "seeds": csv["seeds"],
        "test accuracy (%)": [_mean_std(mean * 100, std * 100)
                              for mean, std in zip(csv["test/acc mean"], csv["test/acc std"])],
        f"{metric} (mean)": [_format(value, ".4f") for value in csv[f"{metric} mean"]],
    })
    levels = augmentation_levels(groups)
    return Report(name=scope.name, metric=metric, table=table, csv=csv, groups=groups, baseline=baseline,
                  students=scope.students, seeds_command=_seeds_command(distilled),
                  augmentation=_augmentation_table(groups, levels, metric, maximize) if len(set(levels.values())) > 1
                  else None,
                  curves=_curves(groups, levels, metric))


def augmentation_levels(groups: list[Group]) -> dict[tuple, str]:
    """Name each distinct student augmentation by its preset (the augment= option that chose it).

    Settings changed after the preset get the preset's name with a number, and settings without a
    recorded preset are "custom".
    """
    names: dict[tuple, str] = {}
    for group in sorted(groups, key=lambda g: min(run.info.start_time or 0 for run in g.runs)):
        if group.augmentation in names:
            continue
        preset = group.runs[0].data.tags.get(AUGMENT_CHOICE_TAG, "custom")
        same_preset = sum(1 for name in names.values() if name.split(" ")[0] == preset)
        names[group.augmentation] = preset if not same_preset else f"{preset} ({same_preset + 1})"
    return names


def _curves(groups: list[Group], levels: dict[tuple, str], metric: str) -> pd.DataFrame:
    return pd.DataFrame.from_records([{
        "augment": levels[group.augmentation],
        "alpha": group.alpha,
        "T": group.temperature,
        "seeds": len(group.runs),
        f"{metric} mean": group.mean(metric),
        f"{metric} std": group.std(metric),
        "test/acc mean": group.mean("test/acc"),
        "test/acc std": group.std("test/acc"),
        "runs": " ".join(run.info.run_id for run in group.runs),
    } for group in sorted(groups, key=lambda g: (levels[g.augmentation], g.alpha or 0, g.temperature or 0))])


def _augmentation_table(groups: list[Group], levels: dict[tuple, str], metric: str, maximize: bool) -> pd.DataFrame:
    """For each augmentation level: the alpha with the best mean ``metric`` over seeds, and the alpha = 0 baseline."""
    records = []
    for augmentation, level in sorted(levels.items(), key=lambda item: _level_order(item[1])):
        members = [group for group in groups if group.augmentation == augmentation and group.values(metric)]
        if not members:
            continue
        pick = max if maximize else min
        best = pick(members, key=lambda group: group.mean(metric))
        baseline = next((group for group in members if group.alpha == 0), None)
        records.append({
            "augment": level,
            "best alpha": _format(best.alpha, ".4g"),
            "T": _format(best.temperature, ".4g"),
            "seeds": len(best.runs),
            f"{metric} (mean)": _format(best.mean(metric), ".4f"),
            "test accuracy (%)": _mean_std(best.mean("test/acc") * 100, best.std("test/acc") * 100),
            "alpha = 0 test accuracy (%)": "-" if baseline is None else
            _mean_std(baseline.mean("test/acc") * 100, baseline.std("test/acc") * 100),
        })
    return pd.DataFrame.from_records(records)


def _level_order(level: str) -> tuple:
    """Order the presets from the weakest to the strongest, then anything else by name."""
    known = ("none", "light", "heavy")
    preset = level.split(" ")[0]
    return (known.index(preset) if preset in known else len(known), level)


def _best_group(groups: list[Group], metric: str, maximize: bool) -> Optional[Group]:
    """Return the group of the single run with the best ``metric``: the configuration a sweep selects."""
    scored = [(value, group) for group in groups for value in group.values(metric)]
    if not scored:
        return None
    pick = max if maximize else min
    return pick(scored, key=lambda pair: pair[0])[1]


def _teacher_group(teachers: list[Run], distilled: Optional[Group]) -> Optional[Group]:
    if distilled is None:
        return None
    used = {run.data.tags.get(tracking.TEACHER_RUN_TAG) for run in distilled.runs}
    keys = {configuration_key(run) for run in teachers if run.info.run_id in used}
    matching = [run for run in teachers if configuration_key(run) in keys]
    return group_runs(matching)[0] if len(keys) == 1 else None


def _seeds_command(distilled: Optional[Group]) -> Optional[str]:
    """Return the kdsweep command that repeats the best distilled configuration and the baseline over 5 seeds."""
    if distilled is None:
        return None
    best = distilled.runs[0]
    overrides = json.loads(best.data.tags.get(provenance.OVERRIDES_TAG, "[]"))
    other_overrides = [item for item in overrides if item.lstrip("+~").split("=")[0] not in SEED_SWEEP_OWNS]
    return shlex.join(["kdsweep", "sweep=seeds", *other_overrides, f"{TEMPERATURE}={best.data.params[TEMPERATURE]}",
                       f"{ALPHA}=0,{best.data.params[ALPHA]}", "seed=1,2,3,4,5"])


def check_output(folder: Path) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ReportError(f"--output={folder}: {existing} is not a writable folder")


def write_report(report: Report, folder: Path) -> list[Path]:
    """Write the table as Markdown, LaTeX and CSV, every run as runs.csv, and the plots as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "table.md": report.table.to_markdown(index=False) + "\n",
        "table.tex": _latex(report.table),
        "table.csv": report.csv.to_csv(index=False),
        "runs.csv": _runs_frame(report).to_csv(index=False),
    }
    if report.augmentation is not None:
        files["augmentation.md"] = report.augmentation.to_markdown(index=False) + "\n"
        files["augmentation.tex"] = _latex(report.augmentation)
        files["augmentation_curves.csv"] = report.curves.to_csv(index=False)
    written = []
    for name, text in files.items():
        path = folder / name
        path.write_text(text)
        written.append(path)
    written += write_plots(report, folder)
    return written


def _latex(table: pd.DataFrame) -> str:
    """Return the table as a booktabs tabular, with LaTeX's special characters escaped."""
    styler = table.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    return styler.to_latex(hrules=True).replace("±", r"$\pm$")


def _runs_frame(report: Report) -> pd.DataFrame:
    return pd.DataFrame.from_records([{
        "run_id": run.info.run_id,
        "seed": run.data.params.get("seed"),
        "T": run.data.params.get(TEMPERATURE),
        "alpha": run.data.params.get(ALPHA),
        report.metric: run.data.metrics.get(report.metric),
        "test/acc": run.data.metrics.get("test/acc"),
        "parent_run_id": run.data.tags.get(MLFLOW_PARENT_RUN_ID),
    } for run in sorted(report.students, key=lambda r: r.info.start_time or 0)])


def write_plots(report: Report, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distilled = [group for group in report.groups if (group.alpha or 0) > 0]
    written = []
    for x_name, line_name, filename in ((TEMPERATURE, ALPHA, "val_vs_temperature.png"),
                                        (ALPHA, TEMPERATURE, "val_vs_alpha.png")):
        if not distilled:
            break
        figure, axes = plt.subplots(figsize=(6, 4))
        _plot_against(axes, distilled, x_name, line_name, report.metric)
        if report.baseline is not None:
            axes.axhline(report.baseline.mean(report.metric), color="grey", linestyle="--",
                         label="alpha = 0 baseline")
        axes.set_xlabel("temperature T" if x_name == TEMPERATURE else "alpha (weight of the soft targets)")
        axes.set_ylabel(f"{report.metric} (mean over seeds)")
        if x_name == TEMPERATURE:
            axes.set_xscale("log")
        axes.legend(fontsize="small")
        written.append(_save(figure, folder / filename))
    if report.augmentation is not None:
        written += _plot_by_augmentation(report, folder)
    importances = _plot_importances(report)
    if importances is not None:
        written.append(_save(importances, folder / "param_importances.png"))
    return written


def _plot_against(axes, groups: list[Group], x_name: str, line_name: str, metric: str) -> None:
    """Plot each group's mean ``metric`` against ``x_name``: a line per value of ``line_name`` when they are few."""
    def value(group: Group, name: str) -> float:
        return group.temperature if name == TEMPERATURE else group.alpha

    line_values = sorted({value(group, line_name) for group in groups})
    if len(line_values) <= MAX_LINES:
        for line_value in line_values:
            members = sorted((g for g in groups if value(g, line_name) == line_value), key=lambda g: value(g, x_name))
            errors = [0.0 if math.isnan(g.std(metric)) else g.std(metric) for g in members]
            axes.errorbar([value(g, x_name) for g in members], [g.mean(metric) for g in members], yerr=errors,
                          marker="o", capsize=3, label=f"{'alpha' if line_name == ALPHA else 'T'} = {line_value:.3g}")
        return
    points = axes.scatter([value(g, x_name) for g in groups], [g.mean(metric) for g in groups],
                          c=[value(g, line_name) for g in groups], cmap="viridis")
    axes.figure.colorbar(points, ax=axes, label="alpha" if line_name == ALPHA else "T")


def _plot_by_augmentation(report: Report, folder: Path) -> list[Path]:
    """Plot the mean validation metric against alpha and against T, one line per augmentation level.

    The alpha plot draws a line per level and T; the alpha = 0 baseline, which has no T, starts
    each line of its level. A plot is drawn only if its parameter takes several values in a level.
    """
    import matplotlib.pyplot as plt

    curves = report.curves
    mean, std = f"{report.metric} mean", f"{report.metric} std"
    written = []
    for x_name, filename in (("alpha", "val_vs_alpha_by_augmentation.png"),
                             ("T", "val_vs_temperature_by_augmentation.png")):
        lines = []
        for level in sorted(curves["augment"].unique(), key=_level_order):
            rows = curves[curves["augment"] == level]
            distilled = rows[rows["alpha"] > 0]
            if x_name == "alpha":
                for temperature in sorted(distilled["T"].unique()):
                    points = pd.concat([rows[rows["alpha"] == 0], distilled[distilled["T"] == temperature]])
                    label = level if distilled["T"].nunique() == 1 else f"{level}, T = {temperature:.3g}"
                    lines.append((label, points.sort_values("alpha")))
            else:
                for alpha in sorted(distilled["alpha"].unique()):
                    points = distilled[distilled["alpha"] == alpha].sort_values("T")
                    label = level if distilled["alpha"].nunique() == 1 else f"{level}, alpha = {alpha:.3g}"
                    lines.append((label, points))
        if not any(points[x_name].nunique() > 1 for _, points in lines):
            continue
        figure, axes = plt.subplots(figsize=(6, 4))
        for label, points in lines:
            axes.errorbar(points[x_name], points[mean], yerr=points[std].fillna(0.0), marker="o", capsize=3,
                          label=label)
        axes.set_xlabel("alpha (weight of the soft targets)" if x_name == "alpha" else "temperature T")
        if x_name == "T":
            axes.set_xscale("log")
        axes.set_ylabel(f"{report.metric} (mean over seeds)")
        axes.legend(title="augment", fontsize="small")
        written.append(_save(figure, folder / filename))
    return written


def _plot_importances(report: Report):
    """Plot Optuna's fANOVA importances of T and alpha, fitted on the report's student runs.

    The study is rebuilt in memory from the MLflow runs, so the plot needs only the runs. Return
    None when fewer than two runs or no varying parameter make importances meaningless.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as optuna_plots

    runs = [run for run in report.students if report.metric in run.data.metrics]
    values = {name: [_float(run.data.params.get(name)) for run in runs] for name in (TEMPERATURE, ALPHA)}
    varying = [name for name, found in values.items() if None not in found and len(set(found)) > 1]
    if len(runs) < 2 or not varying:
        print(f"kdsweep-report: no parameter importances: they need 2 runs or more and a varying T or alpha",
              file=sys.stderr)
        return None
    distributions = {name: optuna.distributions.FloatDistribution(min(values[name]), max(values[name]))
                     for name in varying}
    direction = "minimize" if "loss" in report.metric else "maximize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction, study_name=report.name)
    for index, run in enumerate(runs):
        study.add_trial(optuna.trial.create_trial(
            params={name: values[name][index] for name in varying}, distributions=distributions,
            value=run.data.metrics[report.metric]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental.
        axes = optuna_plots.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    return axes.figure


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def log_report(client: MlflowClient, scope: Scope, files: list[Path]) -> str:
    """Log the files to the sweep's parent run, or to a new run of role report in the experiment."""
    run_id = scope.parent_run_id
    if run_id is None:
        run_id = client.create_run(scope.experiment_id, run_name="report",
                                   tags={tracking.ROLE_TAG: REPORT_ROLE, **provenance.process_tags()}).info.run_id
    for path in files:
        client.log_artifact(run_id, str(path), ARTIFACT_FOLDER)
    if scope.parent_run_id is None:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def _float(text: Optional[str]) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _seed_order(run: Run) -> float:
    return _float(run.data.params.get("seed")) or 0.0


def _format(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


if __name__ == "__main__":
    main()
