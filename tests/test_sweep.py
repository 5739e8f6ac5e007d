"""Sweeps: W&B sweep files validated against the trainer's keys, expanded as ``wandb agent`` expands them, and run
offline with Optuna (grid, random, hyperband pruning, resuming, several workers) on the fixture data, with the
report (CSV, Markdown, plots, best checkpoint) and the ``sweep`` / ``report`` commands."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import run_cli

from sentiment.config import build_config, parse_command_line
from sentiment.sweep import SweepError, _sampler, _suggest, agent_command, load_sweep, run_sweep
from sentiment.sweep_report import write_report

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# `accelerate launch` on one CPU process, with every choice given so that no accelerate config file is read.
LAUNCH_CPU = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
LAUNCH_CPU += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


# ----------------------------------------------------------------------------------------------- helpers


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    """Write a sweep spec as YAML and return its path."""
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def base_spec(**changes: Any) -> dict[str, Any]:
    """A valid random-search spec over two parameters; ``changes`` replace top-level keys."""
    spec: dict[str, Any] = {
        "name": "spec",
        "method": "random",
        "metric": {"name": "valid_acc", "goal": "maximize"},
        "parameters": {"lr": {"values": [0.01, 0.03]}, "hidden_dim": {"values": [4, 8]}},
    }
    spec.update(changes)
    return spec


def trainer_args(dataset: Path, *more: str) -> list[str]:
    """Trainer overrides that make every trial train in about a second on the fixture data."""
    return ["--dataset", str(dataset), "--report_to=none", "--batch_size=8", "--num_proc=1", *more]


def sweep(sweep_file: Path, sweep_dir: Path, **kwargs: Any) -> Path:
    """``run_sweep``, then the environment as it was: the sweep sets variables in this process (WANDB_RUN_GROUP
    for its in-process worker, ...) that must not leak into other tests."""
    before = dict(os.environ)
    try:
        return run_sweep(sweep_file, sweep_dir=sweep_dir, **kwargs)
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)


def load_study(sweep_dir: Path) -> optuna.Study:
    """The study a sweep folder's sweep.json names."""
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    return optuna.load_study(study_name=manifest["name"], storage=manifest["storage"])


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of results.csv."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"parameters": {"hiden_dim": {"values": [4, 8]}}},
            r"'hiden_dim' is not a config key of the trainer",
        ),
        ({"method": "hyperopt"}, r"method must be one of \['grid', 'random', 'bayes'\] \(got 'hyperopt'\)"),
        (
            {"metric": {"name": "val_accuracy", "goal": "maximize"}},
            r"metric\.name must be one the trainer logs.*'val_accuracy'",
        ),
        ({"metric": {"name": "valid_acc", "goal": "up"}}, r"metric\.goal must be maximize or minimize \(got 'up'\)"),
        (
            {"parameters": {"lr": {"distribution": "normal", "mu": 0.01, "sigma": 0.001}}},
            r"parameter 'lr': distribution 'normal' is not supported offline",
        ),
        (
            {"parameters": {"lr": {"distribution": "gaussian_mixture", "min": 0.001, "max": 0.1}}},
            r"parameter 'lr': distribution 'gaussian_mixture' is not supported offline",
        ),
        (
            {"parameters": {"lr": {"distribution": "uniform", "min": 0.1, "max": 0.01}}},
            r"parameter 'lr': min \(0\.1\) must be below max \(0\.01\)",
        ),
        (
            {"parameters": {"hidden_dim": {"min": 16, "max": 16}}},
            r"parameter 'hidden_dim': min \(16\) must be below max \(16\)",
        ),
        (
            {"method": "grid", "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 0.1}}},
            r"grid search needs a finite set of values.*'lr'.*'log_uniform_values'",
        ),
        (
            {"parameters": {"lr": {"values": [0.01, 0.1], "probabilities": [0.5, 0.5]}}},
            r"parameter 'lr': 'probabilities' are not supported offline",
        ),
        (
            {"parameters": {"dropout": {"values": [0.25, 1.5]}}},
            r"(?s)parameter 'dropout': value 1\.5 is not valid for the trainer.*dropout must be in \[0, 1\)",
        ),
        (
            {"parameters": {"hidden_dim": {"values": [8, "wide"]}}},
            r"(?s)parameter 'hidden_dim': value 'wide' is not valid for the trainer.*must be an integer",
        ),
        (
            {"early_terminate": {"type": "envelope", "min_iter": 1}},
            r"early_terminate supports type: hyperband only",
        ),
        ({"early_terminate": {"type": "hyperband", "eta": 3}}, r"hyperband needs min_iter or max_iter"),
        ({"command": ["python", "${program}"]}, r"command must pass the parameters with \$\{args\}"),
        ({"parmeters": {"lr": {"value": 0.01}}}, r"unknown sweep keys \['parmeters'\]"),
    ],
    ids=[
        "unknown-parameter",
        "bad-method",
        "bad-metric",
        "bad-goal",
        "normal-distribution",
        "unknown-distribution",
        "min-above-max",
        "min-equals-max",
        "grid-continuous",
        "probabilities",
        "invalid-trainer-value",
        "wrong-type-value",
        "other-early-terminate",
        "hyperband-without-iterations",
        "command-without-args",
        "unknown-top-level-key",
    ],
)
def test_load_sweep_names_the_problem(changes: dict[str, Any], message: str, tmp_path: Path) -> None:
    """Each unusable spec is refused up front with a SweepError whose message names the culprit."""
    path = write_spec(tmp_path / "sweep.yaml", base_spec(**changes))
    with pytest.raises(SweepError, match=message):
        load_sweep(path)


def test_load_sweep_accepts_the_valid_base_spec(tmp_path: Path) -> None:
    """The spec the validation cases start from is itself valid (so each case fails for its own change)."""
    spec = load_sweep(write_spec(tmp_path / "sweep.yaml", base_spec()))
    assert (spec.method, spec.metric, spec.direction) == ("random", "valid_acc", "maximize")
    assert list(spec.parameters) == ["lr", "hidden_dim"]


def test_sweep_parameter_of_a_removed_key(tmp_path: Path) -> None:
    """A sweep parameter of a removed key (unfreeze_warmup) gets build_config's rule: only at its no-op value
    (0.0, dropped with a warning) does the sweep load; at any other value it is refused with the reason."""
    spec = load_sweep(write_spec(tmp_path / "ok.yaml", base_spec(parameters={"unfreeze_warmup": {"value": 0.0}})))
    assert list(spec.parameters) == ["unfreeze_warmup"]
    bad = write_spec(tmp_path / "bad.yaml", base_spec(parameters={"unfreeze_warmup": {"values": [0.0, 0.5]}}))
    with pytest.raises(SweepError, match=r"(?s)parameter 'unfreeze_warmup': value 0\.5 .*was removed"):
        load_sweep(bad)


def test_missing_and_non_mapping_sweep_files(tmp_path: Path) -> None:
    """A missing file and a YAML file that is not a mapping are SweepErrors, not tracebacks from yaml/open."""
    with pytest.raises(SweepError, match="sweep file not found"):
        load_sweep(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- method\n- random\n")
    with pytest.raises(SweepError, match="must hold a mapping"):
        load_sweep(tmp_path / "list.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("sweep_*.yaml")), ids=lambda path: path.stem)
def test_shipped_sweep_files_give_valid_trials(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each configs/sweep_*.yaml passes the sweep checks, names a program that exists, and every parameter set
    drawn from it, on top of its command's fixed arguments (a base config), is a valid training config."""
    monkeypatch.chdir(REPO)  # the commands name their base configs relative to the repository
    spec = load_sweep(path)
    assert spec.program is not None and (REPO / spec.program).is_file()
    base_config, overrides = parse_command_line(spec.base_arguments())
    study = optuna.create_study(direction=spec.direction, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        build_config(base_config, {**overrides, **_suggest(trial, spec)})
        study.tell(trial, 0.5)


# ----------------------------------------------------------------------------------------------- agent command


def expand_like_wandb_agent(raw: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The documented expansion of a sweep ``command``: ``${program}`` is the program, ``${args}`` one
    ``--key=value`` per parameter (Python's str of the value), in the parameters' order; other chunks stay."""
    expanded: list[str] = []
    for chunk in raw["command"]:
        if chunk == "${program}":
            expanded.append(raw["program"])
        elif chunk == "${args}":
            expanded += [f"--{key}={value}" for key, value in params.items()]
        else:
            expanded.append(str(chunk))
    return expanded


def test_agent_command_expands_like_wandb_agent() -> None:
    """The shipped BiLSTM sweep's command for one parameter set: the program in place of ${program}, the fixed
    --config argument kept, one --key=value per parameter in order (booleans as Python writes them)."""
    path = REPO / "configs" / "sweep_bilstm.yaml"
    params = {"hidden_dim": 75, "bidirectional": True, "lr": 0.005}
    command = agent_command(load_sweep(path), params)
    assert command == expand_like_wandb_agent(yaml.safe_load(path.read_text()), params)
    assert command == [
        "accelerate",
        "launch",
        "scripts/train.py",
        "--config",
        "configs/bilstm.yaml",
        "--hidden_dim=75",
        "--bidirectional=True",
        "--lr=0.005",
    ]


def test_agent_command_default_command_and_boolean_flags(tmp_path: Path) -> None:
    """Without ``command`` the agent runs ``/usr/bin/env python PROGRAM ${args}``; ``${args_no_boolean_flags}``
    turns true booleans into bare flags and drops false ones."""
    default = load_sweep(write_spec(tmp_path / "default.yaml", base_spec(program="train.py")))
    params = {"lr": 0.01, "hidden_dim": 8}
    assert agent_command(default, params) == ["/usr/bin/env", "python", "train.py", "--lr=0.01", "--hidden_dim=8"]
    flags = load_sweep(
        write_spec(
            tmp_path / "flags.yaml",
            base_spec(program="train.py", command=["python", "${program}", "${args_no_boolean_flags}"]),
        )
    )
    assert agent_command(flags, {"bidirectional": True, "lowercase": False, "lr": 0.01}) == [
        "python",
        "train.py",
        "--bidirectional",
        "--lr=0.01",
    ]


def test_agent_command_runs_the_trainer(hub_imdb: Path, tmp_path: Path) -> None:
    """The expanded command, run as the agent would (``accelerate launch`` on one CPU process), trains one run
    whose resolved config holds the swept values and the command's fixed arguments."""
    output_dir = tmp_path / "agent-run"
    fixed = ["--dataset", str(hub_imdb), "--report_to=none", "--epochs=1", "--batch_size=8", "--num_proc=1"]
    spec_path = write_spec(
        tmp_path / "agent.yaml",
        base_spec(
            program=str(REPO / "scripts" / "train.py"),
            parameters={"hidden_dim": {"values": [6, 10]}, "bidirectional": {"values": [True, False]}},
            command=["accelerate", "launch", "${program}", *fixed, f"--output_dir={output_dir}", "${args}"],
        ),
    )
    params = {"hidden_dim": 6, "bidirectional": True, "lr": 0.02}
    command = agent_command(load_sweep(spec_path), params)
    assert command[:2] == ["accelerate", "launch"]
    assert command[-3:] == ["--hidden_dim=6", "--bidirectional=True", "--lr=0.02"]
    result = subprocess.run(
        [*LAUNCH_CPU, *command[2:]],
        cwd=REPO,
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert len(metrics["history"]) == 1
    resolved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert (resolved["hidden_dim"], resolved["bidirectional"], resolved["lr"]) == (6, True, 0.02)
    assert (resolved["epochs"], resolved["batch_size"], resolved["dataset"]) == (1, 8, str(hub_imdb))


# ----------------------------------------------------------------------------------------------- distributions

DISTRIBUTION_SPEC: dict[str, dict[str, Any]] = {
    "hidden_dim": {"distribution": "int_uniform", "min": 4, "max": 64},
    "n_layers": {"min": 1, "max": 3},  # W&B infers int_uniform from integer bounds
    "valid_fraction": {"distribution": "uniform", "min": 0.05, "max": 0.5},
    "dropout": {"distribution": "q_uniform", "min": 0.0, "max": 0.6, "q": 0.1},
    "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
    "batch_size": {"distribution": "q_log_uniform_values", "min": 8, "max": 256, "q": 8},
    "max_grad_norm": {"distribution": "inv_log_uniform_values", "min": 0.1, "max": 10.0},
    "eval_batch_size": {"values": [16, 32, 64]},
    "bidirectional": {"values": [True, False]},
    "epochs": {"value": 3},
}


def draw(spec_path: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` parameter sets drawn by ``_suggest`` on trials of an in-memory study with a seeded RandomSampler."""
    spec = load_sweep(spec_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    draws = []
    for _ in range(n):
        trial = study.ask()
        draws.append(_suggest(trial, spec))
        study.tell(trial, 0.0)
    return draws


def in_range(value: float, low: float, high: float) -> bool:
    """``low <= value <= high`` up to float rounding (a relative 1e-12)."""
    return low * (1 - 1e-12) - 1e-15 <= value <= high * (1 + 1e-12) + 1e-15


def is_multiple(value: float, q: float) -> bool:
    """``value`` is a whole multiple of ``q`` up to float rounding."""
    return math.isclose(value / q, round(value / q), abs_tol=1e-9)


def test_random_draws_respect_the_distributions(tmp_path: Path) -> None:
    """Over 200 draws: every value in its range or set, q steps kept, integer parameters integers, log-scaled
    parameters spread over the decades, and every drawn set accepted by the trainer's config."""
    path = write_spec(tmp_path / "dists.yaml", base_spec(parameters=DISTRIBUTION_SPEC))
    draws = draw(path, 200)
    by_name = {name: [d[name] for d in draws] for name in DISTRIBUTION_SPEC}

    for name in ("hidden_dim", "n_layers"):
        low, high = DISTRIBUTION_SPEC[name]["min"], DISTRIBUTION_SPEC[name]["max"]
        assert all(type(v) is int and low <= v <= high for v in by_name[name]), name
    assert set(by_name["n_layers"]) == {1, 2, 3}
    assert min(by_name["hidden_dim"]) < 12 and max(by_name["hidden_dim"]) > 56  # both ends reached

    assert all(in_range(v, 0.05, 0.5) for v in by_name["valid_fraction"])
    assert len(set(by_name["valid_fraction"])) > 190  # continuous

    dropout = by_name["dropout"]
    assert all(in_range(v, 0.0, 0.6) and is_multiple(v, 0.1) for v in dropout)
    assert {round(v, 6) for v in dropout} == {round(0.1 * i, 6) for i in range(7)}

    batch = by_name["batch_size"]
    assert all(in_range(v, 8, 256) and is_multiple(v, 8) for v in batch)

    for name in ("lr", "max_grad_norm"):
        low, high = DISTRIBUTION_SPEC[name]["min"], DISTRIBUTION_SPEC[name]["max"]
        values = by_name[name]
        assert all(in_range(v, low, high) for v in values), name
        # log-uniform: about half below the geometric mean (a uniform draw would put ~3% / ~1% there) ...
        below = sum(v < math.sqrt(low * high) for v in values) / len(values)
        assert 0.35 < below < 0.65, (name, below)
        # ... and every decade of the range drawn from
        decades = {math.floor(math.log10(v / low)) for v in values if v < high}
        assert decades == set(range(round(math.log10(high / low)))), (name, decades)

    assert set(by_name["eval_batch_size"]) == {16, 32, 64}
    assert set(by_name["bidirectional"]) == {True, False}
    assert set(by_name["epochs"]) == {3}

    for params in draws:  # no drawn set would make a trial fail
        cfg = build_config(None, params)
        assert cfg.batch_size == round(params["batch_size"])


def test_random_draws_follow_the_seed(tmp_path: Path) -> None:
    """The same sampler seed draws the same parameter sets; another seed draws others."""
    path = write_spec(tmp_path / "dists.yaml", base_spec(parameters=DISTRIBUTION_SPEC))
    assert draw(path, 5, seed=1) == draw(path, 5, seed=1)
    assert draw(path, 5, seed=1) != draw(path, 5, seed=2)


def test_log_uniform_uses_natural_log_bounds(tmp_path: Path) -> None:
    """W&B's ``log_uniform`` takes natural-log bounds: min ln(1e-4), max ln(0.1) draws lr in [1e-4, 0.1].

    The bounds are exponents, not values of the parameter, so a negative min must not be refused as an invalid
    learning rate."""
    low, high = math.log(1e-4), math.log(1e-1)
    path = write_spec(
        tmp_path / "log.yaml",
        base_spec(parameters={"lr": {"distribution": "log_uniform", "min": low, "max": high}}),
    )
    values = [d["lr"] for d in draw(path, 100)]
    assert all(in_range(v, 1e-4, 1e-1) for v in values)
    assert 0.3 < sum(v < math.sqrt(1e-4 * 1e-1) for v in values) / len(values) < 0.7


# ----------------------------------------------------------------------------------------------- grid and report

GRID = {"hidden_dim": [4, 8, 16], "lr": [0.0001, 0.01, 0.03]}


@pytest.fixture(scope="module")
def grid_sweep(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3x3 grid sweep (3 epochs each, BiLSTM, 30% validation so the accuracies differ)."""
    root = tmp_path_factory.mktemp("grid")
    spec = base_spec(
        name="grid",
        method="grid",
        parameters={**{k: {"values": v} for k, v in GRID.items()}, "epochs": {"value": 3}},
    )
    extra = trainer_args(hub_imdb, "--bidirectional", "--dropout=0.1", "--valid_fraction=0.3")
    return sweep(write_spec(root / "grid.yaml", spec), root / "sweep", extra_args=extra)


def test_grid_runs_every_point_exactly_once(grid_sweep: Path) -> None:
    """Without --count a grid runs its size: each of the 9 points once, each trial trained with its point, the
    constant and the extra trainer arguments; the trial's value is its run's valid_acc."""
    study = load_study(grid_sweep)
    trials = study.get_trials()
    assert len(trials) == 9
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    points = sorted((t.user_attrs["params"]["hidden_dim"], t.user_attrs["params"]["lr"]) for t in trials)
    assert points == sorted(itertools.product(GRID["hidden_dim"], GRID["lr"]))
    for t in trials:
        params = t.user_attrs["params"]
        assert params["epochs"] == 3
        resolved = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())
        assert (resolved["hidden_dim"], resolved["lr"], resolved["epochs"]) == (
            params["hidden_dim"],
            params["lr"],
            3,
        )
        assert resolved["bidirectional"] is True  # the extra arguments reach every trial
        metrics = json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())
        assert t.value == metrics["valid_acc"]


def test_report_table_plots_and_best_checkpoint(grid_sweep: Path) -> None:
    """results.csv / results.md sorted by valid_acc (best first, marked), the best/ link and best.json on the
    best trial, both plots as PNG; `sentiment report` regenerates them all identically."""
    study = load_study(grid_sweep)
    by_number = {t.number: t for t in study.get_trials()}
    rows = read_csv(grid_sweep / "results.csv")
    assert len(rows) == 9
    assert sorted(int(r["trial"]) for r in rows) == sorted(by_number)
    accuracies = [float(r["valid_acc"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[0] == max(t.value for t in by_number.values())
    assert len(set(accuracies)) > 1  # the fixture sweep really orders something
    for row in rows:
        trial = by_number[int(row["trial"])]
        assert float(row["valid_acc"]) == trial.value
        assert (int(row["hidden_dim"]), float(row["lr"])) == (trial.params["hidden_dim"], trial.params["lr"])
        assert row["state"] == "COMPLETE" and row["epochs_run"] == "3"

    best = int(rows[0]["trial"])
    best_run = Path(by_number[best].user_attrs["run_dir"])
    markdown = (grid_sweep / "results.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| trial | state | hidden_dim | lr | epochs |")
    assert table[1].startswith(f"| **{best} (best)** |")
    assert markdown.count("(best)") == 1
    assert [line.split("|")[1].strip() for line in table[2:]] == [r["trial"] for r in rows[1:]]

    link = grid_sweep / "best"
    assert link.is_symlink()
    assert link.resolve() == (best_run / "best").resolve()
    assert (link / "model.safetensors").is_file()
    assert json.loads((grid_sweep / "best.json").read_text())["trial"] == best
    for name in ("parallel_coordinates.png", "metric_vs_parameters.png"):
        assert (grid_sweep / name).read_bytes()[:8] == PNG_MAGIC

    generated = {name: (grid_sweep / name).read_text() for name in ("results.csv", "results.md")}
    for name in ("results.csv", "results.md", "parallel_coordinates.png", "metric_vs_parameters.png"):
        (grid_sweep / name).unlink()
    result = run_cli("report", str(grid_sweep))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"| **{best} (best)** |" in result.stdout
    for name, text in generated.items():
        assert (grid_sweep / name).read_text() == text, name
    for name in ("parallel_coordinates.png", "metric_vs_parameters.png"):
        assert (grid_sweep / name).read_bytes()[:8] == PNG_MAGIC
    assert (grid_sweep / "best").resolve() == (best_run / "best").resolve()


def test_report_from_another_directory_links_the_best_checkpoint(
    hub_imdb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep run with a relative sweep folder (the default, sweeps/NAME) and reported on from elsewhere (e.g.
    `sentiment report /abs/path/sweeps/NAME`) still links best/ to the best trial's checkpoint."""
    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path / "rel.yaml", base_spec(name="rel", parameters={"epochs": {"value": 1}}))
    sweep(path, Path("sweeps") / "rel", count=1, extra_args=trainer_args(hub_imdb, "--hidden_dim=6"))
    sweep_dir = tmp_path / "sweeps" / "rel"
    assert (sweep_dir / "best" / "model.safetensors").is_file()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    write_report(sweep_dir)
    assert (sweep_dir / "best").resolve() == sweep_dir / "trials" / "trial-0000" / "best"
    assert (sweep_dir / "best" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------- hyperband

HYPERBAND_EPOCHS = 4
GOOD_LR, BAD_LR = 0.03, 1e-6


@pytest.fixture(scope="module")
def hyperband_sweep(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 random trials (sampler seed 0) of a good and a useless learning rate (1e-6 never moves the validation
    loss), 4 epochs, hyperband from epoch 1 with eta 2, selecting on valid_loss (no ties between good and bad).

    Optuna puts trial N in a bracket by a hash of "<study name>_N": the name "hb" and the seed fix which trials
    compete where, so the outcome is deterministic (trials 6, 7, 9, 11 stop after 1-2 epochs)."""
    root = tmp_path_factory.mktemp("hyperband")
    spec = base_spec(
        name="hb",
        metric={"name": "valid_loss", "goal": "minimize"},
        parameters={"lr": {"values": [GOOD_LR, BAD_LR]}, "epochs": {"value": HYPERBAND_EPOCHS}},
        early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2},
    )
    extra = trainer_args(hub_imdb, "--bidirectional", "--dropout=0.1", "--hidden_dim=8")
    return sweep(write_spec(root / "hyperband.yaml", spec), root / "sweep", count=12, extra_args=extra, seed=0)


def epochs_run(trial: optuna.trial.FrozenTrial) -> int:
    """Epochs the trial's run folder saved state for."""
    state = Path(trial.user_attrs["run_dir"]) / "state" / "trainer_state.json"
    return json.loads(state.read_text())["epoch"]


def test_hyperband_prunes_bad_trials_early(hyperband_sweep: Path) -> None:
    """Trials of the useless learning rate are pruned (some after fewer epochs than configured, their run
    folders stopping there), the good ones complete, and results.csv lists the pruned ones as PRUNED, last."""
    study = load_study(hyperband_sweep)
    trials = study.get_trials()
    assert len(trials) == 12
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(pruned) + len(complete) == 12
    # The good trials are identical runs (same lr, same seed): they tie and are always promoted.
    assert pruned and all(t.params["lr"] == BAD_LR for t in pruned)
    stopped_early = [t for t in pruned if epochs_run(t) < HYPERBAND_EPOCHS]
    assert stopped_early
    for t in pruned:
        assert epochs_run(t) == len(t.user_attrs["history"]) == max(t.intermediate_values)
        assert not (Path(t.user_attrs["run_dir"]) / "metrics.json").exists()
    for t in complete:
        assert epochs_run(t) == HYPERBAND_EPOCHS
    assert study.best_trial.params["lr"] == GOOD_LR

    rows = {int(r["trial"]): r for r in read_csv(hyperband_sweep / "results.csv")}
    for t in stopped_early:
        assert rows[t.number]["state"] == "PRUNED"
        assert int(rows[t.number]["epochs_run"]) == epochs_run(t)
    # Pruned trials come after every complete one; the best row is a complete good trial.
    states = [r["state"] for r in read_csv(hyperband_sweep / "results.csv")]
    assert states == sorted(states, key=lambda s: s != "COMPLETE")
    assert json.loads((hyperband_sweep / "best.json").read_text())["lr"] == GOOD_LR


def test_hyperband_never_prunes_a_trial_that_trained_every_epoch(hyperband_sweep: Path) -> None:
    """Pruning saves the epochs a trial has not run yet; a trial that already ran all its epochs has nothing left
    to save and should stay COMPLETE with its test figures, not be discarded as PRUNED."""
    study = load_study(hyperband_sweep)
    finished_but_pruned = [
        t.number
        for t in study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
        if epochs_run(t) == HYPERBAND_EPOCHS
    ]
    assert finished_but_pruned == []


# ----------------------------------------------------------------------------------------------- resuming

RESUME_PARAMETERS = {
    "lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 3e-2},
    "dropout": {"distribution": "uniform", "min": 0.0, "max": 0.5},
    "epochs": {"value": 1},
}


@pytest.fixture(scope="module")
def resumed_sweep(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """A random sweep stopped after 2 trials (snapshot of them), then continued to 5 with the same file/folder."""
    root = tmp_path_factory.mktemp("resume")
    path = write_spec(root / "resume.yaml", base_spec(name="resume", parameters=RESUME_PARAMETERS))
    extra = trainer_args(hub_imdb, "--hidden_dim=8")
    sweep(path, root / "sweep", count=2, extra_args=extra)
    first = [
        {"number": t.number, "params": t.params, "value": t.value, "run_dir": t.user_attrs["run_dir"]}
        for t in load_study(root / "sweep").get_trials()
    ]
    for snapshot in first:
        snapshot["mtime"] = (Path(snapshot["run_dir"]) / "metrics.json").stat().st_mtime_ns
    sweep(path, root / "sweep", count=5, extra_args=extra)
    return first, root / "sweep"


def test_resuming_runs_only_what_is_left(resumed_sweep: tuple[list[dict[str, Any]], Path]) -> None:
    """--count 5 on a study holding 2 trials adds 3: trials 0-1 keep their parameters, values and run folders."""
    first, sweep_dir = resumed_sweep
    assert [s["number"] for s in first] == [0, 1]
    trials = load_study(sweep_dir).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for snapshot, trial in zip(first, trials[:2], strict=False):
        assert (trial.params, trial.value) == (snapshot["params"], snapshot["value"])
        assert (Path(snapshot["run_dir"]) / "metrics.json").stat().st_mtime_ns == snapshot["mtime"]  # not re-run
    run_dirs = {t.user_attrs["run_dir"] for t in trials}
    assert len(run_dirs) == 5 and all((Path(d) / "metrics.json").is_file() for d in run_dirs)
    assert len(read_csv(sweep_dir / "results.csv")) == 5


def test_resumed_random_sweep_draws_new_points(resumed_sweep: tuple[list[dict[str, Any]], Path]) -> None:
    """The continued sweep samples points it has not tried yet: with continuous distributions, a repeat of an
    earlier trial's exact parameters means the sampler restarted its random stream (same seed) on resuming."""
    first, sweep_dir = resumed_sweep
    earlier = [s["params"] for s in first]
    new = [t.params for t in load_study(sweep_dir).get_trials()[2:]]
    assert [p for p in new if p in earlier] == []


def test_stop_after_starts_no_trial_past_the_deadline(hub_imdb: Path, tmp_path: Path) -> None:
    """--stop_after: a sweep continued with 0 seconds left starts nothing (the study keeps its one trial and the
    report is still written); with time left it runs on to --count; a negative value is refused."""
    path = write_spec(tmp_path / "deadline.yaml", base_spec(name="deadline", parameters=RESUME_PARAMETERS))
    extra = trainer_args(hub_imdb, "--hidden_dim=8")
    sweep(path, tmp_path / "sweep", count=1, extra_args=extra)
    sweep(path, tmp_path / "sweep", count=3, extra_args=extra, stop_after=0)
    assert len(load_study(tmp_path / "sweep").get_trials()) == 1
    assert len(read_csv(tmp_path / "sweep" / "results.csv")) == 1
    sweep(path, tmp_path / "sweep", count=3, extra_args=extra, stop_after=3600)
    trials = load_study(tmp_path / "sweep").get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    with pytest.raises(SweepError, match="stop_after"):
        sweep(path, tmp_path / "sweep", count=4, extra_args=extra, stop_after=-1)


# ----------------------------------------------------------------------------------------------- workers


def test_two_workers_share_one_study(hub_imdb: Path, tmp_path: Path) -> None:
    """Two spawned worker processes fill one SQLite study: 4 trials, each run once, in its own folder."""
    path = write_spec(
        tmp_path / "workers.yaml",
        base_spec(name="workers", parameters={**RESUME_PARAMETERS, "hidden_dim": {"values": [4, 8]}}),
    )
    sweep_dir = sweep(path, tmp_path / "sweep", count=4, workers=2, extra_args=trainer_args(hub_imdb))
    trials = load_study(sweep_dir).get_trials()
    assert len(trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    run_dirs = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert len(set(run_dirs)) == 4
    for t, run_dir in zip(trials, run_dirs, strict=True):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert t.value == metrics["valid_acc"]
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["hidden_dim"] == t.params["hidden_dim"]
    # The two workers draw from different random streams: no parameter set is drawn twice.
    assert len({(t.params["lr"], t.params["dropout"]) for t in trials}) == 4
    assert len(read_csv(sweep_dir / "results.csv")) == 4


def test_failing_trials_do_not_loop_forever(tmp_path: Path) -> None:
    """A trainer error in every trial (here a dataset folder that does not exist) ends the sweep; it must not
    start failing trials without end."""
    path = write_spec(tmp_path / "fail.yaml", base_spec(name="fail"))
    sweep_dir = tmp_path / "sweep"
    code = "import sys; from sentiment.sweep import run_sweep; "
    code += "run_sweep(sys.argv[1], count=2, sweep_dir=sys.argv[2], extra_args=sys.argv[3:])"
    command = [sys.executable, "-c", code, str(path), str(sweep_dir)]
    command += ["--dataset", str(tmp_path / "no-such-dataset"), "--report_to=none", "--num_proc=1"]
    limit = 20  # trials: ten times what the sweep asked for
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            n_trials = 0
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
                if (sweep_dir / "sweep.json").is_file():
                    n_trials = len(load_study(sweep_dir).get_trials(deepcopy=False))
                    if n_trials > limit:
                        break
        finally:
            running = process.poll() is None
            if running:
                process.kill()
                process.wait()
    assert not running, f"the sweep still runs after {n_trials} failed trials (asked for 2)"
    assert "does not exist" in (tmp_path / "log.txt").read_text()
    assert len(load_study(sweep_dir).get_trials()) <= limit


# ----------------------------------------------------------------------------------------------- command line


def test_cli_sweep_runs_and_prints_the_table(hub_imdb: Path, tmp_path: Path) -> None:
    """`sentiment sweep FILE --count 1 --sweep_dir DIR --stop_after S --key=value ...` trains one trial with the
    overrides and prints results.md."""
    path = write_spec(tmp_path / "cli.yaml", base_spec(name="cli", parameters={"hidden_dim": {"values": [6]}}))
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "sweep",
        str(path),
        "--count",
        "1",
        "--sweep_dir",
        str(sweep_dir),
        "--stop_after",
        "3600",
        *trainer_args(hub_imdb, "--epochs=1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| trial | state | hidden_dim |" in result.stdout
    assert "| **0 (best)** | COMPLETE | 6 |" in result.stdout
    assert result.stdout.strip() == (sweep_dir / "results.md").read_text().strip()
    (trial,) = load_study(sweep_dir).get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE
    resolved = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / "config.yaml").read_text())
    assert (resolved["hidden_dim"], resolved["epochs"], resolved["batch_size"]) == (6, 1, 8)


def test_cli_bad_sweep_file_exits_2_with_the_message(tmp_path: Path) -> None:
    """A bad sweep file: exit code 2, the SweepError's message on stderr, no traceback, nothing created."""
    path = write_spec(tmp_path / "bad.yaml", base_spec(method="hyperopt"))
    result = run_cli("sweep", str(path), "--count", "1", "--sweep_dir", str(tmp_path / "sweep"))
    assert result.returncode == 2
    assert "method must be one of" in result.stderr and "'hyperopt'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_cli_report_on_a_folder_without_a_sweep_exits_2(tmp_path: Path) -> None:
    """`sentiment report` on a folder that holds no sweep says so (its own message) without a traceback."""
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2
    assert "is not a sweep folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_bayes_sweep_logs_each_trial_as_a_wandb_run_in_the_sweep_group(
    hub_imdb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """method: bayes runs through TPE; each trial writes its own offline wandb run, grouped under the sweep."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = base_spec(name="bayes-group", method="bayes", parameters={"lr": {"min": 0.003, "max": 0.03}})
    sweep_dir = sweep(
        write_spec(tmp_path / "bayes.yaml", spec),
        tmp_path / "bayes",
        count=2,
        extra_args=[*trainer_args(hub_imdb, "--epochs=1", "--hidden_dim=4"), "--report_to=wandb"],
    )
    assert isinstance(_sampler(load_sweep(tmp_path / "bayes.yaml"), 0), optuna.samplers.TPESampler)
    study = load_study(sweep_dir)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2
    assert all(0.003 <= t.params["lr"] <= 0.03 for t in trials)
    assert "WANDB_RUN_GROUP" not in os.environ or os.environ["WANDB_RUN_GROUP"] != "bayes-group"
    for trial in trials:
        runs = list((Path(trial.user_attrs["run_dir"]) / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        record = next(runs[0].glob("*.wandb")).read_bytes()
        assert b"bayes-group" in record  # the run's group
        assert f"bayes-group-{trial.number:04d}".encode() in record  # the run's name
