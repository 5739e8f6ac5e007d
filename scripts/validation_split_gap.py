"""How far does each way of carving validation from IMDB's train split overestimate test accuracy?

IMDB's test reviews are of other movies than its training reviews (Maas et al. 2011). ``split_scheme: standard``
carves validation at random from train, so validation shares movies with what is trained on; ``movie_blocks``
carves whole blocks of consecutive reviews, which IMDB's file keeps together by movie. This script measures both:

1. how grouped the train file is: the share of reviews that have a rare capitalised word (a name: document
   frequency 2-40) in common with the review ``k`` rows later, against random pairs;
2. for each scheme and seed, a bag-of-words logistic regression (binary unigram features, the 30,000 most frequent
   words of its training part, Adam, the epoch with the best validation accuracy): validation and test accuracy,
   and the gap between them.

The model is deliberately simple and fast (a minute on two CPU cores for the real IMDB): it stands in for any model
that can learn movie-specific words. Results go to ``OUTPUT.json`` and ``OUTPUT.md``::

    python scripts/validation_split_gap.py --dataset ../shared/data/imdb --output docs/results/validation-split-gap
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from sentiment.data import load_imdb, split_imdb
from sentiment.files import write_atomic

SCHEMES = ("standard", "movie_blocks")
WORD = re.compile(r"[a-z0-9']+")
NAME = re.compile(r"[A-Z][a-z]{2,}")


def words(text: str) -> list[str]:
    """Lowercased word tokens (a regex: this measures the split, not the project's spaCy pipeline)."""
    return WORD.findall(text.lower().replace("<br />", " "))


def neighbour_name_overlap(texts: list[str], offsets: tuple[int, ...], seed: int = 0) -> dict[str, float]:
    """Share of reviews with a rare capitalised word in common with the review ``k`` rows on, for each ``k``, and
    for 50,000 random pairs."""
    names = [set(NAME.findall(text)) for text in texts]
    frequency = Counter(name for found in names for name in found)
    rare = [{name for name in found if 2 <= frequency[name] <= 40} for found in names]
    shares = {str(k): float(np.mean([bool(rare[i] & rare[i + k]) for i in range(len(rare) - k)])) for k in offsets}
    rng = random.Random(seed)
    pairs = [(rng.randrange(len(rare)), rng.randrange(len(rare))) for _ in range(50_000)]
    shares["random"] = float(np.mean([bool(rare[i] & rare[j]) for i, j in pairs if i != j]))
    return shares


def bag_of_words(docs: list[list[str]], vocabulary: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each document's distinct in-vocabulary word ids, flattened, and the offset of each document."""
    ids = [sorted({vocabulary[w] for w in doc if w in vocabulary}) for doc in docs]
    offsets = np.cumsum([0] + [len(x) for x in ids[:-1]])
    return torch.tensor([i for x in ids for i in x], dtype=torch.long), torch.from_numpy(offsets)


def logistic_regression(
    splits: dict[str, tuple[list[list[str]], list[int]]], epochs: int, seed: int, vocabulary_size: int = 30_000
) -> dict[str, float]:
    """Train on ``splits['train']``, keep the epoch with the best validation accuracy; its validation and test
    accuracy."""
    torch.manual_seed(seed)
    counts = Counter(w for doc in splits["train"][0] for w in set(doc))
    vocabulary = {w: i for i, (w, _) in enumerate(counts.most_common(vocabulary_size))}
    data = {
        name: (*bag_of_words(docs, vocabulary), torch.tensor(labels, dtype=torch.float32))
        for name, (docs, labels) in splits.items()
    }
    weights = torch.nn.EmbeddingBag(len(vocabulary), 1, mode="sum")
    torch.nn.init.zeros_(weights.weight)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([*weights.parameters(), bias], lr=0.01)

    def accuracy(name: str) -> float:
        flat, offsets, labels = data[name]
        with torch.no_grad():
            return ((weights(flat, offsets).squeeze(1) + bias > 0).float() == labels).float().mean().item()

    flat, offsets, labels = data["train"]
    lengths = torch.diff(torch.cat([offsets, torch.tensor([len(flat)])]))
    best = {"valid_acc": -1.0}
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(labels)).split(256):
            batch_flat = torch.cat([flat[offsets[i] : offsets[i] + lengths[i]] for i in batch.tolist()])
            batch_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths[batch].cumsum(0)[:-1]])
            logits = weights(batch_flat, batch_offsets).squeeze(1) + bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[batch])
            loss = loss + 1e-5 * weights.weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        valid_acc = accuracy("validation")
        if valid_acc > best["valid_acc"]:
            best = {"valid_acc": valid_acc, "test_acc": accuracy("test"), "best_epoch": epoch}
    best["gap"] = best["valid_acc"] - best["test_acc"]
    return best


def measure(dataset: str, seeds: list[int], epochs: int, valid_fraction: float) -> dict:
    """Every figure of the module docstring, as a dict."""
    raw = load_imdb(dataset)
    result: dict = {
        "dataset": dataset,
        "neighbour_name_overlap": neighbour_name_overlap(list(raw["train"]["text"]), (1, 2, 5, 10, 30, 100)),
        "valid_fraction": valid_fraction,
        "runs": [],
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}",
    }
    test = ([words(t) for t in raw["test"]["text"]], list(raw["test"]["label"]))
    train_words = {text: words(text) for text in raw["train"]["text"]}  # once, for every scheme and seed
    for scheme in SCHEMES:
        for seed in seeds:
            parts = split_imdb(raw, scheme, valid_fraction=valid_fraction, seed=seed)
            splits = {
                name: ([train_words[t] for t in parts[name]["text"]], list(parts[name]["label"]))
                for name in ("train", "validation")
            }
            figures = logistic_regression({**splits, "test": test}, epochs, seed)
            result["runs"].append({"scheme": scheme, "seed": seed, **figures})
            print(f"{scheme} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()), flush=True)
    result["summary"] = {
        scheme: {
            key: [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]
            for key in ("valid_acc", "test_acc", "gap")
            for values in [[run[key] for run in result["runs"] if run["scheme"] == scheme]]
        }
        for scheme in SCHEMES
    }
    return result


def markdown(result: dict) -> str:
    """The result as a short Markdown report."""
    overlap = result["neighbour_name_overlap"]
    lines = [
        f"# Validation carve and test accuracy ({result['dataset']})",
        "",
        "Reviews sharing a rare capitalised word (a name) with the review k rows on in the train file:",
        "",
        "| k | " + " | ".join(overlap) + " |",
        "|---|" + "---|" * len(overlap),
        "| share | " + " | ".join(f"{v:.3f}" for v in overlap.values()) + " |",
        "",
        f"Bag-of-words logistic regression, validation {result['valid_fraction']:.0%} of train, full test set "
        "(mean ± std over seeds):",
        "",
        "| split_scheme | valid acc | test acc | valid - test |",
        "|---|---|---|---|",
    ]
    for scheme, figures in result["summary"].items():
        lines.append(f"| {scheme} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in figures.values()) + " |")
    lines += ["", f"Hardware: {result['hardware']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/imdb", help="hub id or local IMDB copy")
    parser.add_argument("--output", required=True, help="path without extension: writes OUTPUT.json and OUTPUT.md")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated split seeds")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--valid_fraction", type=float, default=0.1)
    args = parser.parse_args()
    result = measure(args.dataset, [int(s) for s in args.seeds.split(",")], args.epochs, args.valid_fraction)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", markdown(result))):
        write_atomic(output.with_name(output.name + suffix), text)
    print(markdown(result))


if __name__ == "__main__":
    main()
