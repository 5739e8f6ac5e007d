"""Tabulate training runs side by side (Markdown): processes, batch, seed, seconds per epoch, best epoch, the
selected epoch's validation and test figures, the reviews each was measured on and the peak GPU memory of every
process, read from each run's ``metrics.json`` and ``config.yaml``.

    python scripts/compare_runs.py runs/1gpu-seed42 runs/2gpu-seed42
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def run_row(run_dir: Path) -> str:
    """One Markdown table row for the run folder ``run_dir``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    processes = metrics.get("num_processes", 1)
    cells = [
        run_dir.name,
        str(processes),
        f"{config['batch_size']} x {processes} = {config['batch_size'] * processes}",
        str(config["seed"]),
        f"{metrics['epoch_seconds_mean']:.2f}",
        str(metrics["best_epoch"]),
        f"{metrics['valid_acc']:.4f}",
        f"{metrics['test_acc']:.4f}",
        f"{metrics['test_loss']:.4f}",
        f"{metrics['sizes']['validation']:,} / {metrics['sizes']['test']:,}",
        ", ".join(f"{gib:.2f}" for gib in (metrics.get("memory") or {}).get("peak_reserved_gib_per_process", [])),
    ]
    return "| " + " | ".join(cells) + " |"


def main(run_dirs: list[str]) -> None:
    """Print the table for the given run folders."""
    if not run_dirs:
        raise SystemExit("usage: python scripts/compare_runs.py RUN_DIR [RUN_DIR ...]")
    print("| run | processes | global batch | seed | s/epoch | best epoch | valid acc | test acc | test loss | "
          "reviews evaluated (valid / test) | peak reserved GiB per GPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run_dir in run_dirs:
        print(run_row(Path(run_dir)))


if __name__ == "__main__":
    main(sys.argv[1:])
