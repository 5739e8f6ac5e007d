"""The scripts beside the package: the report's tables and the run comparison, on real (tiny) runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_split
from test_training import tiny_config

from sentiment.training import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_runs(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("runs")
    for name, bidirectional in (("lstm", False), ("bilstm", True)):
        train(tiny_config(hub_imdb, folder / name, epochs=1, bidirectional=bidirectional))
    return [folder / "lstm", folder / "bilstm"]


def test_report_tables_put_our_figures_beside_the_report(two_runs: list[Path], tmp_path: Path) -> None:
    lstm, bilstm = two_runs
    output = tmp_path / "tables.md"
    args = ["--lstm_part1", lstm, "--lstm_part2", lstm, "--bilstm_part1", bilstm, "--bilstm_part2", bilstm]
    subprocess.run([sys.executable, ROOT / "scripts" / "report_tables.py", *args, "--output", output], check=True)
    text = output.read_text()
    ours = json.loads((bilstm / "metrics.json").read_text())
    test_row = next(line for line in text.splitlines()[::-1] if line.startswith("| Test Accuracy"))
    assert f"{ours['test_acc']:.4f}" in test_row and "0.8914" in test_row  # ours, then the report's Bonus Part2
    assert text.count("| Test Accuracy") == 2 and "Bonus Part1 (report)" in text


def test_report_tables_name_runs_without_metrics(tmp_path: Path) -> None:
    args = [str(tmp_path / "missing")] * 4
    flags = [x for pair in zip(["--lstm_part1", "--lstm_part2", "--bilstm_part1", "--bilstm_part2"], args, strict=True)
             for x in pair]  # fmt: skip
    result = subprocess.run(
        [sys.executable, ROOT / "scripts" / "report_tables.py", *flags, "--output", tmp_path / "t.md"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "no metrics.json" in result.stderr and "missing" in result.stderr


def test_compare_runs_tabulates_each_run(two_runs: list[Path]) -> None:
    result = subprocess.run(
        [sys.executable, ROOT / "scripts" / "compare_runs.py", *two_runs], capture_output=True, text=True, check=True
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| lstm | 1 | 8 x 1 = 8 |")
    bilstm = json.loads((two_runs[1] / "metrics.json").read_text())
    assert f"{bilstm['test_acc']:.4f}" in lines[3]
    sizes = bilstm["sizes"]
    assert f"| {sizes['validation']:,} / {sizes['test']:,} |" in lines[3]  # the reviews each figure counts
    assert lines[3].endswith("|  |")  # no GPU: no peak memory to show


def test_results_table_from_a_manifest(two_runs: list[Path], tmp_path: Path) -> None:
    """Mean ± std over an entry's runs, the results page with each command, the README's table between markers."""
    repo = tmp_path / "repo"
    (repo / "docs" / "results").mkdir(parents=True)
    runs = []
    for run in two_runs:
        target = repo / "docs" / "results" / f"{run.name}.metrics.json"
        target.write_text((run / "metrics.json").read_text())
        runs.append(str(target.relative_to(repo)))
    ensemble = repo / "docs" / "results" / "ensemble.json"  # an ensemble's record lists like a run, without a curve
    subprocess.run([sys.executable, ROOT / "scripts" / "ensemble.py", *two_runs, "--output", ensemble], check=True,
                   capture_output=True)  # fmt: skip
    record = json.loads(ensemble.read_text())
    manifest = repo / "docs" / "results" / "manifest.yaml"
    manifest.write_text(
        json.dumps([{"name": "both", "hardware": "CPU", "command": "sentiment train ...", "runs": runs},
                    {"name": "pair", "hardware": "CPU", "command": "-", "runs": ["docs/results/ensemble.json"]},
                    {"name": "tried", "readme": False, "hardware": "CPU", "command": "-", "runs": runs[:1]}])
    )  # fmt: skip
    readme = repo / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nold\n<!-- results:end -->\nafter\n")
    script = ROOT / "scripts" / "results_table.py"
    plot = repo / "docs" / "results" / "curves.png"
    subprocess.run([sys.executable, script, manifest, "--doc", repo / "docs" / "results.md", "--readme", readme,
                    "--plot", plot], check=True, capture_output=True, cwd=repo)  # fmt: skip
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    accs = [json.loads((run / "metrics.json").read_text())["test_acc"] for run in two_runs]
    mean = sum(accs) / 2
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- results:end -->\nafter\n")
    assert "| both | CPU | 2 | " in text and f"{mean:.4f} ± " in text
    seconds = sum(json.loads((run / "metrics.json").read_text())["epoch_seconds_mean"] for run in two_runs)
    assert f"| pair | CPU | 1 | {record['valid_acc']:.4f} | {record['test_acc']:.4f} | " in text
    assert text.split("| pair |")[1].splitlines()[0].endswith(f" | {seconds:.2f} |")
    page = (repo / "docs" / "results.md").read_text()
    assert "sentiment train ..." in page
    assert "| tried | CPU | 1 | " in page and "## tried" in page and "| tried |" not in text  # results page only
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from results_table import plot_validation_curves, table
    finally:
        sys.path.pop(0)
    common = {"hardware": "CPU", "command": "-"}
    manifest.write_text(json.dumps([{"name": "shown", **common, "runs": runs},
                                    {"name": "left out", "plot": False, **common, "runs": runs},
                                    {"name": "pair", **common, "runs": ["docs/results/ensemble.json"]}]))  # fmt: skip
    _, entries = table(manifest)
    assert [entry["name"] for entry in entries] == ["shown", "left out", "pair"]  # all in the table
    assert plot_validation_curves(entries, plot) == ["shown"]  # not the one left out, nor the ensemble (no epochs)
    manifest.write_text(json.dumps([{"name": "gone", "hardware": "CPU", "command": "-", "runs": ["docs/x.json"]}]))
    result = subprocess.run([sys.executable, script, manifest], capture_output=True, text=True, cwd=repo)
    assert result.returncode != 0 and "missing files: docs/x.json" in result.stderr


def test_lm_finetune_seeds_pretrains_once_and_fine_tunes_each_seed(hub_imdb: Path, tmp_path: Path) -> None:
    """scripts/lm_finetune_seeds.sh on CPU: one language model (accelerate launch), then one classifier per seed
    started from it, with every run's figures collected and tabulated."""
    import yaml

    from sentiment.prepare import prepare_data

    sizes = {"vectors": "none", "embedding_dim": 16, "hidden_dim": 16, "n_layers": 2, "dropout": 0.1, "lr": 0.01}
    prepared = tmp_path / "prepared"
    prepare_data(tiny_config(hub_imdb, tmp_path / "unused", with_unsupervised=True, **sizes)).save(prepared)
    lm_config, classifier_config = tmp_path / "lm.yaml", tmp_path / "classifier.yaml"
    lm_config.write_text(yaml.safe_dump({**sizes, "epochs": 1, "batch_size": 4, "eval_batch_size": 2, "bptt": 8}))
    classifier = {**sizes, "epochs": 1, "batch_size": 8, "bidirectional": False, "pooling": "concat", "num_proc": 1}
    classifier_config.write_text(yaml.safe_dump(classifier))
    results = tmp_path / "results"
    env = {**os.environ, "RUNS_DIR": str(tmp_path / "runs"), "PYTHON": sys.executable}
    script = ROOT / "scripts" / "lm_finetune_seeds.sh"
    args = [lm_config, classifier_config, prepared, results, "7", "8"]
    subprocess.run([script, *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert json.loads((results / "pretrain.metrics.json").read_text())["history"][0]["epoch"] == 1
    table = (results / "finetune.md").read_text().splitlines()
    test_reviews = pq.read_metadata(hub_imdb / "plain_text" / "test-00000-of-00001.parquet").num_rows
    for seed in (7, 8):
        metrics = json.loads((results / f"finetune-{seed}.metrics.json").read_text())
        assert metrics["sizes"]["test"] == test_reviews  # every test review evaluated once
        correct = metrics["test_acc"] * test_reviews
        assert correct == pytest.approx(round(correct), abs=1e-9)  # a count of reviews, not an average of batches
        assert "weights from the language model" in (results / f"finetune-{seed}.log").read_text()
        (row,) = [line for line in table if line.startswith(f"| finetune-{seed} |")]
        assert f"| {metrics['valid_acc']:.4f} | {metrics['test_acc']:.4f} | {metrics['test_loss']:.4f} |" in row


def test_validation_split_gap_measures_both_schemes(tmp_path: Path) -> None:
    """On a train file grouped by movie (10 reviews sharing a name, as IMDB's file is), the script finds the
    grouping, trains its logistic regression for each scheme and seed, and writes JSON and Markdown."""
    (tmp_path / "imdb" / "plain_text").mkdir(parents=True)
    for split, n, seed in (("train", 400, 11), ("test", 100, 12)):
        texts, labels = make_split(n, seed)
        movie_names = ["Qx" + chr(97 + i // 26) + chr(97 + i % 26) for i in range(n // 10)]
        texts = [f"{text} Starring {movie_names[i // 10]}." for i, text in enumerate(texts)]
        table = pa.table({"text": texts, "label": pa.array(labels, pa.int64())})
        pq.write_table(table, tmp_path / "imdb" / "plain_text" / f"{split}-00000-of-00001.parquet")
    output = tmp_path / "gap"
    args = ["--dataset", tmp_path / "imdb", "--output", output, "--seeds", "1,2", "--epochs", "3"]
    subprocess.run([sys.executable, ROOT / "scripts" / "validation_split_gap.py", *args], check=True)
    result = json.loads(output.with_suffix(".json").read_text())
    assert result["neighbour_name_overlap"]["1"] > 0.8 > 0.1 > result["neighbour_name_overlap"]["random"]
    assert [(run["scheme"], run["seed"]) for run in result["runs"]] == [
        ("standard", 1),
        ("standard", 2),
        ("movie_blocks", 1),
        ("movie_blocks", 2),
    ]
    for run in result["runs"]:
        assert run["test_acc"] > 0.6 and run["valid_acc"] > 0.6  # above chance on the learnable fixture reviews
        assert run["gap"] == run["valid_acc"] - run["test_acc"]
    assert "| movie_blocks |" in output.with_suffix(".md").read_text()
