"""The results table, generated from the runs' own ``metrics.json`` files listed in a manifest.

    python scripts/results_table.py docs/results/manifest.yaml --doc docs/results.md --readme README.md \
        --plot docs/results/validation-curves.png

The manifest lists entries ``{name, hardware, command, runs: [metrics.json, ...]}``; an entry with several runs
(seeds) shows mean ± standard deviation. ``--doc`` writes the full page (table + each entry's command and run
files); ``--readme`` replaces the table between ``<!-- results:start -->`` and ``<!-- results:end -->``;
``--plot`` draws every entry's validation accuracy per epoch (mean over its runs, band: min to max) on one figure,
except those whose ``plot`` is false (repeats and diverged runs: the main configurations stay readable). An entry
whose ``readme`` is false (a candidate a search tried and did not adopt) is on the results page only.
A run file may also be an ensemble's record (``scripts/ensemble.py --output``): its s / epoch is its members' sum,
and it has no curve.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import yaml

from sentiment.files import atomic_path, write_atomic

START, END = "<!-- results:start -->", "<!-- results:end -->"
COLUMNS = [("valid_acc", "valid acc"), ("test_acc", "test acc"), ("test_loss", "test loss")]


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown_table(entries: list[dict]) -> str:
    """The Markdown table of entries whose runs' ``metrics`` are loaded (see ``table``)."""
    lines = ["| configuration | hardware | seeds | " + " | ".join(t for _, t in COLUMNS) + " | s / epoch |"]
    lines.append("|---|---|---|" + "---|" * len(COLUMNS) + "---|")
    for entry in entries:
        metrics = entry["metrics"]
        cells = [_cell([m[key] for m in metrics]) for key, _ in COLUMNS]
        speed = f"{statistics.mean(m['epoch_seconds_mean'] for m in metrics):.2f}"
        lines.append(
            f"| {entry['name']} | {entry['hardware']} | {len(metrics)} | " + " | ".join(cells) + f" | {speed} |"
        )
    return "\n".join(lines)


def table(manifest: Path) -> tuple[str, list[dict]]:
    """The Markdown table of the manifest's entries, and the entries, each with its runs' ``metrics`` loaded (paths
    resolved from the repository root)."""
    entries = yaml.safe_load(manifest.read_text())
    root = manifest.resolve().parents[2]  # docs/results/manifest.yaml -> the repository
    for entry in entries:
        missing = [run for run in entry["runs"] if not (root / run).is_file()]
        if missing:
            raise SystemExit(f"{manifest}: entry {entry['name']!r} lists missing files: {', '.join(missing)}")
        entry["metrics"] = [json.loads((root / run).read_text()) for run in entry["runs"]]
    return markdown_table(entries), entries


def plot_validation_curves(entries: list[dict], output: Path) -> list[str]:
    """Every entry's validation accuracy per epoch (``table``'s entries), the mean over its runs with a min-max
    band, on one figure; returns the names of the entries drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 7))
    shown = [entry for entry in entries if entry.get("plot", True) and all("history" in m for m in entry["metrics"])]
    colors = plt.get_cmap("tab10" if len(shown) <= 10 else "tab20").colors  # left out: by the manifest, ensembles
    for number, entry in enumerate(shown):  # (an ensemble has no epochs: its members' entries have the curves)
        histories = [metrics["history"] for metrics in entry["metrics"]]
        epochs = min(len(history) for history in histories)  # early-stopped runs end sooner: the common epochs
        values = [[history[e]["valid_acc"] for history in histories] for e in range(epochs)]
        x = list(range(1, epochs + 1))
        line = axes.plot(
            x,
            [statistics.mean(v) for v in values],
            marker="o",
            color=colors[number % len(colors)],
            label=f"{entry['name'].replace('`', '')} (n={len(histories)})",
        )
        if len(histories) > 1:
            axes.fill_between(
                x, [min(v) for v in values], [max(v) for v in values], alpha=0.15, color=line[0].get_color()
            )
    axes.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy per epoch (mean over seeds)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)
    figure.tight_layout()
    with atomic_path(output) as tmp:
        figure.savefig(tmp, dpi=120)
    plt.close(figure)
    return [entry["name"] for entry in shown]


def _run_label(run: str) -> str:
    """A run file's link text: its name, with its folder's where the name alone says nothing (run folders)."""
    path = Path(run)
    return f"{path.parent.name}/{path.name}" if path.name == "metrics.json" else path.name


def _write(path: Path, text: str) -> None:
    write_atomic(path, text)


def main() -> None:
    """Write the results page and/or the README's table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--doc", type=Path, help="write the results page here")
    parser.add_argument("--readme", type=Path, help="replace the table between the markers in this file")
    parser.add_argument("--plot", type=Path, help="draw the entries' validation curves on one figure here")
    args = parser.parse_args()
    text, entries = table(args.manifest)
    if args.plot:
        plot_validation_curves(entries, args.plot)
    if args.doc:
        page = [
            "# Results",
            "",
            f"Generated by `python scripts/results_table.py {args.manifest}` from the runs' own",
            "`metrics.json`; selection on validation only, test reported once per run.",
            "",
            text,
            "",
        ]
        for entry in entries:
            page += [f"## {entry['name']}", "", entry.get("notes", "").strip(), "", "```bash", entry["command"].strip(),
                     "```", "", "Runs: " + ", ".join(f"[{_run_label(r)}]({os.path.relpath(r, 'docs')})"
                                                     for r in entry["runs"]), ""]  # fmt: skip
        _write(args.doc, "\n".join(page))
    if args.readme:
        readme = args.readme.read_text()
        if START not in readme or END not in readme:
            raise SystemExit(f"{args.readme} has no {START} ... {END} markers to put the table between")
        before, rest = readme.split(START, 1)
        _, after = rest.split(END, 1)
        shown = markdown_table([entry for entry in entries if entry.get("readme", True)])
        _write(args.readme, f"{before}{START}\n{shown}\n{END}{after}")
    print(text)


if __name__ == "__main__":
    main()
