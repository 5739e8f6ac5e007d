"""The command line, as a user runs it: `sentiment prepare`, `sentiment train`, and `accelerate launch
scripts/train.py`, on one process and on two (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs=2", "--batch_size=8", "--eval_batch_size=16", "--hidden_dim=12", "--report_to=none", "--num_proc=1"]


def run(
    args: list[str], cwd: Path = REPO, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command with the test session's environment (datasets cache, offline wandb)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def sentiment(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "sentiment.cli", *args], check=check)


def accelerate_launch(num_processes: int, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` on CPU; with several processes torchrun starts them and they join through gloo."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes == 1:
        launcher += ["--config_file", str(REPO / "configs" / "accelerate" / "cpu.yaml")]
    else:
        launcher += ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no"]
        launcher += ["--dynamo_backend", "no", "--multi_gpu", "--main_process_port", "29533"]
    # Without ACCELERATE_USE_CPU, processes started on a machine with no GPU would each run alone.
    return run([*launcher, str(REPO / "scripts" / "train.py"), *args], env={"ACCELERATE_USE_CPU": "true"})


def test_prepare_then_train_from_the_prepared_folder(hub_imdb: Path, tmp_path: Path) -> None:
    """`sentiment prepare` writes a folder; `sentiment train --prepared` trains from it without the raw data."""
    prepared = tmp_path / "prepared"
    sentiment(
        "prepare",
        "--config",
        str(REPO / "configs" / "bilstm.yaml"),
        "--dataset",
        str(hub_imdb),
        f"--output_dir={prepared}",
        "--num_proc=1",
    )
    manifest = json.loads((prepared / "prepared.json").read_text())
    assert manifest["sizes"] == {"train": 72, "validation": 8, "test": 60}
    assert manifest["embedding_dim"] == 50
    sentiment(
        "train",
        "--config",
        str(REPO / "configs" / "bilstm.yaml"),
        "--prepared",
        str(prepared),
        "--dataset=/does/not/exist",
        f"--output_dir={tmp_path / 'run'}",
        *TINY,
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["sizes"] == manifest["sizes"]
    assert len(metrics["history"]) == 2


def test_accelerate_launch_single_process_matches_sentiment_train(hub_imdb: Path, tmp_path: Path) -> None:
    """scripts/train.py under `accelerate launch` is the same trainer as `sentiment train`: same figures."""
    common = ["--config", str(REPO / "configs" / "lstm.yaml"), "--dataset", str(hub_imdb), *TINY, "--lr=0.01"]
    sentiment("train", *common, f"--output_dir={tmp_path / 'cli'}")
    accelerate_launch(1, *common, f"--output_dir={tmp_path / 'launch'}")
    by_cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    by_launch = json.loads((tmp_path / "launch" / "metrics.json").read_text())
    assert by_launch["history"][-1]["train_loss"] == pytest.approx(by_cli["history"][-1]["train_loss"], abs=1e-6)
    assert by_launch["test_acc"] == by_cli["test_acc"]


def test_two_processes_share_the_work_and_count_each_example_once(hub_imdb: Path, tmp_path: Path) -> None:
    """Two CPU processes (gloo): every example evaluated exactly once, only the main process writes."""
    accelerate_launch(2, "--dataset", str(hub_imdb), *TINY, "--bidirectional", f"--output_dir={tmp_path / 'ddp'}")
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["sizes"] == {"train": 72, "validation": 8, "test": 60}
    assert (tmp_path / "ddp" / "state" / "random_states_1.pkl").is_file()  # each process's RNG state is kept
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "best",
        "config.yaml",
        "curves.png",
        "metrics.json",
        "state",
        "test-logits.npz",
        "validation-logits.npz",
    ]
    with np.load(tmp_path / "ddp" / "test-logits.npz") as saved:  # both processes' reviews, each in its place
        assert saved["logits"].shape == (60,)
        assert float(np.mean((saved["logits"] > 0) == saved["labels"])) == pytest.approx(metrics["test_acc"])


def test_bad_config_key_exits_with_a_clear_message(hub_imdb: Path) -> None:
    result = sentiment("train", "--dataset", str(hub_imdb), "--hiden_dim=5", check=False)
    assert result.returncode == 2
    assert "unknown config key 'hiden_dim'" in result.stderr
    assert "Did you mean 'hidden_dim'" in result.stderr


def test_missing_dataset_exits_with_a_clear_message(tmp_path: Path) -> None:
    result = sentiment(
        "train",
        f"--dataset={tmp_path / 'nowhere'}",
        "--report_to=none",
        f"--output_dir={tmp_path / 'run'}",
        check=False,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_commands_and_keys() -> None:
    result = sentiment("--help")
    assert "prepare" in result.stdout and "train" in result.stdout
    assert "max_train_samples" in result.stdout


@pytest.mark.parametrize("name", ["cpu.yaml", "single_gpu.yaml", "multi_gpu.yaml", "multi_node.yaml"])
def test_accelerate_configs_load(name: str) -> None:
    """The shipped Accelerate configs are valid for Accelerate's own loader."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / name))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    expected = {"cpu.yaml": (1, 1), "single_gpu.yaml": (1, 1), "multi_gpu.yaml": (2, 1), "multi_node.yaml": (16, 2)}
    assert (config.num_processes, config.num_machines) == expected[name]
    assert config.use_cpu is (name == "cpu.yaml")
