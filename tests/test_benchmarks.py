"""The CPU-sized slice of the benchmark suite, run in CI: the trainer is not slower than the plain loop of the
report's recipe measured in the same run (a ratio, not a time), and the suite's own pieces write what they say."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.plain_loop import plain_loop
from benchmarks.suite import Results, derived_prepared
from sentiment.config import build_config
from sentiment.prepare import PreparedData, prepare_data
from sentiment.training import train

MODEL = {"hidden_dim": 32, "n_layers": 2, "bidirectional": True, "dropout": 0.2, "batch_size": 16, "lr": 0.01}


@pytest.fixture(scope="module")
def prepared(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = build_config(None, {"dataset": str(hub_imdb), "num_proc": 1, "vectors": "none", "embedding_dim": 16})
    return prepare_data(cfg).save(tmp_path_factory.mktemp("bench") / "prepared")


def test_trainer_is_not_slower_than_the_plain_loop(prepared: Path, tmp_path: Path) -> None:
    """Best epoch time of 3: the trainer (Accelerate loop, CPU path) within 1.5x of the plain loop."""
    data = PreparedData.load(prepared)
    plain = plain_loop(data, None, epochs=3, device="cpu", **MODEL)
    metrics = train(
        build_config(None, {"prepared": str(prepared), "epochs": 3, "output_dir": str(tmp_path / "run"),
                            "report_to": "none", **MODEL})
    )  # fmt: skip
    plain_seconds = min(h["epoch_seconds"] for h in plain["history"])
    trainer_seconds = min(h["epoch_seconds"] for h in metrics["history"])
    print(f"CPU slice: plain loop {plain_seconds:.4f} s/epoch, trainer {trainer_seconds:.4f} s/epoch")
    assert trainer_seconds <= 1.5 * plain_seconds, (
        f"trainer {trainer_seconds:.3f} s/epoch vs plain loop {plain_seconds:.3f} s/epoch"
    )
    # The baseline really trains (a loop that skipped work would also be fast): its training loss falls, and it
    # beats chance on the fixture's learnable validation reviews.
    assert len(plain["history"]) == 3
    assert plain["history"][-1]["train_loss"] < 0.8 * plain["history"][0]["train_loss"]
    assert plain["history"][-1]["valid_acc"] > 0.5


def test_derived_prepared_folder_cuts_reviews_and_lengths(prepared: Path, tmp_path: Path) -> None:
    data = PreparedData.load(prepared)
    folder = derived_prepared(data, tmp_path / "derived", train_reviews=10, max_length=5)
    derived = PreparedData.load(folder)
    assert len(derived.splits["train"]) == 10
    assert derived.splits["train"].lengths.max() <= 5
    first = data.splits["train"]
    assert derived.splits["train"][3][0].tolist() == first[3][0][:5].tolist()
    assert len(derived.splits["test"]) == len(data.splits["test"])
    assert derived.info["max_length"] == 5


def test_results_are_rewritten_after_each_row(tmp_path: Path) -> None:
    results = Results(tmp_path / "out" / "suite")
    results.add("train", {"config": "lstm", "s/epoch": 0.94})
    results.add("train", {"config": "bilstm", "s/epoch": 5.5, "speed-up": 2.0})
    saved = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert [row["config"] for row in saved["sections"]["train"]] == ["lstm", "bilstm"]
    table = (tmp_path / "out" / "suite.md").read_text()
    assert "| config | s/epoch | speed-up |" in table and "| bilstm | 5.5 | 2 |" in table


def test_sweep_section_times_a_real_sweep(prepared: Path, tmp_path: Path) -> None:
    """The sweep section runs a real (tiny) sweep per setting and records its trials and wall time."""
    import yaml

    from benchmarks.suite import section_sweep

    spec = {"name": "bench", "method": "grid", "metric": {"name": "valid_acc", "goal": "maximize"},
            "parameters": {"lr": {"values": [0.01, 0.03]}, "epochs": {"value": 1}}}  # fmt: skip
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    results = Results(tmp_path / "suite")
    before = dict(os.environ)  # an in-process sweep worker sets WANDB_RUN_GROUP: keep it out of later tests
    try:
        section_sweep(results, prepared, tmp_path, str(sweep_file), 2, [(0, 1)], ["--hidden_dim=8", "--batch_size=16"])
    finally:
        os.environ.clear()
        os.environ.update(before)
    [row] = json.loads((tmp_path / "suite.json").read_text())["sections"]["sweep"]
    assert (row["GPUs"], row["workers"], row["trials"], row["complete"], row["failed"]) == (0, 1, 2, 2, 0)
    assert row["epochs"] == 2 and row["wall s"] > 0
    assert len(list((tmp_path / "sweep-0gpu-1w" / "trials").iterdir())) == 2


def test_suite_refuses_an_unknown_persistent_weights_format(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--persistent_weights`` names the kernels' formats to try; a wrong one stops the suite before any run."""
    import sys

    from benchmarks import suite
    from sentiment import persistent

    monkeypatch.setattr(
        sys, "argv", ["suite", "--sections", "train", "--prepared", "x", "--persistent_weights", "fp32,tf"]
    )
    with pytest.raises(SystemExit):
        suite.main()
    assert "--persistent_weights fp32,tf: choose from fp32, bf16, mma, fp32+mma, bf16+mma" in capsys.readouterr().err
    assert persistent.WEIGHT_FORMATS == ("fp32", "mma", "bf16")


def test_kernel_flags_set_the_stack_and_the_formats_and_name_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--persistent_stack on|off`` and ``--persistent_weights`` set the kernels' module switches both ways, and the
    label the results' paths carry says which were set."""
    import argparse

    from benchmarks.kernel_flags import add_kernel_flags, apply_kernel_flags
    from sentiment import persistent

    parser = argparse.ArgumentParser()
    add_kernel_flags(parser)
    monkeypatch.setattr(persistent, "WEIGHT_FORMATS", persistent.WEIGHT_FORMATS)  # restored after the test
    for stack, label in (("on", " (layers stacked)"), ("off", " (a launch per layer)")):
        monkeypatch.setattr(persistent, "STACK_LAYERS", stack == "off")
        args = parser.parse_args(["--persistent_stack", stack, "--persistent_weights", "bf16,mma"])
        assert apply_kernel_flags(parser, args) == label + " (persistent weights bf16,mma)"
        assert persistent.STACK_LAYERS is (stack == "on")
        assert persistent.WEIGHT_FORMATS == ("bf16", "mma")
    monkeypatch.setattr(persistent, "STACK_LAYERS", True)
    assert apply_kernel_flags(parser, parser.parse_args([])) == ""
    assert persistent.STACK_LAYERS is True
