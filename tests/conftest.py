"""Shared fixtures: small IMDB-like datasets the tests write themselves, in the hub's layout (parquet) and in
Stanford's aclImdb layout. Reviews are built from sentiment-bearing words so a model can learn them."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

# Keep the datasets cache of the test session away from the user's cache (set before datasets is imported).
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="sentiment-tests-hf-"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REAL_IMDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb"
REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``sentiment ARGS`` as a user runs it (``python -m sentiment.cli``) in the repository, with the test
    session's environment (datasets cache, offline wandb); output captured, the exit status not checked."""
    return subprocess.run(
        [sys.executable, "-m", "sentiment.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


POSITIVE = ["great", "wonderful", "brilliant", "loved", "excellent", "moving", "superb", "beautiful", "fun"]
NEGATIVE = ["awful", "boring", "terrible", "hated", "dull", "worst", "waste", "stupid", "poor"]
NEUTRAL = ["the", "movie", "film", "plot", "actor", "scene", "story", "was", "and", "a", "it", "this",
           "director", "ending", "music", "Hollywood", "characters", "I", "of", "watched"]  # fmt: skip


def make_review(rng: random.Random, label: int) -> str:
    """A review of 8-60 words whose sentiment words match ``label``, with IMDB's ``<br />`` breaks."""
    words = []
    for _ in range(rng.randint(8, 60)):
        roll = rng.random()
        if roll < 0.25:
            words.append(rng.choice(POSITIVE if label else NEGATIVE))
        elif roll < 0.28:
            words.append(rng.choice(NEGATIVE if label else POSITIVE))
        else:
            words.append(rng.choice(NEUTRAL))
    text = " ".join(words)
    cut = len(text) // 2
    return f"{text[:cut].rstrip()}.<br /><br />{text[cut:].lstrip().capitalize()}!"


def make_split(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` reviews, half positive, labels sorted like the real IMDB files (all neg, then all pos)."""
    rng = random.Random(seed)
    labels = [0] * (n // 2) + [1] * (n - n // 2)
    return [make_review(rng, label) for label in labels], labels


@pytest.fixture(scope="session")
def hub_imdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder in the hub's layout: plain_text/{train,test,unsupervised}-00000-of-00001.parquet."""
    root = tmp_path_factory.mktemp("hub_imdb")
    (root / "plain_text").mkdir()
    for split, n, seed in (("train", 80, 1), ("test", 60, 2), ("unsupervised", 20, 3)):
        texts, labels = make_split(n, seed)
        if split == "unsupervised":
            labels = [-1] * n
        table = pa.table({"text": texts, "label": pa.array(labels, pa.int64())})
        pq.write_table(table, root / "plain_text" / f"{split}-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="session")
def aclimdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder in Stanford's aclImdb layout: {train,test}/{pos,neg}/<id>_<rating>.txt and train/unsup."""
    root = tmp_path_factory.mktemp("aclImdb")
    for split, n, seed in (("train", 40, 4), ("test", 30, 5)):
        texts, labels = make_split(n, seed)
        for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
            folder = root / split / ("pos" if label else "neg")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}_{8 if label else 2}.txt").write_text(text, encoding="utf-8")
    (root / "train" / "unsup").mkdir()
    for i, text in enumerate(make_split(6, 6)[0]):
        (root / "train" / "unsup" / f"{i}_0.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def glove_txt(tmp_path: Path) -> Path:
    """A small GloVe-format text file (dimension 4) with some fixture words, one capitalised."""
    rng = random.Random(0)
    words = ["the", "movie", "great", "awful", "boring", "wonderful", "hollywood", "."]
    lines = [f"{w} " + " ".join(f"{rng.uniform(-1, 1):.5f}" for _ in range(4)) for w in words]
    path = tmp_path / "glove.test.4d.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=f"real IMDB copy not found at {REAL_IMDB}")
    for item in items:
        if "integration" in item.keywords and not REAL_IMDB.exists():
            item.add_marker(skip)
