"""The benchmark suite: one command, results as JSON + Markdown (rewritten after every measurement, so a run
cut short keeps what it measured).

    # here (spaCy, datasets): how fast raw IMDB becomes a prepared folder
    python -m benchmarks.suite --sections prepare --dataset ../shared/data/imdb --output benchmarks/results/cpu
    # on the GPU machine, from a prepared folder (`sentiment prepare --config configs/bilstm.yaml ...`)
    python -m benchmarks.suite --sections train,growth,predict --prepared prepared/imdb \
        --output benchmarks/results/h200
    # the report's 14-trial sweep: one GPU with 2 workers, then two GPUs with one worker each
    python -m benchmarks.suite --sections sweep --prepared prepared/imdb --sweep_settings 1x2,2x2

Sections:
  prepare  load + spaCy pretokenize + vocabulary + encode of train and test (50k reviews), cold (empty cache)
           then warm (cache hit); reviews per second.
  train    per config (lstm, bilstm) and execution path: seconds per training epoch (the last epochs, after
           warm-up and graph capture) and per validation pass, first-epoch seconds, CUDA-graph capture seconds,
           tokens per second, peak GPU memory, best validation and test accuracy; the plain loop of the report's
           recipe (benchmarks/plain_loop.py) on the same data, and the trainer's speed-up over it.
  growth   seconds per epoch of the default path against the number of training reviews and against max_length.
  predict  model throughput (reviews per second) on 1,000 test reviews already encoded, on this device.
  sweep    wall time of a whole offline sweep (`sentiment sweep`, default: the report's 14-trial LSTM sweep) for
           each GPUS x WORKERS setting, with the trials completed and failed and the epochs run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.kernel_flags import add_kernel_flags, apply_kernel_flags
from benchmarks.plain_loop import plain_loop
from sentiment.batching import EncodedSplit
from sentiment.config import build_config
from sentiment.prepare import MANIFEST, PreparedData

CONFIGS = {
    "lstm": "configs/lstm.yaml",
    "bilstm": "configs/bilstm.yaml",
    "best_lstm": "configs/best_lstm.yaml",
    "best_bilstm": "configs/best_bilstm.yaml",
}
PLAIN_LOOP_CONFIGS = ("lstm", "bilstm")  # the report's models, which the plain loop builds
PATHS = {  # the trainer's execution paths: config flags ("default": what the config does on this device)
    "default": {},
    "whole batches": {"max_step_tokens": None},  # no batch split into groups of rows: more memory
    "groups of 64k tokens": {"max_step_tokens": 65536},  # half the default group: less memory
    "groups of 256k tokens": {"max_step_tokens": 262144},  # twice the default group: fewer groups one after another
    "evaluation in 64k pieces": {"max_eval_tokens": 65536},  # less memory beside the graphs' pool
    "fused+graphs": {"rnn_input": "fused"},
    "fused": {"rnn_input": "fused", "cuda_graphs": False},
    "padded+graphs": {"rnn_input": "padded"},
    "padded": {"rnn_input": "padded", "cuda_graphs": False},
    "packed": {"rnn_input": "packed", "cuda_graphs": False},
    "persistent+graphs": {"rnn_input": "persistent"},  # the persistent LSTM kernel (sentiment/persistent.py)
    "persistent": {"rnn_input": "persistent", "cuda_graphs": False},
    "fused+graphs bf16": {"rnn_input": "fused", "mixed_precision": "bf16"},
    "padded+graphs bf16": {"rnn_input": "padded", "mixed_precision": "bf16"},
}


class Results:
    """Measurements, written to ``<output>.json`` and ``<output>.md`` after each one."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.data: dict[str, Any] = {"environment": environment(), "sections": {}}
        output.parent.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, row: dict[str, Any]) -> None:
        """Append ``row`` to ``section`` and rewrite both files."""
        self.data["sections"].setdefault(section, []).append(row)
        print(f"[{section}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        for suffix, text in ((".json", json.dumps(self.data, indent=2)), (".md", self.markdown())):
            path = self.output.with_suffix(suffix)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    def markdown(self) -> str:
        """Every section as a Markdown table."""
        env = self.data["environment"]
        lines = [f"# Benchmarks: {env['device']}", "", ", ".join(f"{k} {v}" for k, v in env.items()), ""]
        for section, rows in self.data["sections"].items():
            keys = list(dict.fromkeys(key for row in rows for key in row))
            lines += [f"## {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(row.get(key, "")) for key in keys) + " |" for row in rows]
            lines.append("")
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def environment() -> dict[str, Any]:
    """Hardware and versions."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    return {
        "device": device,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def derived_prepared(data: PreparedData, folder: Path, train_reviews: int | None, max_length: int | None) -> Path:
    """A prepared folder with the first ``train_reviews`` training reviews, every review cut to ``max_length``."""
    splits = {}
    for name, split in data.splits.items():
        count = len(split) if name != "train" or train_reviews is None else min(train_reviews, len(split))
        pieces = [split.token_ids[split.offsets[i] : split.offsets[i + 1]][:max_length] for i in range(count)]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
        splits[name] = EncodedSplit(np.concatenate(pieces).astype(np.int64), offsets, split.labels[:count].copy())
    info = {
        **data.info,
        "max_length": max_length,
        "sizes": {name: len(split) for name, split in splits.items()},
        "tokens": {name: int(split.lengths.sum()) for name, split in splits.items()},
    }
    return PreparedData(splits, data.tokenizer, data.embeddings, info).save(folder)


def train_run(
    prepared: Path,
    config: str,
    workdir: Path,
    keep_metrics: Path | None = None,
    budget_gib: float | None = None,
    **flags: Any,
) -> dict[str, Any]:
    """Run the trainer (in this process) and summarise its timing and figures; its metrics.json is also kept in
    ``keep_metrics`` when given. ``budget_gib``: the GPU memory the process may use (``set_per_process_memory_
    fraction``), to emulate a smaller card."""
    from sentiment.training import train

    cfg = build_config(
        config, {"prepared": str(prepared), "output_dir": str(workdir / "run"), "overwrite": True,
                 "report_to": "none", **flags},
    )  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if budget_gib is not None:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(budget_gib * 2**30 / total, 1.0))
    try:
        metrics = train(cfg)
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(1.0)
    if keep_metrics is not None:  # the run's own metrics.json, for docs/results (scripts/results_table.py)
        keep_metrics.mkdir(parents=True, exist_ok=True)
        name = "-".join([Path(config).stem, *(f"{k}_{v}" for k, v in sorted(flags.items()))]).replace("/", "_")
        (keep_metrics / f"{name}.metrics.json").write_text(json.dumps(metrics, indent=2))
    history = metrics["history"]
    steady = history[1:] or history
    tokens = json.loads((prepared / MANIFEST).read_text())["tokens"]["train"]
    epoch_seconds = statistics.mean(h["epoch_seconds"] for h in steady)
    graphs = metrics.get("cuda_graphs") or {}
    memory = metrics.get("memory") or {}
    return {
        "epochs": len(history),
        "s/epoch": epoch_seconds,
        # the memory plan (graph captures included) runs before the first epoch: counted with it here
        "first epoch s": history[0]["epoch_seconds"] + memory.get("plan_seconds", 0.0),
        "capture s": graphs.get("capture_seconds", 0.0),
        "graph shapes": graphs.get("shapes", 0),
        "eval s": statistics.mean(h["eval_seconds"] for h in steady),
        "tokens/s": tokens / epoch_seconds,
        "peak allocated GiB": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        "peak reserved GiB": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0,
        "memory plan": memory.get("plan", "cpu"),
        "plan reserved GiB": memory.get("plan_reserved_gib", 0.0),  # graphs' pool + model, before the first step
        # what the process still holds once training is over and the graphs' pool is freed
        "reserved after close GiB": graphs.get("reserved_after_close_gib", 0.0),
        "valid acc": metrics["valid_acc"],
        "test acc": metrics["test_acc"],
        "best epoch": metrics["best_epoch"],
    }


def section_prepare(results: Results, dataset: str) -> None:
    """Cold then warm preparation of train + test."""
    from sentiment.prepare import prepare_data

    with tempfile.TemporaryDirectory() as cache:
        os.environ["HF_DATASETS_CACHE"] = cache
        cfg = build_config(CONFIGS["bilstm"], {"dataset": dataset})
        for run in ("cold", "warm"):
            start = time.perf_counter()
            data = prepare_data(cfg, cache_dir=cache)
            seconds = time.perf_counter() - start
            reviews = sum(len(split) for split in data.splits.values())
            results.add("prepare", {"run": run, "reviews": reviews, "seconds": seconds, "reviews/s": reviews / seconds})


def section_train(
    results: Results,
    prepared: dict[str, Path],
    workdir: Path,
    configs: list[str],
    seeds: list[int],
    paths: list[str],
    other_epochs: int = 2,
    plain: bool = True,
    keep_metrics: Path | None = None,
    budgets: list[float] | None = None,
    label: str = "",
) -> None:
    """Each config: the plain loop (1 epoch; the report's models only), then each trainer path: the default one
    for every seed and the config's epochs, the others for the first seed and ``other_epochs`` epochs (0: the
    config's), then the default path under each memory budget of ``budgets`` (GiB, first seed). Every row
    carries the plain loop's s/epoch from this call and the peak reserved GPU memory; ``label`` follows each
    trainer row's path. ``prepared``: the folder of each config."""
    for name in configs:
        baseline = None
        if plain and name in PLAIN_LOOP_CONFIGS:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            baseline = plain_loop(PreparedData.load(prepared[name]), CONFIGS[name], epochs=1)["history"][-1]
            row = {"config": name, "path": "plain loop (report's recipe)", "epochs": 1}
            figures = {"s/epoch": baseline["epoch_seconds"], "eval s": baseline["eval_seconds"]}
            reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
            results.add("train", {**row, **figures, "peak reserved GiB": reserved, "valid acc": baseline["valid_acc"]})
        runs = [(path, seed, None) for path in paths for seed in (seeds if path == "default" else seeds[:1])]
        runs += [("default", seeds[0], budget) for budget in budgets or []]
        for path, seed, budget in runs:
            epochs = {"epochs": other_epochs} if path != "default" and other_epochs else {}
            shown = (path if budget is None else f"{path}, {budget:g} GiB budget") + label
            try:
                row = train_run(
                    prepared[name], CONFIGS[name], workdir, keep_metrics, budget, seed=seed, **PATHS[path], **epochs
                )
            except Exception as err:  # record it and go on with the other paths
                results.add("train", {"config": name, "path": shown, "seed": seed, "error": repr(err)[:300]})
                continue
            row = {"config": name, "path": shown, "seed": seed, **row}
            if baseline is not None:
                row["plain s/epoch"] = baseline["epoch_seconds"]
                row["speed-up"] = baseline["epoch_seconds"] / row["s/epoch"]
                row["first-epoch speed-up"] = baseline["epoch_seconds"] / row["first epoch s"]
            results.add("train", row)


def section_growth(results: Results, prepared: Path, workdir: Path, config: str) -> None:
    """Epoch time of the default path against training reviews, then against max_length."""
    data = PreparedData.load(prepared)
    sizes = [(1000, None), (5000, None), (10000, None), (None, None), (None, 128), (None, 256), (None, 512)]
    for reviews, max_length in sizes:
        folder = derived_prepared(data, workdir / "derived", reviews, max_length)
        row = train_run(folder, CONFIGS[config], workdir, epochs=2)
        shown = {k: row[k] for k in ("s/epoch", "first epoch s", "capture s", "graph shapes", "tokens/s")}
        size = {"train reviews": reviews or len(data.splits["train"]), "max_length": max_length or "full"}
        results.add("growth", {"config": config, **size, **shown})


def section_sweep(
    results: Results,
    prepared: Path,
    workdir: Path,
    sweep_file: str,
    count: int,
    settings: list[tuple[int, int]],
    extra_args: list[str] | None = None,
) -> None:
    """Run ``sweep_file`` (``count`` trials) once per (GPUs, workers) setting, from start to its report."""
    import csv

    from sentiment.sweep import run_sweep

    for gpus, workers in settings:
        folder = workdir / f"sweep-{gpus}gpu-{workers}w"
        started = time.perf_counter()
        run_sweep(
            sweep_file, count=count, workers=workers, sweep_dir=folder, gpus=gpus or None,
            extra_args=[f"--prepared={prepared}", "--report_to=none", *(extra_args or [])],
        )  # fmt: skip
        seconds = time.perf_counter() - started
        with (folder / "results.csv").open() as file:
            trials = list(csv.DictReader(file))
        states = [trial["state"] for trial in trials]
        row = {"sweep": Path(sweep_file).name, "GPUs": gpus, "workers": workers, "trials": len(trials)}
        row |= {"complete": states.count("COMPLETE"), "failed": states.count("FAIL")}
        row |= {"epochs": sum(int(trial["epochs_run"] or 0) for trial in trials), "wall s": seconds}
        results.add("sweep", {**row, "trials/min": 60 * states.count("COMPLETE") / seconds})


def section_predict(results: Results, prepared: Path, config: str, reviews: int = 1000) -> None:
    """Reviews per second of the model alone (ids already encoded), length-sorted batches of 256."""
    from sentiment.batching import make_dataloader
    from sentiment.model import LSTMClassifier

    data = PreparedData.load(prepared)
    cfg = build_config(CONFIGS[config])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab_size, pad_id = data.tokenizer.get_vocab_size(), data.info["pad_id"]
    model = LSTMClassifier(
        vocab_size, data.info["embedding_dim"], cfg.hidden_dim, cfg.n_layers, cfg.bidirectional, pad_id=pad_id
    )
    model.to(device).eval()
    test = data.splits["test"]
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(test), reviews, replace=False)
    pieces = [test.token_ids[test.offsets[i] : test.offsets[i + 1]] for i in chosen]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    subset = EncodedSplit(np.concatenate(pieces), offsets, test.labels[chosen])
    loader = make_dataloader(subset, 256, data.info["pad_id"], train=False)
    timings = []
    for _ in range(4):  # one warm-up, then the median of three
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in loader:
                model(batch["input_ids"].to(device), batch["lengths"]).cpu()
        timings.append(time.perf_counter() - start)
    seconds = statistics.median(timings[1:])
    row = {"config": config, "device": str(device), "reviews": reviews, "tokens": int(offsets[-1])}
    results.add("predict", {**row, "seconds": seconds, "reviews/s": reviews / seconds})


def _prepared_for(name: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """The prepared folder a config trains from: ``--prepared_lowercase`` for configs that lowercase."""
    if not build_config(CONFIGS[name]).lowercase:
        return Path(args.prepared)
    if not args.prepared_lowercase:
        parser.error(f"config {name} lowercases its words: pass --prepared_lowercase DIR (prepared with that config)")
    return Path(args.prepared_lowercase)


def main() -> None:
    """Run the chosen sections."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="train,growth,predict")
    parser.add_argument("--prepared", help="prepared data folder (train, growth, predict)")
    parser.add_argument(
        "--prepared_lowercase", help="prepared folder of the configs with lowercase: true (best_lstm, best_bilstm)"
    )
    parser.add_argument("--budgets", default="", help="GiB,...: also run the default path under these memory budgets")
    parser.add_argument("--dataset", default="stanfordnlp/imdb", help="raw IMDB (prepare)")
    parser.add_argument("--configs", default="lstm,bilstm")
    parser.add_argument("--seeds", default="42,43,44", help="seeds of the default path's full runs")
    parser.add_argument("--paths", default="default,fused,packed", help=f"trainer paths, of {', '.join(PATHS)}")
    parser.add_argument("--other_epochs", type=int, default=2, help="epochs of the non-default paths (0: config's)")
    parser.add_argument("--skip_plain", action="store_true", help="leave out the plain-loop baseline")
    parser.add_argument("--growth_config", default="bilstm")
    parser.add_argument("--keep_metrics", type=Path, help="also keep each trainer run's metrics.json in this folder")
    parser.add_argument("--sweep_file", default="configs/sweep_lstm.yaml")
    parser.add_argument("--sweep_count", type=int, default=14)
    parser.add_argument("--sweep_settings", default="1x2", help="GPUSxWORKERS,... (0 GPUs: CPU, no device pinning)")
    add_kernel_flags(parser)
    parser.add_argument("--output", default="benchmarks/results/suite")
    args = parser.parse_args()
    label = apply_kernel_flags(parser, args)
    sections = args.sections.split(",")
    if set(sections) - {"prepare", "train", "growth", "predict", "sweep"}:
        parser.error(f"unknown section in {args.sections}; choose from prepare, train, growth, predict, sweep")
    if set(sections) - {"prepare"} and not args.prepared:
        parser.error("--prepared DIR is needed (make one with `sentiment prepare`)")
    results = Results(Path(args.output))
    with tempfile.TemporaryDirectory() as workdir:
        for section in sections:
            if section == "prepare":
                section_prepare(results, args.dataset)
            elif section == "train":
                seeds = [int(s) for s in args.seeds.split(",")]
                paths = args.paths.split(",")
                if set(paths) - set(PATHS):
                    parser.error(f"unknown path in {args.paths}; choose from {', '.join(PATHS)}")
                configs = args.configs.split(",")
                if set(configs) - set(CONFIGS):
                    parser.error(f"unknown config in {args.configs}; choose from {', '.join(CONFIGS)}")
                folders = {name: _prepared_for(name, args, parser) for name in configs}
                budgets = [float(budget) for budget in args.budgets.split(",") if budget]
                section_train(
                    results, folders, Path(workdir), configs, seeds, paths,
                    args.other_epochs, not args.skip_plain, args.keep_metrics, budgets, label,
                )  # fmt: skip
            elif section == "sweep":
                try:
                    settings = [tuple(int(n) for n in item.split("x")) for item in args.sweep_settings.split(",")]
                except ValueError:
                    parser.error(f"--sweep_settings {args.sweep_settings!r}: write GPUSxWORKERS,... e.g. 1x2,2x2")
                section_sweep(results, Path(args.prepared), Path(workdir), args.sweep_file, args.sweep_count, settings)
            elif section == "growth":
                section_growth(results, Path(args.prepared), Path(workdir), args.growth_config)
            else:
                for config in args.configs.split(","):
                    section_predict(results, Path(args.prepared), config)


if __name__ == "__main__":
    main()
