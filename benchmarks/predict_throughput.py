"""Prediction throughput: reviews per second of ``SentimentClassifier`` on a batch of real IMDB test reviews.

    python benchmarks/predict_throughput.py --model runs/NAME/best --dataset ../shared/data/imdb \
        --reviews 1000 --repeats 3 --output benchmarks/results/predict_cpu.json

Times the whole call (spaCy pretokenization, encoding, length-sorted batches through the model) and, separately,
the pretokenization + encoding alone, as the median of ``--repeats`` runs after one warm-up. Writes JSON and a
Markdown line beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sentiment.data import load_imdb
from sentiment.predict import SentimentClassifier


def main() -> None:
    """Run the benchmark and write its results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--dataset", default="stanfordnlp/imdb")
    parser.add_argument("--reviews", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default="benchmarks/results/predict.json")
    args = parser.parse_args()

    test = load_imdb(args.dataset)["test"].shuffle(seed=0).select(range(args.reviews))
    texts = test["text"]
    classifier = SentimentClassifier.from_pretrained(args.model, device=args.device)
    classifier.batch_size = args.batch_size
    classifier(texts[:32])  # warm-up: spaCy, allocator, kernels

    def timed(function: Callable[[], object]) -> float:
        if classifier.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if classifier.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    total = statistics.median(timed(lambda: classifier(texts)) for _ in range(args.repeats))
    preprocessing = statistics.median(timed(lambda: classifier.encode(texts)) for _ in range(args.repeats))
    tokens = sum(len(x) for x in classifier.encode(texts))
    result = {
        "model": args.model,
        "config": json.loads((Path(args.model) / "config.json").read_text()) if Path(args.model).is_dir() else None,
        "reviews": len(texts),
        "tokens": tokens,
        "batch_size": args.batch_size,
        "device": str(classifier.device),
        "hardware": torch.cuda.get_device_name()
        if classifier.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": total,
        "reviews_per_second": len(texts) / total,
        "preprocessing_seconds": preprocessing,
        "model_seconds": total - preprocessing,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    line = (
        f"| {result['device']} ({result['cpu_count']} cores) | {len(texts)} | {total:.2f} s | "
        f"{result['reviews_per_second']:.0f} | {preprocessing:.2f} s | {total - preprocessing:.2f} s |"
    )
    output.with_suffix(".md").write_text(
        "| device | reviews | time | reviews/s | spaCy + encode | model |\n|---|---|---|---|---|---|\n" + line + "\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
