"""Tests for sentiment.config: YAML + flag parsing (jsonargparse), type checks, validation, ``--help`` and the
shipped configs."""

from __future__ import annotations

import dataclasses
import logging
import typing
from pathlib import Path

import pytest
import yaml

from sentiment.config import (
    GROUPS,
    RANDOM_EMBEDDING_DIM,
    REMOVED_KEYS,
    ConfigError,
    TrainConfig,
    build_config,
    config_keys,
    config_parser,
    parse_command_line,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parse_overrides(args: list[str]) -> dict[str, object]:
    """The ``--key=value`` options of a trainer command line, as ``parse_command_line`` returns them."""
    config_path, overrides = parse_command_line(args)
    assert config_path is None
    return overrides


def write_yaml(path: Path, values: dict[str, object]) -> Path:
    """Write ``values`` as a YAML file and return its path."""
    path.write_text(yaml.safe_dump(values))
    return path


# ---------------------------------------------------------------------------------------- build_config


def test_build_config_defaults_without_file() -> None:
    """No file and no flags gives the dataclass defaults."""
    assert build_config() == TrainConfig()


def test_build_config_from_yaml(tmp_path: Path) -> None:
    """Every key in the YAML file lands in the config; the rest keep their defaults."""
    path = write_yaml(tmp_path / "c.yaml", {"hidden_dim": 33, "n_layers": 2, "bidirectional": True, "lr": 0.02})
    cfg = build_config(path)
    assert (cfg.hidden_dim, cfg.n_layers, cfg.bidirectional, cfg.lr) == (33, 2, True, 0.02)
    assert cfg.batch_size == TrainConfig().batch_size


def test_overrides_win_over_yaml(tmp_path: Path) -> None:
    """Flags are applied on top of the YAML file."""
    path = write_yaml(tmp_path / "c.yaml", {"hidden_dim": 33, "epochs": 4})
    cfg = build_config(path, parse_overrides(["--hidden_dim=7"]))
    assert cfg.hidden_dim == 7
    assert cfg.epochs == 4


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    """An empty YAML file is an empty mapping."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert build_config(path) == TrainConfig()


def test_missing_config_file(tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError naming it."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as err:
        build_config(path)
    assert str(path) in str(err.value)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    """A YAML list is rejected with a message saying a mapping is needed."""
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(path)


def test_invalid_yaml(tmp_path: Path) -> None:
    """Broken YAML syntax is a ConfigError, not a yaml exception."""
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_dim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(path)


# ---------------------------------------------------------------------------------- parse_command_line


def test_parse_key_equals_value() -> None:
    """``--key=value`` gives the value with the key's type."""
    assert parse_overrides(["--hidden_dim=3", "--run_name=abc"]) == {"hidden_dim": 3, "run_name": "abc"}


def test_parse_key_space_value() -> None:
    """``--key value`` takes the next argument as the value."""
    assert parse_overrides(["--hidden_dim", "3", "--project", "p"]) == {"hidden_dim": 3, "project": "p"}


def test_parse_bare_flag_is_true() -> None:
    """A bare ``--flag`` (last, or followed by another flag) means true."""
    assert parse_overrides(["--lowercase", "--hidden_dim=2", "--bidirectional"]) == {
        "lowercase": True,
        "hidden_dim": 2,
        "bidirectional": True,
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--resume=false"], False),
        (["--resume=False"], False),
        (["--resume", "false"], False),
        (["--resume=true"], True),
        (["--resume", "True"], True),
        (["--resume"], True),
    ],
)
def test_parse_bool_flag_forms(args: list[str], expected: bool) -> None:
    """A bool key takes ``--flag``, ``--flag=false`` and ``--flag false`` (wandb agent writes True/False)."""
    assert parse_overrides(args) == {"resume": expected}


def test_parse_the_wandb_agent_form() -> None:
    """``wandb agent`` passes ``--key=value`` with Python's spellings: True, None."""
    assert parse_overrides(["--hidden_dim=150", "--bidirectional=True", "--max_grad_norm=None", "--lr=0.005"]) == {
        "hidden_dim": 150,
        "bidirectional": True,
        "max_grad_norm": None,
        "lr": 0.005,
    }


def test_parse_config_file_and_overrides(tmp_path: Path) -> None:
    """``--config FILE`` (anywhere on the line) gives the file; the flags override its keys."""
    path = write_yaml(tmp_path / "c.yaml", {"hidden_dim": 33, "epochs": 4})
    for args in (["--config", str(path), "--hidden_dim=7"], ["--hidden_dim", "7", f"--config={path}"]):
        config_path, overrides = parse_command_line(args)
        assert (config_path, overrides) == (str(path), {"hidden_dim": 7})
        cfg = build_config(config_path, overrides)
        assert (cfg.hidden_dim, cfg.epochs) == (7, 4)


def test_parse_dashes_are_not_keys() -> None:
    """``--hidden-dim`` is not a key (the keys are the same everywhere): the error names the right one."""
    with pytest.raises(ConfigError, match="Did you mean 'hidden_dim'"):
        parse_overrides(["--hidden-dim=5"])


def test_parse_no_abbreviations() -> None:
    """A prefix of a key is not taken for the key (``--hidden`` is not ``--hidden_dim``)."""
    with pytest.raises(ConfigError, match=r"unknown config key 'hidden'.*Did you mean 'hidden_dim'"):
        parse_overrides(["--hidden", "5"])


def test_parse_value_containing_equals() -> None:
    """Only the first ``=`` separates key and value."""
    assert parse_overrides(["--run_name=a=b"]) == {"run_name": "a=b"}


@pytest.mark.parametrize("arg", ["hidden_dim=3", "-x", "--"])
def test_parse_rejects_non_options(arg: str) -> None:
    """Anything that is not ``--key...`` is rejected, naming the argument."""
    with pytest.raises(ConfigError, match="unexpected argument") as err:
        parse_overrides([arg])
    assert repr(arg) in str(err.value)


@pytest.mark.parametrize("value", ["none", "None", "null"])
def test_key_none_gives_none_for_optional(value: str) -> None:
    """``--key=none`` (and None, null) sets an optional key to None, from flags and from a dict."""
    cfg = build_config(None, parse_overrides(["--max_length=50", "--run_name=x"]))
    assert cfg.max_length == 50
    cfg = build_config(None, parse_overrides([f"--max_length={value}", f"--run_name={value}"]))
    assert cfg.max_length is None
    assert cfg.run_name is None
    assert build_config(None, {"max_grad_norm": value}).max_grad_norm is None


def test_vectors_none_stays_a_string() -> None:
    """``vectors`` is not optional: ``--vectors=none`` is the string 'none' (random init)."""
    assert build_config(None, parse_overrides(["--vectors=none"])).vectors == "none"


def test_embedding_dim_is_left_out_by_default(tmp_path: Path) -> None:
    """``embedding_dim`` defaults to None (it follows the vectors, or is 100 with ``vectors: none``, once the data
    resolves it); a size given in YAML, a flag or a dict is kept as given, 100 included, and null leaves it out."""
    assert TrainConfig().embedding_dim is None and RANDOM_EMBEDDING_DIM == 100
    assert build_config().embedding_dim is None
    assert build_config(write_yaml(tmp_path / "c.yaml", {"embedding_dim": 100})).embedding_dim == 100
    assert build_config(None, parse_overrides(["--embedding_dim=100"])).embedding_dim == 100
    assert build_config(None, parse_overrides(["--embedding_dim=null"])).embedding_dim is None
    assert build_config(None, {"embedding_dim": 12.0}).embedding_dim == 12


# -------------------------------------------------------------------------------------------- coercion


def test_int_from_string() -> None:
    """An int field accepts a numeric string and an integral float."""
    cfg = build_config(None, {"hidden_dim": "3", "n_layers": 2.0})
    assert cfg.hidden_dim == 3 and type(cfg.hidden_dim) is int
    assert cfg.n_layers == 2 and type(cfg.n_layers) is int


def test_float_from_exponent_string_in_yaml(tmp_path: Path) -> None:
    """PyYAML reads ``1e-3`` as a string (YAML 1.1); the float field still gets 0.001."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\ndropout: 2e-1\n")
    assert isinstance(yaml.safe_load(path.read_text())["lr"], str)  # the case being tested
    cfg = build_config(path)
    assert cfg.lr == pytest.approx(1e-3) and type(cfg.lr) is float
    assert cfg.dropout == pytest.approx(0.2)


def test_float_from_exponent_flag() -> None:
    """``--lr=5e-4`` becomes the float 0.0005; an int value becomes a float."""
    cfg = build_config(None, parse_overrides(["--lr=5e-4", "--max_grad_norm=1"]))
    assert cfg.lr == pytest.approx(5e-4)
    assert cfg.max_grad_norm == 1.0 and type(cfg.max_grad_norm) is float


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("True", True),
        ("yes", True),
        ("false", False),
        ("False", False),
        ("no", False),
    ],
)
def test_bool_from_strings(raw: str, expected: bool) -> None:
    """Bool fields accept true/false/yes/no, both as raw strings and through flag parsing."""
    assert build_config(None, {"lowercase": raw}).lowercase is expected
    assert build_config(None, parse_overrides([f"--lowercase={raw}"])).lowercase is expected


@pytest.mark.parametrize(("key", "value"), [("lowercase", "maybe"), ("bidirectional", 2), ("resume", "1")])
def test_bool_rejects_other_values(key: str, value: object) -> None:
    """A bool field rejects anything that is not a boolean spelling."""
    with pytest.raises(ConfigError, match=f"{key} must be true or false"):
        build_config(None, {key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [("hidden_dim", "abc"), ("hidden_dim", 2.5), ("epochs", True), ("lr", "fast"), ("max_length", "long")],
)
def test_wrong_type_names_key(key: str, value: object) -> None:
    """A value of the wrong type is a ConfigError that names the key."""
    with pytest.raises(ConfigError) as err:
        build_config(None, {key: value})
    assert key in str(err.value)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--hidden_dim=abc", "hidden_dim must be an integer (got 'abc')"),
        ("--epochs=abc", "epochs must be an integer (got 'abc')"),
        ("--lr=fast", "lr must be a number (got 'fast')"),
        ("--max_grad_norm=abc", "max_grad_norm must be a number or null (got 'abc')"),
        ("--pooling=attention", "pooling must be one of 'last', 'max', 'mean', 'concat' (got 'attention')"),
        ("--bidirectional=maybe", "bidirectional must be true or false (got 'maybe')"),
    ],
)
def test_wrong_type_from_flag(flag: str, message: str) -> None:
    """A flag's bad value names the key, what it takes and the value given."""
    with pytest.raises(ConfigError) as err:
        parse_overrides([flag])
    assert str(err.value) == message


# ---------------------------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("hidden_dim", 0),
        ("lr", 0),
        ("lr", -1e-3),
        ("batch_size", 0),
        ("eval_batch_size", 0),
        ("epochs", 0),
        ("n_layers", 0),
        ("valid_fraction", 1.5),
        ("valid_fraction", 0),
        ("max_vocab_size", 0),
        ("min_freq", 0),
        ("max_length", 0),
        ("max_train_samples", 1),
        ("max_eval_samples", 0),
        ("max_grad_norm", 0),
        ("num_proc", 0),
        ("embedding_dim", 0),
    ],
)
def test_out_of_range_names_key(key: str, value: object) -> None:
    """Out-of-range values are ConfigErrors naming the key and the value."""
    with pytest.raises(ConfigError) as err:
        build_config(None, {key: value})
    assert key in str(err.value)
    assert str(value) in str(err.value)


def test_boundary_values_accepted() -> None:
    """The edges of the allowed ranges are accepted (dropout 0, sizes 1, max_train_samples 2)."""
    cfg = build_config(
        None,
        {"dropout": 0.0, "hidden_dim": 1, "batch_size": 1, "max_train_samples": 2, "valid_fraction": 0.99},
    )
    assert (cfg.dropout, cfg.hidden_dim, cfg.batch_size, cfg.max_train_samples) == (0.0, 1, 1, 2)


def test_resume_and_overwrite_exclude_each_other() -> None:
    """``--resume --overwrite`` is refused."""
    with pytest.raises(ConfigError, match="resume and overwrite"):
        build_config(None, parse_overrides(["--resume", "--overwrite"]))


def test_range_check_from_yaml(tmp_path: Path) -> None:
    """The range checks also apply to values from a YAML file."""
    path = write_yaml(tmp_path / "c.yaml", {"dropout": 1.0})
    with pytest.raises(ConfigError, match="dropout"):
        build_config(path)


# -------------------------------------------------------------------------------------- Literal fields


def _choices_of(hint: object) -> tuple[str, ...]:
    """The choices of a Literal key, also of one that may be null (``Literal[...] | None``)."""
    for part in (hint, *typing.get_args(hint)):
        if typing.get_origin(part) is typing.Literal:
            return typing.get_args(part)
    return ()


@pytest.mark.parametrize(
    ("key", "value"), [("split_scheme", "random"), ("report_to", "tensorboard"), ("mixed_precision", "fp8")]
)
def test_literal_rejects_bad_value(key: str, value: str) -> None:
    """A Literal field rejects values outside its choices and lists the choices."""
    with pytest.raises(ConfigError) as err:
        build_config(None, parse_overrides([f"--{key}={value}"]))
    message = str(err.value)
    assert key in message and repr(value) in message
    for choice in _choices_of(typing.get_type_hints(TrainConfig)[key]):
        assert choice in message
    with pytest.raises(ConfigError, match=key):  # the same check for a value from YAML or a sweep
        build_config(None, {key: value})


def _literal_choices() -> list[tuple[str, str]]:
    hints = typing.get_type_hints(TrainConfig)
    return [(name, choice) for name, hint in hints.items() for choice in _choices_of(hint)]


@pytest.mark.parametrize(("key", "value"), _literal_choices())
def test_literal_accepts_every_choice_from_flags(key: str, value: str) -> None:
    """Every documented choice of every Literal field can be given as ``--key=value``."""
    assert getattr(build_config(None, parse_overrides([f"--{key}={value}"])), key) == value


@pytest.mark.parametrize(("key", "value"), _literal_choices())
def test_literal_accepts_every_choice_from_yaml(tmp_path: Path, key: str, value: str) -> None:
    """Every documented choice of every Literal field can be written unquoted in a YAML config."""
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {value}\n")
    assert getattr(build_config(path), key) == value


# ---------------------------------------------------------------------------------------- unknown keys


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    """A misspelt key in YAML names the key and the file, suggests the close match and lists valid keys."""
    path = write_yaml(tmp_path / "c.yaml", {"hiden_dim": 3})
    with pytest.raises(ConfigError) as err:
        build_config(path)
    message = str(err.value)
    assert "'hiden_dim'" in message
    assert str(path) in message
    assert "Did you mean 'hidden_dim'" in message
    assert "Valid keys" in message
    for key in config_keys():
        assert key in message


def test_unknown_key_in_flags() -> None:
    """A misspelt flag names the key, suggests the close match and lists valid keys."""
    with pytest.raises(ConfigError) as err:
        build_config(None, parse_overrides(["--learning_rat=0.1", "--bach_size=3"]))
    message = str(err.value)
    assert "'learning_rat'" in message
    assert "command-line" in message
    assert "Valid keys" in message
    for key in config_keys():
        assert key in message


def test_unknown_key_suggestion_is_the_close_match() -> None:
    """The suggestion is the nearest valid key."""
    with pytest.raises(ConfigError, match="Did you mean 'batch_size'"):
        build_config(None, parse_overrides(["--bach_size=3"]))


def test_unknown_key_without_close_match() -> None:
    """No suggestion is made when nothing is close, but the valid keys are still listed."""
    with pytest.raises(ConfigError) as err:
        build_config(None, {"zzzzzzzz": 1})
    assert "Did you mean" not in str(err.value)
    assert "Valid keys" in str(err.value)


# ---------------------------------------------------------------------------------------- removed keys


def _old_run_config(path: Path, **changes: object) -> Path:
    """A run folder's config.yaml as the trainer wrote it before ``unfreeze_warmup`` was removed."""
    values = {**TrainConfig(embedding_dim=50, mixed_precision="no").to_dict(), "unfreeze_warmup": 0.0, **changes}
    return write_yaml(path, values)


def test_removed_key_at_its_no_op_value_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An old run's config.yaml holding ``unfreeze_warmup: 0.0`` (the value that changed nothing) builds the same
    config as without the key, with one warning; so does the key as a flag or a dict value (0 too)."""
    assert REMOVED_KEYS["unfreeze_warmup"][0] == 0.0
    expected = TrainConfig(embedding_dim=50, mixed_precision="no")
    path = _old_run_config(tmp_path / "config.yaml")
    with caplog.at_level(logging.WARNING, logger="sentiment"):
        assert build_config(path) == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("unfreeze_warmup was removed; its value 0.0 changed nothing, ignored")
    assert str(path) in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sentiment"):  # in the file and the flags: still one warning
        cfg = build_config(*parse_command_line(["--config", str(path), "--unfreeze_warmup=0", "--hidden_dim=7"]))
    assert cfg == dataclasses.replace(expected, hidden_dim=7)
    assert [r.getMessage() for r in caplog.records].count(warnings[0].replace(str(path), "the command-line flags")) == 1
    assert len(caplog.records) == 1
    assert build_config(None, {"unfreeze_warmup": 0}) == TrainConfig()
    assert not hasattr(cfg, "unfreeze_warmup") and "unfreeze_warmup" not in cfg.to_dict()


@pytest.mark.parametrize("value", [0.5, 1, "abc", True])
def test_removed_key_at_another_value_is_refused(tmp_path: Path, value: object) -> None:
    """``unfreeze_warmup`` at any other value asks for what the trainer no longer does: a ConfigError naming the
    key, the value, where it came from, that it was removed and what to do; from a YAML file, a flag or a dict."""
    path = _old_run_config(tmp_path / "config.yaml", unfreeze_warmup=value)
    flag = "true" if value is True else str(value)
    for source, build in (
        (str(path), lambda: build_config(path)),
        ("the command-line flags", lambda: build_config(*parse_command_line([f"--unfreeze_warmup={flag}"]))),
        ("the command-line flags", lambda: build_config(None, {"unfreeze_warmup": value})),
    ):
        with pytest.raises(ConfigError) as refused:
            build()
        message = str(refused.value)
        assert f"config key 'unfreeze_warmup' ({flag}, in {source}) was removed" in message
        assert "no longer ramps up the lr of the layers gradual_unfreezing unfreezes" in message
        assert "Drop the key (at 0.0 it changed nothing and is ignored)" in message
        assert "unknown config key" not in message


def test_removed_key_is_not_listed_as_a_key() -> None:
    """A removed key is no config key: not in ``--help``, not a field, not among the valid keys of an unknown-key
    error, and commands with a subset of the keys (``sentiment evaluate``) do not take its flag."""
    assert "unfreeze_warmup" not in config_keys()
    assert "unfreeze_warmup" not in config_parser(prog="sentiment train").format_help()
    with pytest.raises(ConfigError) as err:
        build_config(None, {"unfreeze_warmu": 0.0})
    assert "unknown config key 'unfreeze_warmu'" in str(err.value) and "'unfreeze_warmup'" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key 'unfreeze_warmup'"):
        parse_command_line(["--unfreeze_warmup=0.0"], config_parser(keys=["dataset"]))


# -------------------------------------------------------------------------------------- derived values


def test_validation_fraction_defaults_by_scheme() -> None:
    """Standard holds out 10% of train; the report's seed scheme 30% of test."""
    assert TrainConfig(split_scheme="standard").validation_fraction == pytest.approx(0.1)
    assert TrainConfig(split_scheme="seed").validation_fraction == pytest.approx(0.3)


@pytest.mark.parametrize("scheme", ["standard", "seed"])
def test_explicit_valid_fraction_wins(scheme: str) -> None:
    """An explicit valid_fraction overrides the scheme's default."""
    cfg = build_config(None, {"split_scheme": scheme, "valid_fraction": 0.25})
    assert cfg.validation_fraction == pytest.approx(0.25)


def test_save_round_trip(tmp_path: Path) -> None:
    """``save`` writes YAML that ``build_config`` reads back to an equal config."""
    cfg = build_config(None, parse_overrides(["--hidden_dim=12", "--lr=3e-4", "--split_scheme=seed"]))
    cfg.save(tmp_path / "saved.yaml")
    assert build_config(tmp_path / "saved.yaml") == cfg


# ------------------------------------------------------------------------------------- shipped configs


TRAINING_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("sweep_"))


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    """Every training config in configs/ loads, and holds exactly the values it writes (sweep files are tested
    in test_sweep.py)."""
    cfg = build_config(path)
    for key, value in yaml.safe_load(path.read_text()).items():
        assert getattr(cfg, key) == value


def test_shipped_configs_exist() -> None:
    """The report's configs are shipped."""
    assert {"lstm.yaml", "bilstm.yaml"} <= {p.name for p in CONFIGS.glob("*.yaml")}


# ------------------------------------------------------------------------------------------ YAML 1.1 quirks


def test_yaml_no_stays_the_string_no(tmp_path: Path) -> None:
    """YAML 1.1 reads ``mixed_precision: no`` as false; the key still gets the choice "no" (file, flag, dict)."""
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\nlr: 1e-3\n")
    assert yaml.safe_load(path.read_text())["mixed_precision"] is False  # the case being tested
    assert build_config(path).mixed_precision == "no"
    assert build_config(None, parse_overrides(["--mixed_precision=no"])).mixed_precision == "no"
    assert build_config(None, {"mixed_precision": False}).mixed_precision == "no"


# ------------------------------------------------------------------------------------------ mixed precision


def test_mixed_precision_defaults_to_the_launchers_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key: ``accelerate launch --mixed_precision bf16`` (ACCELERATE_MIXED_PRECISION) decides; without a
    launcher, "no". A key set in the config or a flag wins over the launcher."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert TrainConfig().mixed_precision is None
    assert TrainConfig().resolve_mixed_precision().mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert build_config().resolve_mixed_precision().mixed_precision == "bf16"
    explicit = build_config(None, parse_overrides(["--mixed_precision=no"]))
    assert explicit.resolve_mixed_precision().mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION is 'fp8'"):
        build_config().resolve_mixed_precision()


# ---------------------------------------------------------------------------------------------------- --help


def test_every_key_has_a_group_and_a_one_line_help() -> None:
    """Each field documents itself for ``--help``: a known group and one short line."""
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata["group"] in GROUPS, field.name
        text = field.metadata["help"]
        assert text and "\n" not in text and len(text) <= 80, field.name


def test_help_groups_every_key_with_its_help_and_default() -> None:
    """``--help`` lists every key once, under its group's heading, with its help and its default."""
    text = config_parser(prog="sentiment train").format_help()
    flat = " ".join(text.split())  # the formatter wraps lines at the terminal's width
    headings = [text.index(f"\n{group}:\n") for group in GROUPS]
    assert headings == sorted(headings)
    for field in dataclasses.fields(TrainConfig):
        assert text.count(f"--{field.name} ") == 1, field.name
        after = text.index(f"\n{field.metadata['group']}:\n")
        assert text.index(f"--{field.name} ") > after
    assert "--hidden_dim INT LSTM hidden size per direction (default: 100)" in flat
    assert "--bidirectional [BOOL] BiLSTM: read reviews in both directions (default: false)" in flat
    assert "--pooling {last,max,mean,concat}" in flat
    assert "--max_grad_norm FLOAT|null clip gradients to this norm; null: no clipping (default: null)" in flat
    assert (
        "--embedding_dim INT|null embedding size; with vectors leave out (it follows them); none: 100 unless set "
        "(default: null)"
    ) in flat
    assert "--config FILE" in flat


def test_help_exits_zero() -> None:
    """``--help`` prints and exits with 0 (argparse's SystemExit), not a config error."""
    with pytest.raises(SystemExit) as done:
        parse_command_line(["--help"])
    assert done.value.code == 0
