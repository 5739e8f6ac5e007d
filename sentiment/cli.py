"""The ``sentiment`` command: ``train`` and ``prepare``. ``scripts/train.py`` is ``sentiment train`` for
``accelerate launch``.

Options are the config's own keys as ``--key=value`` (or ``--key value``), on top of ``--config FILE``.
"""

from __future__ import annotations

import logging
import sys

from sentiment.config import ConfigError, TrainConfig, build_config, config_keys, parse_overrides

USAGE = """usage: sentiment COMMAND [--config FILE] [--key=value ...]

commands:
  train     train an LSTM/BiLSTM (also: accelerate launch scripts/train.py ...)
  prepare   tokenize, encode and save the splits, tokenizer.json and embeddings to --output_dir,
            for training elsewhere with --prepared DIR

config keys: {keys}
"""


def _config_from_args(args: list[str]) -> TrainConfig:
    config_path = None
    rest: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            config_path = args[i + 1]
            i += 2
            continue
        if args[i].startswith("--config="):
            config_path = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return build_config(config_path, parse_overrides(rest))


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sentiment`` command."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "prepare": prepare_main}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(
            USAGE.format(keys=", ".join(config_keys())),
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _setup_logging()
    try:
        return commands[argv[0]](argv[1:])
    except (ConfigError, ValueError) as err:
        if not isinstance(err, ConfigError) and type(err).__module__.split(".")[0] != "sentiment":
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
