"""The ``sentiment`` command: ``train`` and ``prepare``. ``scripts/train.py`` is ``sentiment train`` for
``accelerate launch``.

Options are the config's own keys as ``--key=value`` (or ``--key value``), on top of ``--config FILE``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from sentiment.config import ConfigError, TrainConfig, build_config, config_keys, parse_command_line

USAGE = """usage: sentiment COMMAND [--config FILE] [--key=value ...]

commands:
  train     train an LSTM/BiLSTM (also: accelerate launch scripts/train.py ...)
  prepare   tokenize, encode and save the splits, tokenizer.json and embeddings to --output_dir,
            for training elsewhere with --prepared DIR
  sweep     SWEEP.yaml [--count N] [--workers N] [--gpus N] [--storage URL] [--sweep_dir DIR] [--sampler_seed N]
            [--key=value ...]: run (or continue) a W&B sweep file offline with Optuna
  report    SWEEP_DIR [--storage URL]: regenerate a sweep's table (CSV, Markdown) and plots

config keys: {keys}
"""


def _config_from_args(args: list[str]) -> TrainConfig:
    return build_config(*parse_command_line(args))


def _setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_main(args: list[str]) -> int:
    """``sentiment train`` / ``scripts/train.py``."""
    from sentiment.training import train

    train(_config_from_args(args))
    return 0


def prepare_main(args: list[str]) -> int:
    """``sentiment prepare``: write the prepared data folder to ``--output_dir``."""
    from sentiment.prepare import prepare_data

    cfg = _config_from_args(args)
    if cfg.output_dir is None:
        raise ConfigError("sentiment prepare needs --output_dir DIR, the folder to write the prepared data to")
    folder = prepare_data(cfg).save(cfg.output_dir)
    logging.getLogger("sentiment").info("prepared data written to %s", folder)
    return 0


SWEEP_OPTIONS = {"count": int, "workers": int, "gpus": int, "storage": str, "sweep_dir": str, "sampler_seed": int}


def _take_options(args: list[str], options: dict[str, type]) -> tuple[dict[str, object], list[str]]:
    """Split ``args`` into the command's own ``--option value`` pairs and the rest (config overrides)."""
    taken: dict[str, object] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        name, _, value = args[i][2:].partition("=")
        if args[i].startswith("--") and name in options:
            if not value:
                if i + 1 >= len(args):
                    raise ConfigError(f"--{name} needs a value")
                value = args[i + 1]
                i += 1
            try:
                taken[name] = options[name](value)
            except ValueError:
                raise ConfigError(f"--{name} must be {options[name].__name__} (got {value!r})") from None
        else:
            rest.append(args[i])
        i += 1
    return taken, rest


def sweep_main(args: list[str]) -> int:
    """``sentiment sweep SWEEP.yaml``: an offline sweep; ends with its table and plots."""
    from sentiment.sweep import run_sweep

    if not args or args[0].startswith("--"):
        raise ConfigError("usage: sentiment sweep SWEEP.yaml [--count N] [--workers N] [--key=value ...]")
    options, rest = _take_options(args[1:], SWEEP_OPTIONS)
    if "sampler_seed" in options:
        options["seed"] = options.pop("sampler_seed")
    sweep_dir = run_sweep(args[0], extra_args=rest, **options)  # type: ignore[arg-type]
    print((sweep_dir / "results.md").read_text())
    return 0


def report_main(args: list[str]) -> int:
    """``sentiment report SWEEP_DIR``: regenerate a sweep's results table and plots."""
    from sentiment.sweep_report import write_report

    if not args or args[0].startswith("--"):
        raise ConfigError("usage: sentiment report SWEEP_DIR [--storage URL]")
    options, rest = _take_options(args[1:], {"storage": str})
    if rest:
        raise ConfigError(f"unexpected arguments {rest}")
    write_report(args[0], storage=options.get("storage"))  # type: ignore[arg-type]
    print((Path(args[0]) / "results.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sentiment`` command."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "prepare": prepare_main, "sweep": sweep_main, "report": report_main}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(
            USAGE.format(keys=", ".join(config_keys())),
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _setup_logging()
    try:
        return commands[argv[0]](argv[1:])
    except (ConfigError, ValueError, FileNotFoundError) as err:
        if not isinstance(err, ConfigError) and type(err).__module__.split(".")[0] != "sentiment":
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
