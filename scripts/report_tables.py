"""The report's Table 1 and Table 2, side by side with this pipeline's runs of the same configurations.

    python scripts/report_tables.py --lstm_part1 runs/t-lstm-part1 --lstm_part2 runs/t-lstm \
        --bilstm_part1 runs/t-bilstm-part1 --bilstm_part2 runs/t-bilstm --output docs/results/report-tables.md

Each run folder's ``metrics.json`` gives the selected epoch's train / validation figures and the test figures.
The report's figures are its own (GloVe 6B 100d, its 70/30 split of the test set into validation and test).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sentiment.files import write_atomic

ROWS = [
    ("Train Loss", "train_loss"),
    ("Train Accuracy", "train_acc"),
    ("Validation Loss", "valid_loss"),
    ("Validation Accuracy", "valid_acc"),
    ("Test Loss", "test_loss"),
    ("Test Accuracy", "test_acc"),
]
# The report's Table 2 (its Table 1 is the first two columns).
REPORT = {
    "lstm_part1": [0.6620, 0.5968, 0.587, 0.6986, 0.590, 0.6916],
    "lstm_part2": [0.2670, 0.8993, 0.2967, 0.8849, 0.3012, 0.8848],
    "bilstm_part1": [0.6260, 0.6416, 0.5310, 0.7402, 0.5333, 0.7344],
    "bilstm_part2": [0.1626, 0.9415, 0.2777, 0.8945, 0.2790, 0.8914],
}
TITLES = {"lstm_part1": "Part1", "lstm_part2": "Part2", "bilstm_part1": "Bonus Part1", "bilstm_part2": "Bonus Part2"}


def table(runs: dict[str, Path], columns: list[str]) -> str:
    """A Markdown table: one row per figure, for each column this pipeline's figure and the report's."""
    metrics = {name: json.loads((runs[name] / "metrics.json").read_text()) for name in columns}
    header = "| |" + "".join(f" {TITLES[name]} (ours) | {TITLES[name]} (report) |" for name in columns)
    lines = [header, "|---|" + "---|---|" * len(columns)]
    for index, (label, key) in enumerate(ROWS):
        cells = "".join(f" {metrics[name][key]:.4f} | {REPORT[name][index]:.4f} |" for name in columns)
        lines.append(f"| {label} |{cells}")
    return "\n".join(lines)


def main() -> None:
    """Write both tables (Markdown) to ``--output`` and print them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in REPORT:
        parser.add_argument(f"--{name}", type=Path, required=True, help="run folder")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    runs = {name: getattr(args, name) for name in REPORT}
    missing = [str(path) for path in runs.values() if not (path / "metrics.json").is_file()]
    if missing:
        raise SystemExit(f"no metrics.json in {', '.join(missing)}: train those runs first")
    text = (
        "## Table 1: the LSTM, one epoch (Part1) and the swept configuration (Part2)\n\n"
        + table(runs, ["lstm_part1", "lstm_part2"])
        + "\n\n## Table 2: adding the BiLSTM (Bonus)\n\n"
        + table(runs, list(REPORT))
        + "\n"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output, text)
    print(text)


if __name__ == "__main__":
    main()
