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
  pretrain  train the embedding + LSTM as a language model on train + unlabelled reviews (with_unsupervised),
            for a classifier to start from with --init_from RUN/best (configs/pretrain_lm.yaml)
  sweep     SWEEP.yaml [--count N] [--workers N] [--gpus N] [--storage URL] [--sweep_dir DIR] [--sampler_seed N]
            [--stop_after SECONDS] [--key=value ...]: run (or continue) a W&B sweep file offline with Optuna
            (no trial starts after --stop_after seconds; running trials finish)
  report    SWEEP_DIR [--storage URL]: regenerate a sweep's table (CSV, Markdown) and plots
  predict   --model PATH_OR_ID ["text" ...] [--input F.txt|.jsonl|.csv --output F.jsonl|.csv] [--batch_size N]
            [--device D]: label and probability per review (--model A,B: the checkpoints' mean probability)
  evaluate  --model PATH_OR_ID [--split test|validation|train] [--output F.json] [--logits F.npz] [data keys:
            --dataset, --split_scheme, --split_seed, --valid_fraction, --max_eval_samples ..., or --prepared DIR]:
            loss, accuracy, precision, recall, F1 and confusion matrix on a labelled split (--logits: each
            review's logit and label, as training runs save them, for scripts/ensemble.py; --model A,B: an ensemble)
  push      RUN_DIR|CHECKPOINT_DIR --repo_id USER/NAME [--private] [--revision BRANCH] [--commit_message MSG]:
            write the model card and upload the checkpoint to the Hugging Face Hub in one commit

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
    from sentiment.training import SaveError, TrainingStopped, train

    try:
        train(_config_from_args(args))
    except TrainingStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        return 130
    except SaveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def pretrain_main(args: list[str]) -> int:
    """``sentiment pretrain``: language-model pretraining (sentiment/pretrain.py)."""
    from sentiment.pretrain import pretrain

    pretrain(_config_from_args(args))
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


SWEEP_OPTIONS = {
    "count": int,
    "workers": int,
    "gpus": int,
    "storage": str,
    "sweep_dir": str,
    "sampler_seed": int,
    "stop_after": float,
}


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


PREDICT_OPTIONS = {"model": str, "input": str, "output": str, "batch_size": int, "device": str}


def predict_main(args: list[str]) -> int:
    """``sentiment predict``: score texts given on the command line or in a file."""
    from sentiment.predict import load_classifier, read_texts, write_predictions

    options, texts = _take_options(args, PREDICT_OPTIONS)
    if "model" not in options:
        raise ConfigError(
            "sentiment predict needs --model PATH_OR_HUB_ID (a checkpoint such as runs/NAME/best; several joined by "
            "commas score as an ensemble)"
        )
    if options.get("input"):
        if texts:
            raise ConfigError("give reviews either as arguments or with --input FILE, not both")
        texts = read_texts(str(options["input"]))
    elif not texts:
        raise ConfigError('nothing to score: pass reviews as arguments ("A great film.") or --input FILE')
    classifier = load_classifier(str(options["model"]), device=options.get("device"))
    if "batch_size" in options:
        classifier.batch_size = int(options["batch_size"])  # type: ignore[arg-type]
    predictions = classifier(texts, progress=bool(options.get("input")))
    if options.get("output"):
        path = write_predictions(str(options["output"]), texts, predictions)
        logging.getLogger("sentiment").info("%d predictions written to %s", len(predictions), path)
    else:
        for text, prediction in zip(texts, predictions, strict=True):
            short = text if len(text) <= 60 else text[:57] + "..."
            print(f"{prediction['label']}\t{prediction['score']:.4f}\t{short}")
    return 0


def evaluate_main(args: list[str]) -> int:
    """``sentiment evaluate``: metrics of a checkpoint on a labelled split, split as the trainer splits."""
    import json

    from sentiment.predict import classification_metrics, load_classifier, logits_of_prepared, write_logits
    from sentiment.prepare import PreparedData

    options, rest = _take_options(args, {"model": str, "split": str, "output": str, "device": str, "logits": str})
    if "model" not in options:
        raise ConfigError("sentiment evaluate needs --model PATH_OR_HUB_ID (several joined by commas: an ensemble)")
    split = str(options.get("split", "test"))
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"--split must be train, validation or test (got {split!r})")
    cfg = _config_from_args(rest)
    classifier = load_classifier(str(options["model"]), device=options.get("device"))
    if cfg.prepared:  # token ids made by `sentiment prepare`: no spaCy or datasets needed
        prepared = PreparedData.load(cfg.prepared)
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
    if options.get("logits"):
        write_logits(str(options["logits"]), logits, labels)
    matrix = metrics["confusion_matrix"]
    print(f"{split}: {metrics['count']} reviews of {source}")
    for key in ("loss", "accuracy", "precision", "recall", "f1"):
        print(f"  {key:<9} {metrics[key]:.4f}")
    print("  confusion matrix (rows: true, columns: predicted)")
    print("             neg      pos")
    print(f"  neg   {matrix['true_neg']['pred_neg']:>7}  {matrix['true_neg']['pred_pos']:>7}")
    print(f"  pos   {matrix['true_pos']['pred_neg']:>7}  {matrix['true_pos']['pred_pos']:>7}")
    if options.get("output"):
        Path(str(options["output"])).write_text(json.dumps({"split": split, **metrics}, indent=2))
    return 0


def push_main(args: list[str]) -> int:
    """``sentiment push RUN_OR_CHECKPOINT --repo_id ID``: write the card naming the repo, push in one commit."""
    from sentiment.hub import push_checkpoint, write_model_card

    private = "--private" in args
    options, rest = _take_options(
        [a for a in args if a != "--private"], {"repo_id": str, "revision": str, "commit_message": str}
    )
    if len(rest) != 1 or rest[0].startswith("--") or "repo_id" not in options:
        raise ConfigError(
            "usage: sentiment push RUN_DIR|CHECKPOINT_DIR --repo_id USER/NAME [--private] [--revision BRANCH] "
            "[--commit_message MSG]"
        )
    path = Path(rest[0])
    checkpoint = path / "best" if (path / "best").is_dir() else path
    run_dir = checkpoint.parent if (checkpoint.parent / "config.yaml").is_file() else None
    if (checkpoint / "model.safetensors").is_file():  # the card's example names the repo, not the local path
        write_model_card(checkpoint, run_dir, repo_id=str(options["repo_id"]))
    url = push_checkpoint(
        checkpoint,
        str(options["repo_id"]),
        private=private,
        revision=options.get("revision"),  # type: ignore[arg-type]
        commit_message=options.get("commit_message"),  # type: ignore[arg-type]
    )
    print(url)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sentiment`` command."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "train": train_main,
        "prepare": prepare_main,
        "pretrain": pretrain_main,
        "sweep": sweep_main,
        "report": report_main,
        "predict": predict_main,
        "evaluate": evaluate_main,
        "push": push_main,
    }
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
