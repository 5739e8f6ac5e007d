"""Ensemble trained runs by averaging their positive-class probabilities, and tabulate members and ensemble on
validation and test (Markdown). ``--output F.json`` saves the ensemble in the form of a run's ``metrics.json``
(``valid_acc``, ``test_acc``, ...; the full table under ``splits``), which ``scripts/results_table.py`` lists like
any run. Every training run folder holds the selected model's ``validation-logits.npz`` and ``test-logits.npz``;
for another checkpoint, ``sentiment evaluate --logits`` writes them:

    python scripts/ensemble.py runs/ft-42 runs/ft-43 runs/ft-44 --output ensemble.json
    sentiment evaluate --model CHECKPOINT --prepared prepared/imdb-lm-400 --split test --logits FOLDER/test-logits.npz

The ensemble is fixed in advance (all members, equal weights): nothing is selected on test. Models from
different language models (ULMFiT's forward and backward pair) combine the same way, as long as they scored
the same split of the same prepared data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sentiment.files import write_atomic
from sentiment.predict import classification_metrics, ensemble_metrics

SPLITS = ("validation", "test")


def load_member(run_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The (logits, labels) that ``sentiment evaluate --logits`` saved as ``run_dir/{split}-logits.npz``."""
    path = run_dir / f"{split}-logits.npz"
    if not path.is_file():
        raise SystemExit(
            f"{path} not found: training runs write it at their end; for another checkpoint use "
            f"`sentiment evaluate --model {run_dir}/best --split {split} --prepared DIR --logits {path}`"
        )
    with np.load(path) as saved:
        return saved["logits"], saved["labels"]


def ensemble_table(run_dirs: list[Path]) -> dict[str, dict[str, dict]]:
    """Accuracy and loss of each member (named by its folder as given) and of their ensemble, per split:
    ``{split: {name: metrics}}``."""
    figures: dict[str, dict[str, dict]] = {}
    for split in SPLITS:
        members = [load_member(run_dir, split) for run_dir in run_dirs]
        figures[split] = {
            str(run_dir): classification_metrics(*member) for run_dir, member in zip(run_dirs, members, strict=True)
        }
        figures[split]["ensemble"] = ensemble_metrics(members)
    return figures


def ensemble_record(run_dirs: list[Path], figures: dict[str, dict[str, dict]]) -> dict:
    """The ensemble's figures in the form of a run's ``metrics.json`` (``valid_acc``, ``valid_loss``, ``test_acc``,
    ``test_loss``), so ``scripts/results_table.py`` lists it like any run; ``epoch_seconds_mean`` is the members'
    sum (the training time of one epoch of every member) when each member folder has its ``metrics.json``. The
    full table is under ``splits``."""
    record: dict = {"members": [str(run_dir) for run_dir in run_dirs]}
    for prefix, split in (("valid", "validation"), ("test", "test")):
        record[f"{prefix}_acc"] = figures[split]["ensemble"]["accuracy"]
        record[f"{prefix}_loss"] = figures[split]["ensemble"]["loss"]
    member_metrics = [run_dir / "metrics.json" for run_dir in run_dirs]
    if all(path.is_file() for path in member_metrics):
        record["epoch_seconds_mean"] = sum(
            json.loads(path.read_text())["epoch_seconds_mean"] for path in member_metrics
        )
    record["splits"] = figures
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding {validation,test}-logits.npz")
    parser.add_argument(
        "--output",
        type=Path,
        help="write the figures as JSON here (the ensemble's in metrics.json form, for the results table)",
    )
    args = parser.parse_args()
    figures = ensemble_table(args.runs)
    print("| model | valid acc | valid loss | test acc | test loss |")
    print("|---|---|---|---|---|")
    for name in figures["test"]:
        valid, test = figures["validation"][name], figures["test"][name]
        cells = (valid["accuracy"], valid["loss"], test["accuracy"], test["loss"])
        print(f"| {name} | " + " | ".join(f"{cell:.4f}" for cell in cells) + " |")
    if args.output:
        write_atomic(args.output, json.dumps(ensemble_record(args.runs, figures), indent=2))


if __name__ == "__main__":
    main()
