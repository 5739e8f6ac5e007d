"""Damaged files met by the command line: a truncated split of a prepared folder, a truncated saved state on
--resume, a line of a --input file that is not JSON. Each stops with one `error:` line that names the file and the
way out, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--batch_size=8", "--eval_batch_size=16", "--hidden_dim=8", "--report_to=none", "--num_proc=1"]


def assert_one_error(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """The command failed with exit status 2 and a single `error:` line holding ``phrases``, and no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut ``path`` to the first ``keep`` of its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def prepared_run(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A prepared folder and a one-epoch run trained from it (best/ and state/), both made by the command line."""
    root = tmp_path_factory.mktemp("damaged")
    prepared, run = root / "prepared", root / "run"
    result = run_cli("prepare", "--dataset", str(hub_imdb), "--lowercase", f"--output_dir={prepared}", "--num_proc=1")
    assert result.returncode == 0, result.stderr
    result = run_cli("train", "--prepared", str(prepared), f"--output_dir={run}", "--epochs=1", *TINY)
    assert result.returncode == 0, result.stderr
    return prepared, run


def test_truncated_split_of_a_prepared_folder(prepared_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Training or evaluating with --prepared on a folder whose train.parquet was cut short names that file and
    the `sentiment prepare` command (with the folder's own data settings) that writes the folder again."""
    prepared, run = prepared_run
    damaged = tmp_path / "prepared"
    shutil.copytree(prepared, damaged)
    truncate(damaged / "train.parquet")
    result = run_cli("train", "--prepared", str(damaged), f"--output_dir={tmp_path / 'run'}", "--epochs=1", *TINY)
    message = assert_one_error(result, str(damaged / "train.parquet"), "damaged or incomplete", "sentiment prepare")
    assert f"--lowercase=true --output_dir {damaged}`" in message
    result = run_cli("evaluate", "--model", str(run / "best"), "--prepared", str(damaged), "--device", "cpu")
    assert_one_error(result, str(damaged / "train.parquet"), "sentiment prepare", f"--output_dir {damaged}")


def test_truncated_saved_state_on_resume(prepared_run: tuple[Path, Path], tmp_path: Path) -> None:
    """--resume on a run whose state/model.safetensors was cut short names that file, an intact copy of the state
    to resume from, and --overwrite to start over."""
    prepared, run = prepared_run
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    truncate(damaged / "state" / "model.safetensors")
    result = run_cli("train", "--prepared", str(prepared), f"--output_dir={damaged}", "--epochs=2", "--resume", *TINY)
    assert_one_error(
        result,
        str(damaged / "state" / "model.safetensors"),
        "damaged or incomplete",
        "intact copy",
        "--resume again",
        "--overwrite",
    )


def test_line_of_a_jsonl_input_that_is_not_json(prepared_run: tuple[Path, Path], tmp_path: Path) -> None:
    """`sentiment predict --input F.jsonl` with a line that is not JSON names the file and the line to fix."""
    _, run = prepared_run
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text('{"text": "A wonderful film."}\n\n{"text": "cut short\n{"text": "Dull."}\n')
    result = run_cli("predict", "--model", str(run / "best"), "--input", str(reviews), "--device", "cpu")
    assert_one_error(result, f"{reviews} line 3 is not JSON", f"fix line 3 of {reviews}", '"text"')
