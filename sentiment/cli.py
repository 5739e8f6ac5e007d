"""The ``sentiment`` command: ``train``, ``prepare``, ``pretrain``, ``sweep``, ``report``, ``predict``, ``evaluate``
and ``push``. ``scripts/train.py`` is ``sentiment train`` for ``accelerate launch``.

The trainer's options are the config's own keys as ``--key=value`` (or ``--key value``), on top of ``--config
FILE``; their parser, with its ``--help``, comes from ``TrainConfig`` (sentiment/config.py). Every command answers
``--help``.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ArgumentParser

from sentiment.config import (
    ConfigError,
    KeepsDefaultWhole,
    TrainConfig,
    build_config,
    config_parser,
    parse_command_line,
)

COMMANDS = {
    "train": "train a classifier (or: accelerate launch scripts/train.py ...)",
    "prepare": "tokenize and encode the data once, for training with --prepared DIR",
    "pretrain": "pretrain the embedding + LSTM as a language model, for --init_from",
    "sweep": "run (or continue) a W&B sweep file offline with Optuna",
    "report": "regenerate a sweep's results table and plots",
    "predict": "label reviews with a trained checkpoint",
    "evaluate": "a checkpoint's metrics on a labelled split, split as in training",
    "push": "upload a checkpoint and its model card to the Hugging Face Hub",
}

USAGE = "usage: sentiment COMMAND [--help] [OPTIONS]\n\nLSTM and BiLSTM sentiment classifiers for IMDB.\n\ncommands:\n"
USAGE += "".join(f"  {name:<9} {summary}\n" for name, summary in COMMANDS.items())
USAGE += """
Run 'sentiment COMMAND --help' for a command's options. train, prepare and
pretrain take the config keys: --config FILE (YAML, e.g. configs/bilstm.yaml)
and --key=value flags on top of it.
"""

FLAGS_HELP = (
    "Flags: --key=value or --key value; a bare boolean flag is true (--resume) and --resume=false turns it off; "
    "null (or None) unsets an optional key. Flags override the --config file. The keys are the same in YAML "
    "configs, sweep files, the wandb run config and a run's config.yaml."
)

DESCRIPTIONS = {
    "train": "Train an LSTM/BiLSTM sentiment classifier. The run folder gets config.yaml (what ran), best/, state/, "
    "metrics.json and curves.png.",
    "prepare": "Tokenize, encode and save the splits, tokenizer.json and the embeddings to --output_dir, for "
    "training elsewhere with --prepared DIR (the data and vectors keys apply).",
    "pretrain": "Pretrain the embedding + LSTM as a language model on the training and unlabelled reviews "
    "(with_unsupervised), for a classifier to start from with --init_from RUN/best (configs/pretrain_lm.yaml).",
}

# The config keys `sentiment evaluate` takes: those that choose the split it scores.
EVALUATE_KEYS = (
    "dataset",
    "prepared",
    "split_scheme",
    "split_seed",
    "valid_fraction",
    "max_train_samples",
    "max_eval_samples",
)


class CommandParser(argparse.ArgumentParser):
    """The parser of a command's own options: no abbreviations, a usage error is a ConfigError (exit code 2)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, formatter_class=_OptionsFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise the usage error as a ConfigError naming the command's ``--help``."""
        raise ConfigError(f"{message} (see {self.prog} --help)")


class _OptionsFormatter(KeepsDefaultWhole, argparse.HelpFormatter):
    """Options with a default other than None say it."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("max_help_position", 30)
        super().__init__(prog, **kwargs)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.option_strings and not any(action.default is x for x in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def _trainer_config(command: str, args: list[str], prog: str) -> TrainConfig:
    """The config of a ``train`` / ``prepare`` / ``pretrain`` command line (``--help`` prints the keys)."""
    parser = config_parser(prog=prog, description=DESCRIPTIONS[command], epilog=FLAGS_HELP)
    return build_config(*parse_command_line(args, parser))


def _setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_main(args: list[str], prog: str = "sentiment train") -> int:
    """``sentiment train`` / ``scripts/train.py``."""
    cfg = _trainer_config("train", args, prog)
    from sentiment.checkpoint import SaveError
    from sentiment.training import TrainingStopped, train

    try:
        train(cfg)
    except TrainingStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        return 130
    except SaveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def pretrain_main(args: list[str], prog: str = "sentiment pretrain") -> int:
    """``sentiment pretrain``: language-model pretraining (sentiment/pretrain.py)."""
    cfg = _trainer_config("pretrain", args, prog)
    from sentiment.pretrain import pretrain

    pretrain(cfg)
    return 0


def prepare_main(args: list[str], prog: str = "sentiment prepare") -> int:
    """``sentiment prepare``: write the prepared data folder to ``--output_dir``."""
    cfg = _trainer_config("prepare", args, prog)
    from sentiment.prepare import prepare_data

    if cfg.output_dir is None:
        raise ConfigError("sentiment prepare needs --output_dir DIR, the folder to write the prepared data to")
    folder = prepare_data(cfg).save(cfg.output_dir)
    logging.getLogger("sentiment").info("prepared data written to %s", folder)
    return 0


def _sweep_parser(prog: str) -> CommandParser:
    parser = CommandParser(
        prog=prog,
        usage="%(prog)s SWEEP.yaml [--count N] [--workers N] [--gpus N]\n"
        "       [--storage URL] [--sweep_dir DIR] [--sampler_seed N]\n"
        "       [--stop_after SECONDS] [--KEY=VALUE ...]",
        description="Run (or continue) a W&B sweep file offline with Optuna: each trial is a training run, and the "
        "sweep ends with its results table and plots. The study lives in a database, so a stopped sweep continues "
        "where it was.",
        epilog="Any other --KEY=VALUE is a trainer config key (see sentiment train --help), applied to every trial "
        "on top of the sweep command's --config.",
    )
    parser.add_argument("sweep_file", metavar="SWEEP.yaml", help="W&B sweep file, e.g. configs/sweep_bilstm.yaml")
    parser.add_argument("--count", type=int, metavar="N", help="trials in all (else run_cap, or the grid's size)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes sharing the study")
    parser.add_argument("--gpus", type=int, metavar="N", help="worker i sees only GPU i mod N")
    parser.add_argument("--storage", metavar="URL", help="Optuna storage (else SQLite in the sweep folder)")
    parser.add_argument("--sweep_dir", metavar="DIR", help="the sweep's folder (else sweeps/NAME)")
    parser.add_argument("--sampler_seed", type=int, default=0, metavar="N", help="seed of the Optuna sampler")
    parser.add_argument(
        "--stop_after", type=float, metavar="SECONDS", help="start no trial after this (running trials finish)"
    )
    return parser


def sweep_main(args: list[str], prog: str = "sentiment sweep") -> int:
    """``sentiment sweep SWEEP.yaml``: an offline sweep; ends with its table and plots."""
    options, trainer_args = _sweep_parser(prog).parse_known_args(args)
    if args[0] != options.sweep_file:
        raise ConfigError(f"give the sweep file first: {prog} SWEEP.yaml [OPTIONS] (see {prog} --help)")
    from sentiment.sweep import run_sweep

    sweep_dir = run_sweep(
        options.sweep_file,
        count=options.count,
        workers=options.workers,
        sweep_dir=options.sweep_dir,
        storage=options.storage,
        extra_args=trainer_args,
        gpus=options.gpus,
        seed=options.sampler_seed,
        stop_after=options.stop_after,
    )
    print((sweep_dir / "results.md").read_text())
    return 0


def report_main(args: list[str], prog: str = "sentiment report") -> int:
    """``sentiment report SWEEP_DIR``: regenerate a sweep's results table and plots."""
    parser = CommandParser(
        prog=prog,
        description="Regenerate a sweep's results.csv, results.md and plots from its study, and print the table.",
    )
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep's folder (holds sweep.json)")
    parser.add_argument("--storage", metavar="URL", help="Optuna storage (else the one sweep.json names)")
    options = parser.parse_args(args)
    from sentiment.sweep_report import write_report

    write_report(options.sweep_dir, storage=options.storage)
    print((Path(options.sweep_dir) / "results.md").read_text())
    return 0


MODEL_HELP = "checkpoint folder (runs/NAME/best) or hub id; A,B: an ensemble (mean probability)"


def predict_main(args: list[str], prog: str = "sentiment predict") -> int:
    """``sentiment predict``: score texts given on the command line or in a file."""
    parser = CommandParser(
        prog=prog,
        usage='%(prog)s --model PATH_OR_ID ["REVIEW" ...]\n'
        "       [--input FILE] [--output FILE] [--batch_size N] [--device D]",
        description="Label reviews (pos or neg) with the probability of that label: reviews given as arguments "
        "are printed, one per line; --input FILE is read and --output FILE written.",
    )
    parser.add_argument("texts", nargs="*", metavar="REVIEW", help="a review to score")
    parser.add_argument("--model", metavar="PATH_OR_ID", help=MODEL_HELP)
    parser.add_argument("--input", metavar="FILE", help="reviews to score: .txt (one per line), .jsonl or .csv")
    parser.add_argument("--output", metavar="FILE", help="write the predictions: .jsonl or .csv")
    parser.add_argument("--batch_size", type=int, metavar="N", help="reviews per batch (else 256)")
    parser.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1, ... (else cuda where there is one)")
    options = parser.parse_intermixed_args(args)
    if options.model is None:
        raise ConfigError(
            "sentiment predict needs --model PATH_OR_HUB_ID (a checkpoint such as runs/NAME/best; several joined by "
            "commas score as an ensemble)"
        )
    from sentiment.predict import load_classifier, read_texts, write_predictions

    texts = list(options.texts)
    if options.input:
        if texts:
            raise ConfigError("give reviews either as arguments or with --input FILE, not both")
        texts = read_texts(options.input)
    elif not texts:
        raise ConfigError('nothing to score: pass reviews as arguments ("A great film.") or --input FILE')
    classifier = load_classifier(options.model, device=options.device)
    if options.batch_size is not None:
        classifier.batch_size = options.batch_size
    predictions = classifier(texts, progress=bool(options.input))
    if options.output:
        path = write_predictions(options.output, texts, predictions)
        logging.getLogger("sentiment").info("%d predictions written to %s", len(predictions), path)
    else:
        for text, prediction in zip(texts, predictions, strict=True):
            short = text if len(text) <= 60 else text[:57] + "..."
            print(f"{prediction['label']}\t{prediction['score']:.4f}\t{short}")
    return 0


def _evaluate_parser(prog: str) -> ArgumentParser:
    parser = config_parser(
        prog=prog,
        description="Loss, accuracy, precision, recall, F1 and the confusion matrix of a checkpoint on a labelled "
        "split, split exactly as the trainer splits (the data keys below, or --prepared DIR).",
        keys=EVALUATE_KEYS,
        usage="%(prog)s --model PATH_OR_ID [--split SPLIT] [--output F.json]\n"
        "       [--logits F.npz] [--device D] [--config FILE] [--KEY=VALUE ...]",
        epilog=FLAGS_HELP,
    )
    own = parser.add_argument_group("evaluation")
    own.add_argument("--model", type=str, metavar="PATH_OR_ID", help=MODEL_HELP)
    own.add_argument("--split", choices=("test", "validation", "train"), default="test", help="split to score")
    own.add_argument("--output", type=str, metavar="F.json", help="write the figures as JSON")
    own.add_argument(
        "--logits", type=str, metavar="F.npz", help="save each review's logit and label (for scripts/ensemble.py)"
    )
    own.add_argument("--device", type=str, metavar="D", help="cpu, cuda, ... (else cuda where there is one)")
    return parser


def evaluate_main(args: list[str], prog: str = "sentiment evaluate") -> int:
    """``sentiment evaluate``: metrics of a checkpoint on a labelled split, split as the trainer splits."""
    config_path, values = parse_command_line(args, _evaluate_parser(prog))
    options = {name: values.pop(name, None) for name in ("model", "split", "output", "logits", "device")}
    split = options["split"] or "test"
    if options["model"] is None:
        raise ConfigError("sentiment evaluate needs --model PATH_OR_HUB_ID (several joined by commas: an ensemble)")
    cfg = build_config(config_path, values)
    import json

    from sentiment.predict import classification_metrics, load_classifier, logits_of_prepared, write_logits
    from sentiment.prepare import PreparedData

    classifier = load_classifier(options["model"], device=options["device"])
    if cfg.prepared:  # token ids made by `sentiment prepare`: no spaCy or datasets needed
        prepared = PreparedData.load(cfg.prepared)
        prepared.resolve(cfg)  # max_eval_samples cuts the folder's splits as it cuts raw data
        source = prepared.info["dataset"]
        logits = logits_of_prepared(classifier, prepared.splits[split], prepared.tokenizer)
        labels = prepared.splits[split].labels.tolist()
    else:
        from sentiment.data import load_imdb, split_imdb

        source = cfg.dataset
        splits = split_imdb(
            load_imdb(cfg.dataset),
            scheme=cfg.split_scheme,
            valid_fraction=cfg.validation_fraction,
            seed=cfg.split_seed,
            max_train_samples=cfg.max_train_samples,
            max_eval_samples=cfg.max_eval_samples,
        )
        logits = classifier.logits(splits[split]["text"], progress=True)
        labels = list(splits[split]["label"])
    metrics = classification_metrics(logits, labels)
    if options["logits"]:
        write_logits(options["logits"], logits, labels)
    matrix = metrics["confusion_matrix"]
    print(f"{split}: {metrics['count']} reviews of {source}")
    for key in ("loss", "accuracy", "precision", "recall", "f1"):
        print(f"  {key:<9} {metrics[key]:.4f}")
    print("  confusion matrix (rows: true, columns: predicted)")
    print("             neg      pos")
    print(f"  neg   {matrix['true_neg']['pred_neg']:>7}  {matrix['true_neg']['pred_pos']:>7}")
    print(f"  pos   {matrix['true_pos']['pred_neg']:>7}  {matrix['true_pos']['pred_pos']:>7}")
    if options["output"]:
        Path(options["output"]).write_text(json.dumps({"split": split, **metrics}, indent=2))
    return 0


def push_main(args: list[str], prog: str = "sentiment push") -> int:
    """``sentiment push RUN_OR_CHECKPOINT --repo_id ID``: write the card naming the repo, push in one commit."""
    parser = CommandParser(
        prog=prog,
        description="Write the model card and upload a checkpoint (model.safetensors, config.json, tokenizer.json, "
        "README.md) to a Hugging Face Hub model repository in one commit; prints the commit's URL.",
    )
    parser.add_argument("path", metavar="RUN_DIR|CHECKPOINT_DIR", help="a run folder (its best/) or a checkpoint")
    parser.add_argument("--repo_id", metavar="USER/NAME", help="the model repository (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", metavar="BRANCH", help="branch to commit to (else main)")
    parser.add_argument("--commit_message", metavar="MSG", help="the commit's message")
    options = parser.parse_args(args)
    if not options.repo_id:
        raise ConfigError(f"sentiment push needs --repo_id USER/NAME, the repository to push to (see {prog} --help)")
    from sentiment.hub import push_checkpoint, write_model_card

    path = Path(options.path)
    checkpoint = path / "best" if (path / "best").is_dir() else path
    run_dir = checkpoint.parent if (checkpoint.parent / "config.yaml").is_file() else None
    if (checkpoint / "model.safetensors").is_file():  # the card's example names the repo, not the local path
        write_model_card(checkpoint, run_dir, repo_id=options.repo_id)
    url = push_checkpoint(
        checkpoint,
        options.repo_id,
        private=options.private,
        revision=options.revision,
        commit_message=options.commit_message,
    )
    print(url)
    return 0


MAINS: dict[str, Callable[..., int]] = {
    "train": train_main,
    "prepare": prepare_main,
    "pretrain": pretrain_main,
    "sweep": sweep_main,
    "report": report_main,
    "predict": predict_main,
    "evaluate": evaluate_main,
    "push": push_main,
}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of the ``sentiment`` command; returns the exit code (0 for ``--help``, 2 for a usage error).

    ``prog`` names the command in usage lines (``scripts/train.py`` passes its own path); by default
    ``sentiment COMMAND``.
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in MAINS:
        close = difflib.get_close_matches(argv[0], list(MAINS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"{USAGE}\nerror: unknown command '{argv[0]}'{hint}", file=sys.stderr)
        return 2
    if not any(arg in ("-h", "--help") for arg in argv[1:]):
        _setup_logging()
    try:
        return MAINS[argv[0]](argv[1:], prog=prog or f"sentiment {argv[0]}")
    except SystemExit as done:  # --help printed, or a parser gave up
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        if not isinstance(err, ConfigError) and type(err).__module__.split(".")[0] != "sentiment":
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
