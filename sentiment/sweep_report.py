"""A sweep's results as the report showed them: every trial sorted by the metric (parameters, train / validation
/ test loss and accuracy, runtime, state) as CSV and Markdown, a parallel-coordinates plot and the metric against
each parameter (PNG, Optuna's plots), and the best trial's checkpoint marked (``best`` link and ``best.json``)."""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from sentiment.files import atomic_path, write_atomic

FIGURES = ("train_loss", "train_acc", "valid_loss", "valid_acc", "test_loss", "test_acc")


class SweepError(ValueError):
    """A sweep file or sweep option is unusable; the message names the problem and the fix. (Here rather than in
    ``sentiment.sweep``, which imports this module: both raise it; ``from sentiment.sweep import SweepError`` works
    too.)"""


def trial_rows(study: Any, metric: str, direction: str) -> list[dict[str, Any]]:
    """One row per trial, best first by ``metric`` (trials without it last).

    Built here rather than from ``study.trials_dataframe()``, which has the parameters as the sampler drew them
    and the user attributes as dicts and lists in single cells: a row has the parameters as the trainer received
    them (the trial's ``params`` attribute: constants included, values rounded to ``q`` or to integers, an
    ``inv_log_uniform_values`` parameter itself rather than its drawn inverse), the figures of a pruned trial from
    the last epoch it reached (its ``history``), and the epochs it ran."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        figures = trial.user_attrs.get("metrics", {})
        history = trial.user_attrs.get("history", [])
        if not figures and history:  # pruned or failed: the last epoch it reached
            last = history[-1]
            figures = {key: last[key] for key in FIGURES if key in last}
        runtime = trial.user_attrs.get("runtime_s")
        if runtime is None and trial.datetime_start and trial.datetime_complete:
            runtime = (trial.datetime_complete - trial.datetime_start).total_seconds()
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                **trial.user_attrs.get("params", trial.params),
                **{key: figures.get(key) for key in FIGURES},
                "epochs_run": len(history),
                "runtime_s": runtime,
                "run_dir": trial.user_attrs.get("run_dir", ""),
            }
        )
    sign = -1 if direction == "maximize" else 1

    def key(row: dict[str, Any]) -> tuple[int, float]:
        value = row.get(metric)
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return (1 if missing or row["state"] != "COMPLETE" else 0, 0.0 if missing else sign * value)

    rows.sort(key=key)
    return rows


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _markdown(rows: list[dict[str, Any]], columns: list[str], best: int | None) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_format(row.get(c)) for c in columns]
        if row["trial"] == best:
            cells[0] = f"**{cells[0]} (best)**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(study: Any, parameters: list[str], metric: str, sweep_dir: Path) -> None:
    """Optuna's plots of the completed trials: ``parallel_coordinates.png`` (``plot_parallel_coordinate``: an axis
    per parameter and one for the metric, a line per trial coloured by the metric) and ``metric_vs_parameters.png``
    (``plot_slice``: the metric against each parameter). They show the parameters as the sampler drew them
    (``trial.params``): constants, never drawn, are left out (a sweep of constants only gets no plots), and an
    ``inv_log_uniform_values`` parameter is drawn, and shown, as ``1/NAME``; results.csv has the values the trainer
    received."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    drawn = set().union(*(trial.params for trial in complete))
    names = [name for parameter in parameters for name in (parameter, f"1/{parameter}") if name in drawn]
    if not names:
        return
    # optuna.visualization.matplotlib is experimental (it warns at each call), and plot_slice switches matplotlib
    # to its ggplot style for the whole process: rc_context puts the settings back afterwards. A parameter with a
    # single value so far gets an axis of zero range, which matplotlib widens itself (with a warning).
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Attempting to set identical low and high", UserWarning)
        axes = optuna_plots.plot_parallel_coordinate(study, params=names, target_name=metric)
        axes.set_title(f"{len(complete)} completed trials, coloured by {metric}", y=1.03)
        axes.figure.set_size_inches(max(8.0, 1.6 * (len(names) + 1)), 5)
        _save(axes.figure, sweep_dir / "parallel_coordinates.png")
        axes = optuna_plots.plot_slice(study, params=names, target_name=metric)
        _save(np.ravel(axes)[0].figure, sweep_dir / "metric_vs_parameters.png")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")  # the rotated axis names of the parallel coordinates
    plt.close(fig)


def write_report(sweep_dir: str | Path, storage: str | None = None) -> list[dict[str, Any]]:
    """Regenerate ``results.csv``, ``results.md``, the plots and the best-trial marker of a sweep folder."""
    import optuna

    sweep_dir = Path(sweep_dir)
    manifest_path = sweep_dir / "sweep.json"
    if not manifest_path.is_file():
        raise SweepError(f"{sweep_dir} is not a sweep folder (no sweep.json); run `sentiment sweep` first")
    manifest = json.loads(manifest_path.read_text())
    study = optuna.load_study(study_name=manifest["name"], storage=storage or manifest["storage"])
    metric, parameters = manifest["metric"], manifest["parameters"]
    rows = trial_rows(study, metric, manifest["direction"])
    best = rows[0]["trial"] if rows and rows[0]["state"] == "COMPLETE" else None
    columns = ["trial", "state", *parameters, *FIGURES, "epochs_run", "runtime_s", "run_dir"]

    with atomic_path(sweep_dir / "results.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header = f"# Sweep {manifest['name']}: {len(rows)} trials, sorted by {metric} ({manifest['direction']})\n\n"
    write_atomic(sweep_dir / "results.md", header + _markdown(rows, columns, best))
    _plots(study, parameters, metric, sweep_dir)

    if best is not None:
        best_row = rows[0]
        link = sweep_dir / "best"
        if link.is_symlink() or link.exists():
            link.unlink()
        checkpoint = sweep_dir / best_row["run_dir"] / "best"  # run_dir is absolute, or relative to the sweep folder
        if checkpoint.is_dir():  # absent when the report is regenerated away from the trials' folders
            link.symlink_to(os.path.relpath(checkpoint.resolve(), sweep_dir.resolve()), target_is_directory=True)
        (sweep_dir / "best.json").write_text(json.dumps(best_row, indent=2, default=str))
    return rows
