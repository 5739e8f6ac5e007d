"""One config for a run: a dataclass filled from a YAML file and ``--key=value`` flags.

The key names are the same everywhere: YAML files, command-line flags (the form ``wandb agent`` passes),
the wandb run config, sweep files and the model card.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the problem and the fix."""


@dataclass
class TrainConfig:
    """Everything that determines a run. Defaults follow the report where it is explicit."""

    # data
    dataset: str = "stanfordnlp/imdb"
    prepared: str | None = None
    split_scheme: Literal["standard", "movie_blocks", "seed"] = "standard"
    split_seed: int = 42
    valid_fraction: float | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    with_unsupervised: bool = False
    num_proc: int | None = None
    # text
    lowercase: bool = False
    max_length: int | None = None
    max_vocab_size: int = 20000
    min_freq: int = 1
    # vectors
    vectors: str = "glove-6b-50d"
    embedding_dim: int = 100
    oov_init: Literal["zeros", "random"] = "zeros"
    freeze_embeddings: bool = False
    # model
    hidden_dim: int = 100
    n_layers: int = 1
    dropout: float = 0.5
    bidirectional: bool = False
    rnn_input: Literal["auto", "packed", "padded", "fused", "triton"] = "auto"
    cuda_graphs: bool = True
    init_from: str | None = None
    pooling: Literal["last", "max", "mean", "concat"] = "last"
    embedding_dropout: float = 0.0
    weight_dropout: float = 0.0
    # Classifier training only (ULMFiT's truncated backpropagation): run the LSTM over a review in chunks of N
    # steps, the state carried across chunks but detached, so gradients flow back through at most N steps of the
    # recurrence (the forward pass is unchanged). 0: through the whole review. Not ``bptt``, the language model's
    # window (ULMFiT uses the same value for both, e.g. 70). Padded and fused paths only.
    truncate_bptt: int = 0
    # Read every review backwards, last token first (classifier and language model): the backward half of
    # ULMFiT's forward + backward pair, whose predictions scripts/ensemble.py averages. A classifier started from a
    # language model (init_from) must read in the same direction.
    reverse: bool = False
    # training
    seed: int = 42
    epochs: int = 8
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine", "onecycle"] = "constant"
    warmup_ratio: float = 0.0
    lr_layer_decay: float = 1.0
    gradual_unfreezing: bool = False
    unfreeze_warmup: float = 0.0
    early_stopping_patience: int | None = None
    bptt: int = 70
    max_grad_norm: float | None = None
    save_steps: int | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # outputs and tracking
    output_dir: str | None = None
    overwrite: bool = False
    resume: bool = False
    report_to: Literal["wandb", "none"] = "wandb"
    project: str = "imdb-sentiment"
    run_name: str | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False

    def __post_init__(self) -> None:
        problems = [p for p in _range_problems(self) if p]
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(problems))

    @property
    def validation_fraction(self) -> float:
        """The fraction held out for validation: of train (standard) or of test (seed, the report's 30%)."""
        if self.valid_fraction is not None:
            return self.valid_fraction
        return 0.3 if self.split_scheme == "seed" else 0.1

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (what goes to YAML, wandb and the model card)."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (through a temporary file and a rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)


# Keys that change the data the model sees; a prepared folder fixes them.
DATA_KEYS = (
    "dataset",
    "split_scheme",
    "split_seed",
    "valid_fraction",
    "max_train_samples",
    "max_eval_samples",
    "with_unsupervised",
    "lowercase",
    "max_length",
    "max_vocab_size",
    "min_freq",
    "vectors",
    "embedding_dim",
    "oov_init",
)


def _range_problems(cfg: TrainConfig) -> list[str | None]:
    def check(ok: bool, message: str) -> str | None:
        return None if ok else message

    return [
        check(cfg.epochs >= 1, f"epochs must be >= 1 (got {cfg.epochs})"),
        check(cfg.batch_size >= 1, f"batch_size must be >= 1 (got {cfg.batch_size})"),
        check(cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1 (got {cfg.eval_batch_size})"),
        check(cfg.lr > 0, f"lr must be > 0 (got {cfg.lr})"),
        check(cfg.hidden_dim >= 1, f"hidden_dim must be >= 1 (got {cfg.hidden_dim})"),
        check(cfg.n_layers >= 1, f"n_layers must be >= 1 (got {cfg.n_layers})"),
        check(0 <= cfg.dropout < 1, f"dropout must be in [0, 1) (got {cfg.dropout})"),
        check(0 <= cfg.embedding_dropout < 1, f"embedding_dropout must be in [0, 1) (got {cfg.embedding_dropout})"),
        check(0 <= cfg.weight_dropout < 1, f"weight_dropout must be in [0, 1) (got {cfg.weight_dropout})"),
        check(
            cfg.weight_dropout == 0 or cfg.rnn_input != "packed",
            "weight_dropout needs the padded or fused path (nn.LSTM on packed input keeps its own weights); "
            "set rnn_input: auto",
        ),
        check(
            cfg.truncate_bptt == 0 or cfg.truncate_bptt >= 2,
            f"truncate_bptt must be 0 (off) or >= 2 steps (got {cfg.truncate_bptt})",
        ),
        check(
            cfg.truncate_bptt == 0 or cfg.rnn_input not in ("packed", "triton"),
            f"truncate_bptt needs the padded or fused path (rnn_input {cfg.rnn_input} runs each review in one call "
            "and cannot detach the state between chunks); use rnn_input auto, padded or fused, or truncate_bptt: 0",
        ),
        check(
            cfg.rnn_input != "triton" or importlib.util.find_spec("triton") is not None,
            "rnn_input triton needs the triton package: pip install triton (or use rnn_input: auto)",
        ),
        check(0 < cfg.lr_layer_decay <= 1, f"lr_layer_decay must be in (0, 1] (got {cfg.lr_layer_decay})"),
        check(cfg.bptt >= 2, f"bptt must be >= 2 (got {cfg.bptt})"),
        check(cfg.weight_decay >= 0, f"weight_decay must be >= 0 (got {cfg.weight_decay})"),
        check(0 <= cfg.warmup_ratio < 1, f"warmup_ratio must be in [0, 1) (got {cfg.warmup_ratio})"),
        check(cfg.unfreeze_warmup >= 0, f"unfreeze_warmup must be >= 0 epochs (got {cfg.unfreeze_warmup})"),
        check(
            cfg.early_stopping_patience is None or cfg.early_stopping_patience >= 1,
            f"early_stopping_patience must be >= 1, or null for none (got {cfg.early_stopping_patience})",
        ),
        check(cfg.embedding_dim >= 1, f"embedding_dim must be >= 1 (got {cfg.embedding_dim})"),
        check(cfg.max_vocab_size >= 1, f"max_vocab_size must be >= 1 (got {cfg.max_vocab_size})"),
        check(cfg.min_freq >= 1, f"min_freq must be >= 1 (got {cfg.min_freq})"),
        check(
            cfg.valid_fraction is None or 0 < cfg.valid_fraction < 1,
            f"valid_fraction must be in (0, 1) (got {cfg.valid_fraction})",
        ),
        check(cfg.max_length is None or cfg.max_length >= 1, f"max_length must be >= 1 (got {cfg.max_length})"),
        check(
            cfg.max_train_samples is None or cfg.max_train_samples >= 2,
            f"max_train_samples must be >= 2 (got {cfg.max_train_samples})",
        ),
        check(
            cfg.max_eval_samples is None or cfg.max_eval_samples >= 1,
            f"max_eval_samples must be >= 1 (got {cfg.max_eval_samples})",
        ),
        check(
            cfg.max_grad_norm is None or cfg.max_grad_norm > 0,
            f"max_grad_norm must be > 0, or null for no clipping (got {cfg.max_grad_norm})",
        ),
        check(cfg.num_proc is None or cfg.num_proc >= 1, f"num_proc must be >= 1 (got {cfg.num_proc})"),
        check(cfg.save_steps is None or cfg.save_steps >= 1, f"save_steps must be >= 1 (got {cfg.save_steps})"),
        check(not (cfg.resume and cfg.overwrite), "resume and overwrite exclude each other: pick one"),
        check(
            not cfg.push_to_hub or bool(cfg.hub_model_id),
            "push_to_hub needs hub_model_id: the repository to push to, e.g. --hub_model_id=USER/imdb-bilstm",
        ),
    ]


def config_keys() -> list[str]:
    """All valid config key names."""
    return [f.name for f in fields(TrainConfig)]


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` to the field's type, or raise ConfigError naming the key and the expected type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))
        if is_null and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/yes/on/off as booleans: mixed_precision: no
            value = next((a for a in args if yaml.safe_load(str(a)) is value), value)
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)} (got {value!r})")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key} must be true or false (got {value!r})")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer (got {value!r})")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer (got {value!r})")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number (got {value!r})")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number (got {value!r})") from None
    if annotation is str:
        if isinstance(value, bool):  # YAML 1.1 booleans (no, off, yes, on) given for a string key
            raise ConfigError(f"{key} must be a string (got {value!r}); quote it, e.g. {key}: 'no'")
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key} must be a string (got {value!r})")
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _unknown_key_error(key: str, source: str) -> ConfigError:
    keys = config_keys()
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {source}.{hint} Valid keys: {', '.join(keys)}")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Parse ``--key=value``, ``--key value`` and bare ``--flag`` (true) into a dict of raw YAML values."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: options are --key=value with a config key")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            key, raw = body, "true"
        key = key.replace("-", "_")
        try:
            overrides[key] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            overrides[key] = raw
        i += 1
    return overrides


def build_config(config_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build the config from an optional YAML file, then ``overrides`` (flags) on top; validate everything."""
    values: dict[str, Any] = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}. Pass an existing YAML file, e.g. configs/bilstm.yaml")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value, not {type(loaded).__name__}")
        for key in loaded:
            if key not in config_keys():
                raise _unknown_key_error(key, str(path))
        values.update(loaded)
    for key in overrides or {}:
        if key not in config_keys():
            raise _unknown_key_error(key, "the command-line flags")
    values.update(overrides or {})
    hints = typing.get_type_hints(TrainConfig)
    coerced = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
    return TrainConfig(**coerced)


def parse_command_line(arguments: list[str]) -> tuple[str | None, dict[str, Any]]:
    """``--config FILE`` (or ``--config=FILE``) and the ``--key=value`` overrides of a trainer command line."""
    config_path = None
    rest: list[str] = []
    i = 0
    while i < len(arguments):
        if arguments[i] == "--config" and i + 1 < len(arguments):
            config_path = arguments[i + 1]
            i += 2
            continue
        if arguments[i].startswith("--config="):
            config_path = arguments[i].split("=", 1)[1]
        else:
            rest.append(arguments[i])
        i += 1
    return config_path, parse_overrides(rest)
