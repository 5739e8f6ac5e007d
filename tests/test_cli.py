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
import yaml
from conftest import run_cli

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


def _load_best_in_process(rank: int, folders: list[str], rendezvous: str, expected: dict) -> None:
    """One process of a gloo group: a model of its own random weights loads the best weights from its own folder,
    where only the first process's folder holds them (another host's disk holds no copy of the run)."""
    import torch
    import torch.distributed as dist

    from sentiment.checkpoint import load_best_weights
    from sentiment.model import LSTMClassifier

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)
        model = LSTMClassifier(vocab_size=40, embedding_dim=6, hidden_dim=5, n_layers=2, bidirectional=True)
        load_best_weights(model, Path(folders[rank]) / "model.safetensors")
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, expected[key]), f"process {rank}: {key}"
    finally:
        dist.destroy_process_group()


def test_best_weights_reach_a_process_without_the_file(tmp_path: Path) -> None:
    """Several hosts with their own disks: only the main process can read best/. load_best_weights reads it there
    and sends the weights, so both processes of a real gloo group end with them."""
    import torch
    import torch.multiprocessing as mp

    from sentiment.model import LSTMClassifier

    torch.manual_seed(0)
    best = LSTMClassifier(vocab_size=40, embedding_dim=6, hidden_dim=5, n_layers=2, bidirectional=True)
    folders = [tmp_path / "main", tmp_path / "other"]
    best.save_pretrained(folders[0])
    folders[1].mkdir()
    assert not (folders[1] / "model.safetensors").exists()
    expected = {key: tensor.clone() for key, tensor in best.state_dict().items()}
    args = ([str(folder) for folder in folders], str(tmp_path / "rendezvous"), expected)
    mp.spawn(_load_best_in_process, args=args, nprocs=2, join=True)


def test_bad_config_key_exits_with_a_clear_message(hub_imdb: Path) -> None:
    result = sentiment("train", "--dataset", str(hub_imdb), "--hiden_dim=5", check=False)
    assert result.returncode == 2
    assert "unknown config key 'hiden_dim'" in result.stderr
    assert "Did you mean 'hidden_dim'" in result.stderr


def test_removed_key_from_an_old_run_config(hub_imdb: Path, tmp_path: Path) -> None:
    """A run folder from before unfreeze_warmup was removed holds `unfreeze_warmup: 0.0` in its config.yaml:
    `sentiment train --config RUN/config.yaml --resume` (what a damaged-state error suggests) resumes with one
    warning, and the run's size of the embedding (left out: the vectors' 50) passes the resume check. At another
    value, in the file or as a flag, the key is refused with exit code 2 and what to do."""
    run_dir = tmp_path / "run"
    sentiment("train", f"--dataset={hub_imdb}", f"--output_dir={run_dir}", *TINY, "--epochs=1")
    config = run_dir / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    assert saved["embedding_dim"] == 50 and "unfreeze_warmup" not in saved
    config.write_text(yaml.safe_dump({**saved, "unfreeze_warmup": 0.0}, sort_keys=False))  # as old runs wrote it
    result = run_cli("train", f"--config={config}", "--resume")
    assert result.returncode == 0, result.stderr
    warning = "unfreeze_warmup was removed; its value 0.0 changed nothing, ignored"
    assert result.stderr.count(warning) == 1
    assert "nothing left to train: 1 of 1 epochs done" in result.stderr
    assert "unfreeze_warmup" not in config.read_text()  # the run's config.yaml is rewritten without it
    for args in (["--unfreeze_warmup=0.5"], []):
        if not args:
            config.write_text(yaml.safe_dump({**saved, "unfreeze_warmup": 0.5}, sort_keys=False))
        result = run_cli("train", f"--config={config}", "--resume", *args)
        assert result.returncode == 2
        source = "the command-line flags" if args else str(config)
        assert f"error: config key 'unfreeze_warmup' (0.5, in {source}) was removed" in result.stderr
        assert "Drop the key" in result.stderr and "Traceback" not in result.stderr


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


def test_help_lists_the_commands() -> None:
    """`sentiment --help` lists every command and says how to get a command's options."""
    from sentiment.cli import COMMANDS

    result = sentiment("--help")
    for command in COMMANDS:
        assert f"\n  {command} " in result.stdout
    assert "sentiment COMMAND --help" in result.stdout


GROUP_HEADINGS = ("data:", "model:", "training:", "language model:", "output and tracking:")


def assert_trainer_help(text: str) -> None:
    """The trainer's ``--help``: the config keys in their groups, each with its help and default."""
    flat = " ".join(text.split())  # lines are wrapped at the terminal's width
    for heading in GROUP_HEADINGS:
        assert f"\n{heading}\n" in text
    assert "--config FILE" in flat
    assert "--hidden_dim INT LSTM hidden size per direction (default: 100)" in flat
    assert "--resume [BOOL] continue the run in output_dir (default: false)" in flat
    assert "--mixed_precision {no,fp16,bf16}|null" in flat


def test_sentiment_train_help() -> None:
    """`sentiment train --help` exits 0 and lists the config keys in groups (it used to be an unknown key)."""
    result = sentiment("train", "--help")
    assert result.stdout.startswith("usage: sentiment train [--config FILE] [--KEY=VALUE ...]")
    assert_trainer_help(result.stdout)
    assert result.stderr == ""


def test_scripts_train_help() -> None:
    """`python scripts/train.py --help` (what `accelerate launch` runs) prints the same options under its name."""
    result = run([sys.executable, str(REPO / "scripts" / "train.py"), "--help"])
    assert "usage: " in result.stdout and "train.py [--config FILE]" in result.stdout
    assert_trainer_help(result.stdout)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("train", ["--hidden_dim INT LSTM hidden size per direction (default: 100)"]),
        ("prepare", ["--output_dir STR|null", "--prepared STR|null", "--max_vocab_size INT"]),
        ("pretrain", ["--bptt INT language model's window in tokens (pretrain) (default: 70)", "--init_from STR|null"]),
        (
            "sweep",
            [
                "SWEEP.yaml",
                "--count N",
                "--workers N",
                "--gpus N",
                "--storage URL",
                "--sweep_dir DIR",
                "--sampler_seed N seed of the Optuna sampler (default: 0)",
                "--stop_after SECONDS",
            ],
        ),
        ("report", ["SWEEP_DIR", "--storage URL"]),
        ("predict", ["--model PATH_OR_ID", "--input FILE", "--output FILE", "--batch_size N", "--device D"]),
        (
            "evaluate",
            [
                "--model PATH_OR_ID",
                "--split {test,validation,train} split to score (default: test)",
                "--output",
                "--logits",
                "--device D",
                "data:",
                "--dataset STR",
                "--split_scheme",
                "--max_eval_samples INT|null",
            ],
        ),
        ("push", ["--repo_id USER/NAME", "--private", "--revision BRANCH", "--commit_message MSG"]),
    ],
)
def test_every_command_answers_help(
    command: str, expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    """`sentiment COMMAND --help` exits 0 and describes the command's options (none needs --model or a file)."""
    from sentiment.cli import main

    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sentiment {command}")
    flat = " ".join(out.split())
    for text in expected:
        assert text in flat, text
    if command in ("train", "prepare", "pretrain"):
        assert_trainer_help(out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs=abc"], "error: epochs must be an integer (got 'abc')"),
        (["--pooling=attention"], "error: pooling must be one of 'last', 'max', 'mean', 'concat' (got 'attention')"),
        (["--resume=maybe"], "error: resume must be true or false (got 'maybe')"),
        (["--hiden_dim", "5"], "Did you mean 'hidden_dim'?"),
    ],
)
def test_bad_flags_exit_2_with_the_message(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value or key stops before any work: exit code 2, the problem on stderr, no traceback."""
    from sentiment.cli import main

    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sweep"], "the following arguments are required: SWEEP.yaml"),
        (["sweep", "--dataset", "x", "s.yaml"], "give the sweep file first"),
        (["sweep", "s.yaml", "--count", "many"], "argument --count: invalid int value: 'many'"),
        (["report"], "the following arguments are required: SWEEP_DIR"),
        (["predict", "good"], "needs --model"),
        (["evaluate", "--model", "m", "--split", "dev"], "invalid choice: 'dev'"),
        (["evaluate", "--model", "m", "--hidden_dim=3"], "unknown config key 'hidden_dim'"),
        (["push", "runs/x"], "needs --repo_id"),
    ],
)
def test_command_usage_errors_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The commands' own parsers: a usage error is exit code 2 with the problem, no traceback."""
    from sentiment.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def run_config(output_dir: Path) -> dict:
    return yaml.safe_load((output_dir / "config.yaml").read_text())


def test_the_launchers_mixed_precision_applies_unless_the_config_sets_it(
    hub_imdb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION: a config without the key runs
    (and records) bf16; --mixed_precision=no, or the key in the config file, wins over the launcher."""
    from sentiment.cli import main

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    tiny = [*TINY, "--epochs=1", "--dataset", str(hub_imdb)]
    assert main(["train", *tiny, f"--output_dir={tmp_path / 'launcher'}"]) == 0
    assert run_config(tmp_path / "launcher")["mixed_precision"] == "bf16"
    assert main(["train", *tiny, "--mixed_precision=no", f"--output_dir={tmp_path / 'flag'}"]) == 0
    assert run_config(tmp_path / "flag")["mixed_precision"] == "no"
    config = tmp_path / "no.yaml"
    config.write_text("mixed_precision: no\n")
    assert main(["train", "--config", str(config), *tiny, f"--output_dir={tmp_path / 'file'}"]) == 0
    assert run_config(tmp_path / "file")["mixed_precision"] == "no"


def test_accelerate_launch_mixed_precision_reaches_the_trainer(hub_imdb: Path, tmp_path: Path) -> None:
    """`accelerate launch --mixed_precision bf16 scripts/train.py --config configs/bilstm.yaml` runs in bf16."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launcher += [str(REPO / "configs" / "accelerate" / "cpu.yaml"), "--mixed_precision", "bf16"]
    args = ["--config", str(REPO / "configs" / "bilstm.yaml"), "--dataset", str(hub_imdb), *TINY, "--epochs=1"]
    run([*launcher, str(REPO / "scripts" / "train.py"), *args, f"--output_dir={tmp_path / 'run'}"],
        env={"ACCELERATE_USE_CPU": "true"})  # fmt: skip
    assert run_config(tmp_path / "run")["mixed_precision"] == "bf16"


@pytest.mark.parametrize("name", ["cpu.yaml", "single_gpu.yaml", "multi_gpu.yaml", "multi_node.yaml"])
def test_accelerate_configs_load(name: str) -> None:
    """The shipped Accelerate configs are valid for Accelerate's own loader."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / name))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    expected = {"cpu.yaml": (1, 1), "single_gpu.yaml": (1, 1), "multi_gpu.yaml": (2, 1), "multi_node.yaml": (16, 2)}
    assert (config.num_processes, config.num_machines) == expected[name]
    assert config.use_cpu is (name == "cpu.yaml")
