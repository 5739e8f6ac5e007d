"""Hyperparameter sweeps from W&B sweep files: online through ``wandb sweep`` / ``wandb agent``, offline through
Optuna with the same YAML.

``load_sweep`` validates a W&B sweep spec against the trainer's config keys. ``run_sweep`` maps it onto an Optuna
study (grid -> GridSampler, random -> RandomSampler, bayes -> TPESampler, ``early_terminate: hyperband`` ->
HyperbandPruner fed each epoch's validation metric) stored in a database (SQLite by default), so a stopped sweep
continues where it was and several worker processes share it. Each trial is a full ``train`` run with its own run
folder and wandb run (grouped under the sweep's name). ``agent_command`` expands a spec's ``command`` exactly as
``wandb agent`` does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sentiment.config import REMOVED_KEYS, ConfigError, TrainConfig, build_config, config_keys, parse_command_line
from sentiment.sweep_report import SweepError, write_report

logger = logging.getLogger(__name__)

METHODS = ("grid", "random", "bayes")
TOP_LEVEL_KEYS = {
    "program",
    "method",
    "metric",
    "parameters",
    "early_terminate",
    "command",
    "name",
    "description",
    "project",
    "entity",
    "run_cap",
}
# W&B distributions that map onto Optuna's; the rest (normal, log_normal, beta, ...) are refused by name.
DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
    "inv_log_uniform_values",
)
METRICS = ("valid_acc", "valid_loss", "train_acc", "train_loss", "test_acc", "test_loss")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
MAX_CONSECUTIVE_FAILURES = 3
_INT_KEYS = {
    name: typing.get_args(hint) in ((int, type(None)),) or hint is int
    for name, hint in typing.get_type_hints(TrainConfig).items()
}


@dataclass
class SweepSpec:
    """A validated W&B sweep spec."""

    name: str
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict[str, Any]]
    program: str | None = None
    command: list[str] = field(default_factory=lambda: list(DEFAULT_COMMAND))
    early_terminate: dict[str, Any] | None = None
    run_cap: int | None = None

    @property
    def direction(self) -> str:
        """Optuna's direction for the metric's goal."""
        return "maximize" if self.goal == "maximize" else "minimize"

    def grid(self) -> dict[str, list[Any]]:
        """The grid's values per parameter (grid method only)."""
        return {name: _grid_values(name, p) for name, p in self.parameters.items()}

    def grid_size(self) -> int:
        """How many points the grid has."""
        return math.prod(len(v) for v in self.grid().values())

    def base_arguments(self) -> list[str]:
        """The fixed trainer arguments in ``command`` (e.g. ``--config configs/bilstm.yaml``), macros removed."""
        after_program = False
        arguments = []
        for chunk in self.command:
            if chunk == "${program}":
                after_program = True
            elif after_program and not (str(chunk).startswith("${") and str(chunk).endswith("}")):
                arguments.append(str(chunk))
        return arguments


def _distribution(name: str, spec: dict[str, Any]) -> str:
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "distribution" in spec:
        return spec["distribution"]
    if "min" in spec and "max" in spec:  # W&B infers int_uniform for integer bounds, uniform otherwise
        is_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if is_int else "uniform"
    raise SweepError(
        f"parameter '{name}' needs 'value', 'values', or a distribution with min/max (got keys {sorted(spec)})"
    )


def _grid_values(name: str, spec: dict[str, Any]) -> list[Any]:
    kind = _distribution(name, spec)
    if kind == "constant":
        return [spec["value"]]
    if kind == "categorical":
        return list(spec["values"])
    if kind == "int_uniform":
        return list(range(int(spec["min"]), int(spec["max"]) + 1))
    if kind == "q_uniform":
        q = spec.get("q", 1)
        steps = round((spec["max"] - spec["min"]) / q)
        return [spec["min"] + i * q for i in range(steps + 1)]
    raise SweepError(
        f"grid search needs a finite set of values: parameter '{name}' has distribution '{kind}'. Give it "
        "'values', or use method: random or bayes"
    )


def _validate_parameter(name: str, spec: Any) -> None:
    if name not in config_keys() and name not in REMOVED_KEYS:  # a removed key's values: build_config below
        raise SweepError(
            f"sweep parameter '{name}' is not a config key of the trainer. Valid keys: {', '.join(config_keys())}"
        )
    if not isinstance(spec, dict):
        raise SweepError(f"parameter '{name}' must be a mapping (value / values / distribution), not {spec!r}")
    kind = _distribution(name, spec)
    if kind not in DISTRIBUTIONS:
        raise SweepError(
            f"parameter '{name}': distribution '{kind}' is not supported offline; use one of {', '.join(DISTRIBUTIONS)}"
        )
    if kind == "categorical":
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise SweepError(f"parameter '{name}': 'values' must be a non-empty list")
        if "probabilities" in spec:
            raise SweepError(f"parameter '{name}': 'probabilities' are not supported offline; drop them")
    if kind not in ("constant", "categorical"):
        for bound in ("min", "max"):
            if not isinstance(spec.get(bound), (int, float)) or isinstance(spec.get(bound), bool):
                raise SweepError(f"parameter '{name}': distribution '{kind}' needs a numeric '{bound}'")
        if spec["min"] >= spec["max"]:
            raise SweepError(f"parameter '{name}': min ({spec['min']}) must be below max ({spec['max']})")
        if kind.endswith("_values") and spec["min"] <= 0:
            raise SweepError(f"parameter '{name}': {kind} needs min > 0 (got {spec['min']})")
    # Every value must be one the trainer accepts (type and range), checked now rather than mid-sweep.
    probes = spec["values"] if kind == "categorical" else [spec.get("value", spec.get("min")), spec.get("max")]
    if kind == "log_uniform":  # W&B's min/max are natural-log bounds here
        probes = [math.exp(spec["min"]), math.exp(spec["max"])]
    for value in [v for v in probes if v is not None]:
        try:
            build_config(None, {name: value})
        except ConfigError as err:
            raise SweepError(f"parameter '{name}': value {value!r} is not valid for the trainer: {err}") from None


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a W&B sweep YAML file."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"sweep file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {path} must hold a mapping")
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown sweep keys {unknown}; a W&B sweep file has {sorted(TOP_LEVEL_KEYS)}")
    method = raw.get("method")
    if method not in METHODS:
        raise SweepError(f"{path}: method must be one of {list(METHODS)} (got {method!r})")
    metric = raw.get("metric") or {}
    if metric.get("name") not in METRICS:
        raise SweepError(
            f"{path}: metric.name must be one the trainer logs: {list(METRICS)} (got {metric.get('name')!r})"
        )
    goal = metric.get("goal", "minimize")
    if goal not in ("maximize", "minimize"):
        raise SweepError(f"{path}: metric.goal must be maximize or minimize (got {goal!r})")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SweepError(f"{path}: 'parameters' must map config keys to their search spaces")
    for name, spec in parameters.items():
        _validate_parameter(name, spec)
    early = raw.get("early_terminate")
    if early is not None:
        if not isinstance(early, dict) or early.get("type") != "hyperband":
            raise SweepError(f"{path}: early_terminate supports type: hyperband only (got {early!r})")
        if "min_iter" not in early and "max_iter" not in early:
            raise SweepError(f"{path}: early_terminate: hyperband needs min_iter or max_iter (epochs)")
        if "s" in early and "max_iter" not in early:
            raise SweepError(f"{path}: early_terminate: 's' goes with max_iter")
    command = raw.get("command") or list(DEFAULT_COMMAND)
    if "${args}" not in command and "${args_no_boolean_flags}" not in command:
        raise SweepError(f"{path}: command must pass the parameters with ${{args}} (the --key=value form)")
    spec = SweepSpec(
        name=str(raw.get("name") or path.stem),
        method=method,
        metric=metric["name"],
        goal=goal,
        parameters=parameters,
        program=raw.get("program"),
        command=[str(c) for c in command],
        early_terminate=early,
        run_cap=raw.get("run_cap"),
    )
    if method == "grid":
        spec.grid()  # raises for continuous distributions
    return spec


def agent_command(spec: SweepSpec, params: dict[str, Any]) -> list[str]:
    """The command ``wandb agent`` runs for one set of parameter values: wandb's own macro expansion
    (``create_sweep_command`` / ``create_sweep_command_args``) and the agent's list substitution."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(spec.command))
    sweep_vars: dict[str, Any] = sweep_utils.create_sweep_command_args(
        {"args": {key: {"value": value} for key, value in params.items()}}
    )
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [spec.program]
    sweep_vars["env"] = ["/usr/bin/env"]
    expanded: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            expanded += sweep_vars.get(chunk[2:-1]) or []
        else:
            expanded.append(chunk)
    return expanded


# ----------------------------------------------------------------------------------------------- Optuna


def _suggest(trial: Any, spec: SweepSpec) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, p in spec.parameters.items():
        kind = _distribution(name, p)
        if kind == "constant":
            params[name] = p["value"]
        elif kind == "categorical" or spec.method == "grid":
            values = p["values"] if kind == "categorical" else _grid_values(name, p)
            params[name] = trial.suggest_categorical(name, values)
        elif kind == "int_uniform":
            params[name] = trial.suggest_int(name, int(p["min"]), int(p["max"]))
        elif kind == "uniform":
            params[name] = trial.suggest_float(name, float(p["min"]), float(p["max"]))
        elif kind == "q_uniform":
            params[name] = trial.suggest_float(name, float(p["min"]), float(p["max"]), step=float(p.get("q", 1)))
        elif kind == "log_uniform":  # W&B: min/max are natural-log bounds
            params[name] = trial.suggest_float(name, math.exp(p["min"]), math.exp(p["max"]), log=True)
        elif kind == "log_uniform_values":
            params[name] = trial.suggest_float(name, float(p["min"]), float(p["max"]), log=True)
        elif kind == "q_log_uniform_values":
            q = float(p.get("q", 1))
            raw = trial.suggest_float(name, float(p["min"]), float(p["max"]), log=True)
            params[name] = round(raw / q) * q
        elif kind == "inv_log_uniform_values":
            inverse = trial.suggest_float(f"1/{name}", 1 / float(p["max"]), 1 / float(p["min"]), log=True)
            params[name] = 1 / inverse
        if _INT_KEYS.get(name) and isinstance(params[name], float):  # e.g. q_log_uniform_values for batch_size
            params[name] = round(params[name])
    return params


def _sampler(spec: SweepSpec, seed: int | None) -> Any:
    import optuna

    if spec.method == "grid":
        grid = {
            name: values
            for name, values in spec.grid().items()
            if len(values) > 1 or _distribution(name, spec.parameters[name]) != "constant"
        }
        return optuna.samplers.GridSampler(grid, seed=seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(spec: SweepSpec) -> Any:
    import optuna

    early = spec.early_terminate
    if early is None:
        return optuna.pruners.NopPruner()
    eta = int(early.get("eta", 3))
    if "max_iter" in early:
        max_iter = int(early["max_iter"])
        brackets = int(early.get("s", 2))
        min_iter = int(early.get("min_iter", max(1, max_iter // eta**brackets)))
        return optuna.pruners.HyperbandPruner(min_resource=min_iter, max_resource=max_iter, reduction_factor=eta)
    return optuna.pruners.HyperbandPruner(
        min_resource=int(early["min_iter"]), max_resource="auto", reduction_factor=eta
    )


def default_storage(sweep_dir: Path) -> str:
    """SQLite in the sweep folder."""
    return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def _open_study(spec: SweepSpec, storage: str, seed: int | None) -> Any:
    import optuna

    rdb = optuna.storages.RDBStorage(
        storage,
        heartbeat_interval=30,  # a trial whose worker died is marked FAIL after the grace period, and replaced
        grace_period=90,
        engine_kwargs={"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None,
    )
    return optuna.create_study(
        study_name=spec.name,
        storage=rdb,
        direction=spec.direction,
        sampler=_sampler(spec, seed),
        pruner=_pruner(spec),
        load_if_exists=True,
    )


def _counted(study: Any) -> int:
    import optuna

    states = (
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.RUNNING,
        optuna.trial.TrialState.WAITING,
    )
    return len(study.get_trials(deepcopy=False, states=states))


def _objective(spec: SweepSpec, base_config: str | None, overrides: dict[str, Any], sweep_dir: Path) -> Any:
    import optuna

    from sentiment.training import train

    def objective(trial: optuna.Trial) -> float:
        params = _suggest(trial, spec)
        run_dir = sweep_dir / "trials" / f"trial-{trial.number:04d}"
        values = {
            **overrides,
            **params,
            "output_dir": str(run_dir),
            "run_name": f"{spec.name}-{trial.number:04d}",
            "overwrite": True,
            "resume": False,
        }
        cfg = build_config(base_config, values)
        trial.set_user_attr("params", params)
        trial.set_user_attr("run_dir", str(run_dir))

        def report(epoch: int, record: dict[str, float]) -> None:
            trial.report(record[spec.metric] if spec.metric in record else record["valid_acc"], epoch)
            trial.set_user_attr("history", [*trial.user_attrs.get("history", []), record])
            if epoch < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        started = time.perf_counter()
        metrics = train(cfg, on_epoch_end=report)
        trial.set_user_attr("runtime_s", time.perf_counter() - started)
        trial.set_user_attr("metrics", {k: metrics[k] for k in METRICS} | {"best_epoch": metrics["best_epoch"]})
        return metrics[spec.metric]

    return objective


def run_worker(
    sweep_file: str,
    count: int | None,
    storage: str,
    sweep_dir: str,
    extra_args: list[str],
    worker: int = 0,
    seed: int | None = 0,
    deadline: float | None = None,
) -> None:
    """One worker: take trials from the shared study until ``count`` trials are done or running, starting none
    after ``deadline`` (a ``time.time()`` value; a trial already running finishes)."""

    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s worker {worker} %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    spec = load_sweep(sweep_file)
    base_config, overrides = parse_command_line(spec.base_arguments() + list(extra_args))
    if spec.metric.startswith("test"):
        logger.warning("the sweep selects on %s: that leaks the test set into model selection", spec.metric)
    os.environ["WANDB_RUN_GROUP"] = spec.name  # each trial's wandb run joins the sweep's group
    study = _open_study(spec, storage, None)
    if seed is not None:  # a continued sweep must not redraw the points it already has
        study.sampler = _sampler(spec, seed + worker + 7919 * len(study.trials))
    total = target_trials(spec, count)
    objective = _objective(spec, base_config, overrides, Path(sweep_dir))
    failures = 0
    finished: list[Any] = []  # this worker's finished trials, in order
    while _counted(study) < total:
        if deadline is not None and time.time() >= deadline:
            logger.info("stop_after reached: no new trial (%d of %d counted)", _counted(study), total)
            break
        before = len(study.trials)
        study.optimize(
            objective,
            n_trials=1,
            catch=(Exception,),
            gc_after_trial=True,
            callbacks=[lambda _study, frozen: finished.append(frozen)],
        )
        if spec.method == "grid" and len(study.trials) == before:
            break
        failed = bool(finished) and finished[-1].state.name == "FAIL"
        failures = failures + 1 if failed else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            reason = finished[-1].system_attrs.get("fail_reason", "see the log above")
            raise SweepError(
                f"{failures} trials in a row failed, the last with: {reason}. Fix the trainer arguments "
                "(e.g. --dataset) and run the sweep again: finished trials are kept"
            )


def target_trials(spec: SweepSpec, count: int | None) -> int:
    """How many trials the sweep runs: ``--count``, capped by ``run_cap``, and by the grid's size."""
    limits = [n for n in (count, spec.run_cap) if n is not None]
    if spec.method == "grid":
        limits.append(spec.grid_size())
    if not limits:
        raise SweepError("say how many trials to run: --count N (or run_cap in the sweep file)")
    return min(limits)


def run_sweep(
    sweep_file: str | Path,
    count: int | None = None,
    workers: int = 1,
    sweep_dir: str | Path | None = None,
    storage: str | None = None,
    extra_args: list[str] | None = None,
    gpus: int | None = None,
    seed: int | None = 0,
    stop_after: float | None = None,
) -> Path:
    """Run (or continue) an offline sweep with ``workers`` processes; write its report; return the sweep folder.

    With ``gpus`` > 1, worker ``i`` sees only GPU ``i % gpus`` (CUDA_VISIBLE_DEVICES). With ``stop_after``,
    no trial starts later than that many seconds after this call (running trials finish), so a sweep fits a time
    slot without trials cut short; a later call with the same folder continues it.
    """
    if stop_after is not None and stop_after < 0:
        raise SweepError(f"stop_after is {stop_after}: give the seconds after which no trial starts (0 or more)")
    deadline = time.time() + stop_after if stop_after is not None else None
    spec = load_sweep(sweep_file)
    sweep_path = Path(sweep_dir or Path("sweeps") / spec.name).resolve()  # trials record absolute run folders
    sweep_path.mkdir(parents=True, exist_ok=True)
    storage = storage or default_storage(sweep_path)
    extra_args = list(extra_args or [])
    # Check the trainer arguments and create the study once, before any worker starts.
    base_config, overrides = parse_command_line(spec.base_arguments() + extra_args)
    build_config(base_config, overrides)
    _open_study(spec, storage, seed)
    total = target_trials(spec, count)
    manifest = {
        "name": spec.name,
        "storage": storage,
        "metric": spec.metric,
        "direction": spec.direction,
        "sweep_file": str(sweep_file),
        "method": spec.method,
        "parameters": list(spec.parameters),
    }
    (sweep_path / "sweep.json").write_text(json.dumps(manifest, indent=2))
    logger.info(
        "sweep %s: %s search, %d trials, %d worker(s), storage %s", spec.name, spec.method, total, workers, storage
    )
    args = (str(sweep_file), count, storage, str(sweep_path), extra_args)
    with _environment(WANDB_RUN_GROUP=spec.name):
        if workers == 1 and not gpus:
            run_worker(*args, worker=0, seed=seed, deadline=deadline)
        else:
            _run_processes(args, workers, gpus, seed, deadline)
    write_report(sweep_path)
    return sweep_path


def _run_processes(args: tuple, workers: int, gpus: int | None, seed: int | None, deadline: float | None) -> None:
    """Start ``workers`` worker processes (worker i on GPU i mod ``gpus``) and wait for them."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = []
    # Several workers share the terminal: their log lines (one per epoch and trial) replace progress bars.
    with _environment(TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1"):
        for worker in range(workers):
            device = {"CUDA_VISIBLE_DEVICES": str(worker % gpus)} if gpus else {}
            with _environment(**device):  # a spawned process copies the environment when it starts
                kwargs = {"worker": worker, "seed": seed, "deadline": deadline}
                process = context.Process(target=run_worker, args=args, kwargs=kwargs)
                process.start()
            processes.append(process)
    for process in processes:
        process.join()
    failed = [p.exitcode for p in processes if p.exitcode]
    if failed:
        raise SweepError(f"{len(failed)} of {workers} sweep workers failed (exit codes {failed}); see the log above")


@contextlib.contextmanager
def _environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the block, then restore the previous values."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
