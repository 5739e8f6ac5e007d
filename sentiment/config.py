"""One config for a run: a dataclass filled from a YAML file and ``--key=value`` flags.

The key names are the same everywhere: YAML files, command-line flags (the form ``wandb agent`` passes),
the wandb run config, sweep files and the model card. Each field of ``TrainConfig`` carries its ``--help`` group
and one-line help in its metadata; the command-line parser (jsonargparse), ``--help`` and the type checks are all
derived from the dataclass, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import SUPPRESS, ArgumentError, ArgumentParser, DefaultHelpFormatter, get_loader, set_loader

from sentiment.files import write_atomic

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the problem and the fix."""


# The groups of ``--help``, in its order; the config itself stays flat.
GROUPS = ("data", "model", "training", "language model", "output and tracking")

# The size of a random embedding (``vectors: none``) when ``embedding_dim`` is left out. With vectors, a left-out
# ``embedding_dim`` is their dimension; ``PreparedData.resolve`` makes it concrete, so a run's config.yaml records it.
RANDOM_EMBEDDING_DIM = 100


def _key(default: Any, group: str, text: str) -> Any:
    """A config field: its default, its ``--help`` group and its one-line help ``text``."""
    if group not in GROUPS:
        raise ValueError(f"unknown config group {group!r}")
    return dataclasses.field(default=default, metadata={"group": group, "help": text})


@dataclass
class TrainConfig:
    """Everything that determines a run. Defaults follow the report where it is explicit."""

    dataset: str = _key("stanfordnlp/imdb", "data", "hub id, or a local folder (parquet or aclImdb)")
    prepared: str | None = _key(None, "data", "read the data from a `sentiment prepare` folder")
    split_scheme: Literal["standard", "movie_blocks", "seed"] = _key(
        "standard", "data", "validation from train (standard, movie_blocks) or test (seed)"
    )
    split_seed: int = _key(42, "data", "seed of the validation split")
    valid_fraction: float | None = _key(None, "data", "share held out for validation; null: 0.1 (seed: 0.3)")
    max_train_samples: int | None = _key(None, "data", "at most N training reviews; null: all")
    max_eval_samples: int | None = _key(None, "data", "at most N validation and test reviews; null: all")
    with_unsupervised: bool = _key(False, "language model", "also encode the unlabelled reviews (pretraining)")
    num_proc: int | None = _key(None, "data", "tokenizing processes; null: one per CPU")
    lowercase: bool = _key(False, "data", "lowercase the text before tokenizing")
    max_length: int | None = _key(None, "data", "cut reviews to N tokens; null: no cut")
    max_vocab_size: int = _key(20000, "data", "vocabulary size (most frequent training tokens)")
    min_freq: int = _key(1, "data", "least count for a token to enter the vocabulary")
    vectors: str = _key("glove-6b-50d", "model", "word vectors: glove-6b-50d, a GloVe .txt/.zip, or none")
    # None (left out): the vectors' dimension, or RANDOM_EMBEDDING_DIM with vectors none. Set with vectors, it must
    # equal their dimension (prepare.check_embedding_dim): a size the vectors cannot fill is an error, not replaced.
    embedding_dim: int | None = _key(
        None, "model", "embedding size; with vectors leave out (it follows them); none: 100 unless set"
    )
    oov_init: Literal["zeros", "random"] = _key("zeros", "model", "start of the words the vectors lack")
    freeze_embeddings: bool = _key(False, "model", "keep the embedding fixed")
    hidden_dim: int = _key(100, "model", "LSTM hidden size per direction")
    n_layers: int = _key(1, "model", "stacked LSTM layers")
    dropout: float = _key(0.5, "model", "dropout on embeddings, between layers, before the output")
    bidirectional: bool = _key(False, "model", "BiLSTM: read reviews in both directions")
    rnn_input: Literal["auto", "packed", "padded", "fused", "persistent"] = _key(
        "auto", "model", "LSTM code path (auto: GPU fused, or persistent on Hopper; CPU padded)"
    )
    cuda_graphs: bool = _key(True, "model", "replay training steps from CUDA graphs (one GPU)")
    init_from: str | None = _key(None, "language model", "start from a pretrained language model (RUN/best)")
    pooling: Literal["last", "max", "mean", "concat"] = _key(
        "last", "model", "review vector: last state, max, mean, or all three"
    )
    embedding_dropout: float = _key(0.0, "model", "drop whole words with this probability")
    weight_dropout: float = _key(0.0, "model", "DropConnect on the recurrent weights")
    # Classifier training only (ULMFiT's truncated backpropagation): run the LSTM over a review in chunks of N
    # steps, the state carried across chunks but detached, so gradients flow back through at most N steps of the
    # recurrence (the forward pass is unchanged). 0: through the whole review. Not ``bptt``, the language model's
    # window (ULMFiT uses the same value for both, e.g. 70). Padded and fused paths only.
    truncate_bptt: int = _key(0, "language model", "classifier: backpropagate N-token chunks; 0: off")
    # Read every review backwards, last token first (classifier and language model): the backward half of
    # ULMFiT's forward + backward pair, whose predictions scripts/ensemble.py averages. A classifier started from a
    # language model (init_from) must read in the same direction.
    reverse: bool = _key(False, "language model", "read every review backwards, last token first")
    seed: int = _key(42, "training", "random seed (weights, batch order)")
    epochs: int = _key(8, "training", "passes over the training reviews")
    batch_size: int = _key(64, "training", "training batch size, all processes together")
    eval_batch_size: int = _key(256, "training", "validation and test batch size")
    lr: float = _key(1e-3, "training", "learning rate")
    optimizer: Literal["adam", "adamw"] = _key("adam", "training", "optimizer")
    weight_decay: float = _key(0.0, "training", "weight decay (decoupled with adamw)")
    lr_schedule: Literal["constant", "cosine", "onecycle"] = _key("constant", "training", "learning-rate schedule")
    warmup_ratio: float = _key(0.0, "training", "share of the steps warming the lr up")
    lr_layer_decay: float = _key(1.0, "language model", "lr factor per layer below the head; 1: one lr")
    gradual_unfreezing: bool = _key(False, "language model", "train the head first, one layer more per epoch")
    early_stopping_patience: int | None = _key(
        None, "training", "stop after N epochs with no validation gain; null: never"
    )
    bptt: int = _key(70, "language model", "language model's window in tokens (pretrain)")
    max_grad_norm: float | None = _key(None, "training", "clip gradients to this norm; null: no clipping")
    save_steps: int | None = _key(None, "training", "also save the state every N steps; null: per epoch")
    # A BiLSTM step of the config's longest batch (128 x 2,304 tokens) needs 10 GiB on a GPU: batches of more tokens
    # than this run as groups of rows whose gradients add up before the one optimizer step (the same update).
    max_step_tokens: int | None = _key(
        131072, "training", "most tokens (rows x length) per forward/backward, else groups of rows; null: any"
    )
    # Evaluation on a GPU runs beside the training graphs' memory pool, in pieces: by default as large as a training
    # group. Smaller pieces lower the peak (about 21 KB per token for the BiLSTM config on an H100) and take longer.
    max_eval_tokens: int | None = _key(None, "training", "most tokens per evaluation forward; null: as training groups")
    # None: the launcher's choice (`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION),
    # else "no"; TrainConfig.resolve_mixed_precision() makes it concrete when a run starts (config.yaml says what ran).
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _key(
        None, "training", "no, fp16 or bf16; null: the launcher's, else no"
    )
    output_dir: str | None = _key(None, "output and tracking", "run folder; null: runs/<lstm|bilstm>-<time>")
    overwrite: bool = _key(False, "output and tracking", "replace a run already in output_dir")
    resume: bool = _key(False, "output and tracking", "continue the run in output_dir")
    report_to: Literal["wandb", "none"] = _key("wandb", "output and tracking", "log to wandb, or nowhere")
    project: str = _key("imdb-sentiment", "output and tracking", "wandb project")
    run_name: str | None = _key(None, "output and tracking", "run name (wandb; the default output_dir)")
    push_to_hub: bool = _key(False, "output and tracking", "push the best checkpoint to the hub at the end")
    hub_model_id: str | None = _key(None, "output and tracking", "hub repository to push to: USER/NAME")
    hub_private: bool = _key(False, "output and tracking", "create the hub repository private")

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

    def resolve_mixed_precision(self) -> TrainConfig:
        """This config with a concrete ``mixed_precision``: its own, else the launcher's (``accelerate launch
        --mixed_precision bf16`` sets ACCELERATE_MIXED_PRECISION), else "no"."""
        if self.mixed_precision is not None:
            return self
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() or "no"
        choices = _choices(_hints()["mixed_precision"])
        if launcher not in choices:
            raise ConfigError(
                f"ACCELERATE_MIXED_PRECISION is {launcher!r}, which the trainer does not run: pass "
                f"--mixed_precision with one of {', '.join(choices)}"
            )
        return dataclasses.replace(self, mixed_precision=launcher)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (what goes to YAML, wandb and the model card)."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (through a temporary file and a rename)."""
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


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


def _each_key(groups: dict[tuple[str, ...], str]) -> dict[str, str]:
    return {key: reason for keys, reason in groups.items() for key in keys}


# What ``--resume`` does with a key whose value differs from the saved run's config.yaml. A key of
# RESUME_MAY_CHANGE takes its new value from the resume on (the value says how); a key of RESUME_FIXED refuses
# the resume, because the saved weights, optimizer or scheduler state, or the finished epochs, follow the saved
# value (the value says why). Every config key is in exactly one of them; docs/reliability.md lists the first.
RESUME_MAY_CHANGE: dict[str, str] = _each_key(
    {
        ("epochs",): "the run goes on to the new count (not below the epochs done); a learning-rate schedule is "
        "rebuilt for the new total of steps, its factor continuing from the step reached",
        ("early_stopping_patience",): "applies from the resume on, over the whole history: a run stopped early "
        "goes on when the new patience allows it",
        ("save_steps",): "only how often the state is saved",
        ("max_step_tokens",): "only how much memory a step takes: the same update, in groups of rows",
        ("max_eval_tokens",): "only how much memory an evaluation forward takes: the same logits, in pieces",
        ("eval_batch_size",): "only how many reviews are evaluated at once",
        ("num_proc",): "only how many processes tokenize",
        ("bptt",): "the language model's window, which classifier training does not read",
        (
            "output_dir",
            "overwrite",
            "resume",
            "report_to",
            "project",
            "run_name",
            "push_to_hub",
            "hub_model_id",
            "hub_private",
        ): "where and how the run is written, tracked and published",
    }
)
RESUME_FIXED: dict[str, str] = _each_key(
    {
        (*DATA_KEYS, "prepared"): "the saved weights were trained, and the best epoch chosen, on the saved data, "
        "vocabulary and embedding",
        ("hidden_dim", "n_layers", "bidirectional", "pooling", "reverse", "freeze_embeddings", "init_from"): "the "
        "saved weights and optimizer state belong to the saved model",
        ("lr", "optimizer", "weight_decay", "lr_layer_decay"): "the saved optimizer state holds the saved value, "
        "which would replace the new one unseen",
        ("lr_schedule", "warmup_ratio", "gradual_unfreezing"): "the saved scheduler state and the finished steps "
        "follow the saved schedule",
        ("seed", "batch_size"): "the batches of every epoch (and the steps of a schedule) follow it: a run resumed "
        "mid-epoch would skip other reviews",
        ("dropout", "embedding_dropout", "weight_dropout", "truncate_bptt", "max_grad_norm"): "the finished "
        "epochs were trained with the saved value",
        ("mixed_precision",): "the finished steps ran at the saved precision, and fp16 saves its gradient scaler",
        ("rnn_input", "cuda_graphs"): "they decide whether steps replay from CUDA graphs, which fixes the form of "
        "the saved optimizer state",
    }
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
            cfg.truncate_bptt == 0 or cfg.rnn_input != "packed",
            f"truncate_bptt needs the padded or fused path (rnn_input {cfg.rnn_input} runs each review in one call "
            "and cannot detach the state between chunks); use rnn_input auto, padded or fused, or truncate_bptt: 0",
        ),
        check(0 < cfg.lr_layer_decay <= 1, f"lr_layer_decay must be in (0, 1] (got {cfg.lr_layer_decay})"),
        check(cfg.bptt >= 2, f"bptt must be >= 2 (got {cfg.bptt})"),
        check(cfg.weight_decay >= 0, f"weight_decay must be >= 0 (got {cfg.weight_decay})"),
        check(0 <= cfg.warmup_ratio < 1, f"warmup_ratio must be in [0, 1) (got {cfg.warmup_ratio})"),
        check(
            cfg.early_stopping_patience is None or cfg.early_stopping_patience >= 1,
            f"early_stopping_patience must be >= 1, or null for none (got {cfg.early_stopping_patience})",
        ),
        check(
            cfg.embedding_dim is None or cfg.embedding_dim >= 1,
            f"embedding_dim must be >= 1, or null to follow the vectors (got {cfg.embedding_dim})",
        ),
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
        check(
            cfg.max_step_tokens is None or cfg.max_step_tokens >= 1,
            f"max_step_tokens must be >= 1, or null for no limit (got {cfg.max_step_tokens})",
        ),
        check(
            cfg.max_eval_tokens is None or cfg.max_eval_tokens >= 1,
            f"max_eval_tokens must be >= 1, or null for training groups' size (got {cfg.max_eval_tokens})",
        ),
        check(not (cfg.resume and cfg.overwrite), "resume and overwrite exclude each other: pick one"),
        check(
            not cfg.push_to_hub or bool(cfg.hub_model_id),
            "push_to_hub needs hub_model_id: the repository to push to, e.g. --hub_model_id=USER/imdb-bilstm",
        ),
    ]


def config_keys() -> list[str]:
    """All valid config key names."""
    return [f.name for f in fields(TrainConfig)]


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _choices(hint: Any) -> tuple[Any, ...]:
    """The choices of a ``Literal`` key (also inside ``| None``); empty for other keys."""
    for part in (hint, *typing.get_args(hint)):
        if typing.get_origin(part) is Literal:
            return typing.get_args(part)
    return ()


def _base_type(hint: Any) -> Any:
    """``int`` for ``int | None``, the Literal itself for a Literal key."""
    inner = [a for a in typing.get_args(hint) if a is not type(None)] if _optional(hint) else [hint]
    return inner[0]


# ------------------------------------------------------------------------------------- values and YAML

# The spellings of null on the command line: YAML's, and Python's (`wandb agent` passes --max_grad_norm=None).
_NULLS = frozenset({"None", "none", "null", "Null", "NULL", "~"})


def _normalize(values: dict[str, Any]) -> dict[str, Any]:
    """Undo what YAML and sweep tools do to values before they are type-checked.

    YAML 1.1 reads ``mixed_precision: no`` as the boolean false: for a key whose choices are strings, a boolean
    becomes the choice YAML spells that way. A null spelling (``None``, ``none``, ...) of an optional key is
    null. An integral float (``2.0``, from a sweep's numeric range) of an integer key is that integer.
    """
    hints = _hints()
    normalized = dict(values)
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None:
            continue
        if isinstance(value, bool) and _choices(hint):
            normalized[key] = next((c for c in _choices(hint) if yaml.safe_load(str(c)) is value), value)
        elif isinstance(value, str) and value.strip() in _NULLS and _optional(hint):
            normalized[key] = None
        elif isinstance(value, float) and _base_type(hint) is int and value.is_integer():
            normalized[key] = int(value)
    return normalized


def _load_yaml(text: str) -> Any:
    """The config's YAML reader, for files and for flag values alike: jsonargparse's YAML (``1e-3`` is a float,
    as YAML 1.2 says), with Python's ``None`` as null and the YAML 1.1 booleans of string choices undone."""
    if text.strip() in _NULLS:
        return None
    value = get_loader("yaml")(text)
    return _normalize(value) if isinstance(value, dict) else value


_PARSER_MODE = "sentiment_yaml"
set_loader(_PARSER_MODE, _load_yaml, (yaml.YAMLError,))


# ------------------------------------------------------------------------------------------- the parser


def _metavar(hint: Any) -> str:
    base = _base_type(hint)
    if _choices(hint):
        name = "{" + ",".join(str(c) for c in _choices(hint)) + "}"
    else:
        name = {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}[base]
    return f"{name}|null" if _optional(hint) else name


def _yaml_text(value: Any) -> str:
    """A default as a YAML file or a flag writes it: null, true, 0.001."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]
    return str(value)


class KeepsDefaultWhole:
    """A help formatter mixin: the closing "(default: X)" of an option's help is never split across lines; it
    ends the last line where it fits, else takes a line of its own."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        body, found, default = text.rpartition(" (default: ")
        if not found:
            return super()._split_lines(text, width)  # type: ignore[misc]
        lines = super()._split_lines(body, width)  # type: ignore[misc]
        tail = f"(default: {default}"
        if lines and len(lines[-1]) + 1 + len(tail) <= width:
            return [*lines[:-1], f"{lines[-1]} {tail}"]
        return [*lines, tail]


class HelpFormatter(KeepsDefaultWhole, DefaultHelpFormatter):
    """The trainer's ``--help``: the metavar gives each key's type, its help line ends with its default."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("max_help_position", 30)
        super().__init__(prog, **kwargs)

    def _get_help_string(self, action: Any) -> str:
        text = action.help or ""
        if not action.option_strings or action.dest in ("help", "config") or action.default is SUPPRESS:
            return text
        if action.default is None and action.dest not in _hints():
            return text
        return f"{text} (default: {_yaml_text(action.default).replace('%', '%%')})"


def config_parser(
    prog: str | None = None,
    description: str | None = None,
    keys: Iterable[str] | None = None,
    usage: str | None = None,
    epilog: str | None = None,
) -> ArgumentParser:
    """The command-line parser of the trainer's options: ``--config FILE`` and ``--KEY=VALUE`` (or ``--KEY
    VALUE``) for each config key (all keys, or ``keys``). Each key's type, default, ``--help`` group and help
    line come from its ``TrainConfig`` field."""
    parser = ArgumentParser(
        prog=prog,
        description=description,
        usage=usage or "%(prog)s [--config FILE] [--KEY=VALUE ...]",
        epilog=epilog,
        formatter_class=HelpFormatter,
        parser_mode=_PARSER_MODE,
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file of key: value lines (configs/*.yaml); the flags override it"
    )
    wanted = set(config_keys() if keys is None else keys)
    hints = _hints()
    for group in GROUPS:
        members = [f for f in fields(TrainConfig) if f.name in wanted and f.metadata["group"] == group]
        if not members:
            continue
        section = parser.add_argument_group(group)
        for f in members:
            options: dict[str, Any] = {"type": hints[f.name], "default": f.default, "metavar": _metavar(hints[f.name])}
            if hints[f.name] is bool:  # --resume alone is true; --resume=false and --resume false work too
                options.update(nargs="?", const=True)
            section.add_argument(f"--{f.name}", help=f.metadata["help"].replace("%", "%%"), **options)
    if keys is None:  # removed keys pass, unlisted, to build_config, which drops or refuses them (REMOVED_KEYS)
        for key in REMOVED_KEYS:
            parser.add_argument(f"--{key}", type=str, default=SUPPRESS, help=SUPPRESS)
    return parser


@functools.cache
def _default_parser() -> ArgumentParser:
    return config_parser(prog="sentiment train")


# ------------------------------------------------------------------------------------------------ errors


# Keys taken out of the config: each with the value at which it changed nothing, and what a run that set it
# otherwise does now. A run folder's config.yaml written before the removal still loads (``--config`` of its own
# config, as ``--resume`` suggests): the key at that value is dropped with a warning; another value is a
# ``ConfigError``, since the run it asks for can no longer be made. ``build_config`` applies this to YAML files,
# flags and sweep values alike.
REMOVED_KEYS: dict[str, tuple[Any, str]] = {
    "unfreeze_warmup": (
        0.0,
        "the schedule no longer ramps up the lr of the layers gradual_unfreezing unfreezes (an experiment, "
        "docs/results.md): a layer takes the schedule's lr as it is unfrozen. Drop the key",
    ),
}


def _check_key_names(keys: Iterable[Any], source: str) -> None:
    """Raise the unknown-key ``ConfigError`` for the first of ``keys`` that is neither a config key nor a removed
    one (``REMOVED_KEYS``, which ``_drop_removed_keys`` handles)."""
    for key in keys:
        if key not in config_keys() and key not in REMOVED_KEYS:
            raise _unknown_key_error(str(key), source)


def _drop_removed_keys(values: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """``values`` without the removed keys (``REMOVED_KEYS``): one at its no-op value is dropped with a logged
    warning, one at another value is a ``ConfigError`` that says what to do. ``sources`` names where each key
    came from (a file, the flags)."""
    kept = {}
    for key, value in values.items():
        if key not in REMOVED_KEYS:
            kept[key] = value
            continue
        noop, instead = REMOVED_KEYS[key]
        given = _load_yaml(value) if isinstance(value, str) else value  # a flag's value is text
        if given == noop and isinstance(given, bool) == isinstance(noop, bool):
            logger.warning("%s was removed; its value %s changed nothing, ignored (%s)", key, noop, sources[key])
            continue
        raise ConfigError(
            f"config key '{key}' ({_yaml_text(given)}, in {sources[key]}) was removed: {instead} (at "
            f"{_yaml_text(noop)} it changed nothing and is ignored)"
        )
    return kept


def _unknown_key_error(key: str, source: str, valid: Sequence[str] | None = None) -> ConfigError:
    keys = list(valid or config_keys())
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {source}.{hint} Valid keys: {', '.join(keys)}")


def _expected(hint: Any) -> str:
    """What a key takes, in words: 'an integer', "one of 'last', 'max'", 'a number or null'."""
    base = _base_type(hint)
    if _choices(hint):
        text = "one of " + ", ".join(repr(c) for c in _choices(hint))
    else:
        text = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[base]
    return f"{text} or null" if _optional(hint) else text


def _flag_values(arguments: Sequence[str]) -> dict[str, str]:
    """The last value each ``--key=value`` / ``--key value`` gives: what an error message quotes."""
    values = {}
    for i, arg in enumerate(arguments):
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            values[key] = value
        elif arg.startswith("--") and i + 1 < len(arguments) and not arguments[i + 1].startswith("--"):
            values[arg[2:]] = arguments[i + 1]
    return values


def _parse_error(err: ArgumentError, parser: ArgumentParser, given: dict[str, Any] | None = None) -> ConfigError:
    """The parser's complaint as a ConfigError that names the key and what it takes."""
    message = str(err)
    valid = [a.dest for a in parser._actions if a.dest in _hints()]
    if message.lower().startswith("unrecognized arguments:"):
        first = message.split(":", 1)[1].split()[0]
        if first.startswith("--") and len(first) > 2:
            return _unknown_key_error(first[2:].split("=", 1)[0], "the command-line flags", valid)
        return ConfigError(f"unexpected argument {first!r}: options are --key=value with a config key")
    key = message.split('"')[1] if message.startswith('Parser key "') else None
    if key not in _hints():
        return ConfigError(message)
    got = f" (got {given[key]!r})" if given and key in given else ""
    return ConfigError(f"{key} must be {_expected(_hints()[key])}{got}")


# ------------------------------------------------------------------------------------------ entry points


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Pass an existing YAML file, e.g. configs/bilstm.yaml")
    try:
        loaded = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, not {type(loaded).__name__}")
    _check_key_names(loaded, str(path))
    return loaded


def build_config(config_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build the config from an optional YAML file, then ``overrides`` (flags) on top; validate everything:
    key names, types (through the command-line parser) and ranges."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_path is not None:
        values.update(_read_config_file(Path(config_path)))
        sources.update(dict.fromkeys(values, str(Path(config_path))))
    _check_key_names(overrides or {}, "the command-line flags")
    values.update(_normalize(dict(overrides or {})))
    sources.update(dict.fromkeys(overrides or {}, "the command-line flags"))
    values = _drop_removed_keys(values, sources)
    parser = _default_parser()
    try:
        namespace = parser.parse_object(values)
    except ArgumentError as err:
        raise _parse_error(err, parser, values) from None
    return TrainConfig(**{key: namespace[key] for key in config_keys()})


def parse_command_line(
    arguments: Sequence[str], parser: ArgumentParser | None = None
) -> tuple[str | None, dict[str, Any]]:
    """Parse a trainer command line: ``--config FILE`` and ``--key=value`` / ``--key value`` / bare ``--flag``
    options. Returns the config path (or None) and the options given, type-checked; ``build_config`` puts them
    on top of the file. ``parser`` defaults to the trainer's (``config_parser()``); ``--help`` prints it and
    exits."""
    parser = parser or _default_parser()
    try:
        namespace = parser.parse_args(list(arguments), defaults=False)
    except ArgumentError as err:
        raise _parse_error(err, parser, _flag_values(arguments)) from None
    values = namespace.as_dict()
    return values.pop("config", None), values
