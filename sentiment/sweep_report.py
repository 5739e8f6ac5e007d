"""A sweep's results as the report showed them: every trial sorted by the metric (parameters, train / validation
/ test loss and accuracy, runtime, state) as CSV and Markdown, a parallel-coordinates plot and the metric against
each parameter (PNG), and the best trial's checkpoint marked (``best`` link and ``best.json``)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

FIGURES = ("train_loss", "train_acc", "valid_loss", "valid_acc", "test_loss", "test_acc")


def trial_rows(study: Any, metric: str, direction: str) -> list[dict[str, Any]]:
    """One row per trial, best first by ``metric`` (trials without it last)."""
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


def _plots(rows: list[dict[str, Any]], parameters: list[str], metric: str, sweep_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [r for r in rows if r["state"] == "COMPLETE" and r.get(metric) is not None]
    if not done:
        return
    values = np.array([r[metric] for r in done], dtype=float)
    colors = plt.cm.viridis((values - values.min()) / (np.ptp(values) or 1.0))

    def axis(name: str) -> tuple[np.ndarray, list[Any]]:
        """Each parameter's values on [0, 1]: numbers by rank of their distinct values, others by category."""
        column = [r.get(name) for r in done]
        distinct = sorted({v for v in column if v is not None}, key=lambda v: (isinstance(v, str), v))
        position = {v: i / max(len(distinct) - 1, 1) for i, v in enumerate(distinct)}
        return np.array([position.get(v, np.nan) for v in column]), distinct

    # Parallel coordinates: one axis per parameter, the metric last; one line per trial, coloured by the metric.
    axes_names = [*parameters, metric]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(axes_names)), 5))
    scaled = [axis(name)[0] for name in parameters] + [(values - values.min()) / (np.ptp(values) or 1.0)]
    for i in range(len(done)):
        ax.plot(range(len(axes_names)), [s[i] for s in scaled], color=colors[i], alpha=0.8, linewidth=1.5)
    for x, name in enumerate(axes_names):
        ax.axvline(x, color="grey", linewidth=0.8)
        labels = axis(name)[1] if name != metric else [f"{values.min():.4f}", f"{values.max():.4f}"]
        for j, label in enumerate(labels):
            ax.text(x + 0.03, j / max(len(labels) - 1, 1), str(label), fontsize=8, va="center")
    ax.set_xticks(range(len(axes_names)), axes_names)
    ax.set_yticks([])
    ax.set_title(f"{len(done)} completed trials, coloured by {metric}")
    fig.tight_layout()
    _save(fig, sweep_dir / "parallel_coordinates.png")

    columns = max(1, min(3, len(parameters)))
    rows_n = math.ceil(len(parameters) / columns)
    fig, grid = plt.subplots(rows_n, columns, figsize=(4.5 * columns, 3.5 * rows_n), squeeze=False)
    for index, name in enumerate(parameters):
        ax = grid[index // columns][index % columns]
        column = [r.get(name) for r in done]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in column):
            ax.scatter(column, values, c=colors)
            if min(column) > 0 and max(column) / min(column) >= 20:  # e.g. learning rates over decades
                ax.set_xscale("log")
        else:
            positions, labels = axis(name)
            ax.scatter(positions, values, c=colors)
            ax.set_xticks([i / max(len(labels) - 1, 1) for i in range(len(labels))], [str(v) for v in labels])
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for index in range(len(parameters), rows_n * columns):
        grid[index // columns][index % columns].axis("off")
    fig.tight_layout()
    _save(fig, sweep_dir / "metric_vs_parameters.png")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(sweep_dir: str | Path, storage: str | None = None) -> list[dict[str, Any]]:
    """Regenerate ``results.csv``, ``results.md``, the plots and the best-trial marker of a sweep folder."""
    import optuna

    sweep_dir = Path(sweep_dir)
    manifest_path = sweep_dir / "sweep.json"
    if not manifest_path.is_file():
        from sentiment.sweep import SweepError

        raise SweepError(f"{sweep_dir} is not a sweep folder (no sweep.json); run `sentiment sweep` first")
    manifest = json.loads(manifest_path.read_text())
    study = optuna.load_study(study_name=manifest["name"], storage=storage or manifest["storage"])
    metric, parameters = manifest["metric"], manifest["parameters"]
    rows = trial_rows(study, metric, manifest["direction"])
    best = rows[0]["trial"] if rows and rows[0]["state"] == "COMPLETE" else None
    columns = ["trial", "state", *parameters, *FIGURES, "epochs_run", "runtime_s", "run_dir"]

    tmp = sweep_dir / ".results.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, sweep_dir / "results.csv")
    header = f"# Sweep {manifest['name']}: {len(rows)} trials, sorted by {metric} ({manifest['direction']})\n\n"
    (sweep_dir / ".results.md.tmp").write_text(header + _markdown(rows, columns, best))
    os.replace(sweep_dir / ".results.md.tmp", sweep_dir / "results.md")
    _plots(rows, parameters, metric, sweep_dir)

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
