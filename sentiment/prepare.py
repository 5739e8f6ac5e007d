"""Prepare: raw IMDB -> splits -> spaCy tokens -> vocabulary -> ids -> embedding matrix, in memory or on disk.

``prepare_data(cfg)`` runs the data stages and returns a ``PreparedData``; ``save`` writes it to a folder
(``sentiment prepare``) that ``load`` reads back with numpy, pyarrow and tokenizers only, so a GPU machine without
spaCy, datasets or network trains from it (``--prepared DIR``), like nanoGPT's ``prepare.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from sentiment.batching import EncodedSplit
from sentiment.config import DATA_KEYS, TrainConfig

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
MANIFEST = "prepared.json"
FORMAT_VERSION = 1


class PreparedDataError(ValueError):
    """A prepared folder is missing or incomplete; the message names the problem and the fix."""


@dataclass
class PreparedData:
    """Encoded splits, the tokenizer and the initial embedding matrix (None when ``vectors: none``)."""

    splits: dict[str, EncodedSplit]
    tokenizer: Tokenizer
    embeddings: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        """Write the splits (parquet), ``tokenizer.json``, ``embeddings.safetensors`` and ``prepared.json``.

        Written to a temporary folder first and renamed, so a folder that exists is always complete.
        """
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, split in self.splits.items():
            ids = pa.ListArray.from_arrays(
                pa.array(split.offsets, pa.int64()).cast(pa.int32()), pa.array(split.token_ids, pa.int32())
            )
            table = pa.table({"input_ids": ids, "label": pa.array(split.labels, pa.int8())})
            pq.write_table(table, tmp / f"{name}.parquet", compression="zstd")
        self.tokenizer.save(str(tmp / "tokenizer.json"))
        if self.embeddings is not None:
            save_file({"embeddings": np.ascontiguousarray(self.embeddings)}, tmp / "embeddings.safetensors")
        (tmp / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, **self.info}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> PreparedData:
        """Read a folder written by ``save``."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise PreparedDataError(
                f"{folder} is not a prepared data folder (no {MANIFEST}). Create one with "
                f"`sentiment prepare --config CONFIG --output_dir {folder}`"
            )
        info = json.loads((folder / MANIFEST).read_text())
        missing = [f"{s}.parquet" for s in SPLITS if not (folder / f"{s}.parquet").is_file()]
        if not (folder / "tokenizer.json").is_file():
            missing.append("tokenizer.json")
        if missing:
            raise PreparedDataError(
                f"prepared folder {folder} lacks {', '.join(missing)}; run `sentiment prepare` again"
            )
        names = [*SPLITS, *(["unsupervised"] if (folder / "unsupervised.parquet").is_file() else [])]
        splits = {s: EncodedSplit.from_arrow(pq.read_table(folder / f"{s}.parquet")) for s in names}
        embeddings_path = folder / "embeddings.safetensors"
        embeddings = load_file(embeddings_path)["embeddings"] if embeddings_path.is_file() else None
        return cls(splits, Tokenizer.from_file(str(folder / "tokenizer.json")), embeddings, info)

    def data_config(self) -> dict[str, Any]:
        """The data keys of the config this data was prepared with."""
        return {key: self.info[key] for key in DATA_KEYS if key in self.info}

    def resolve(self, cfg: TrainConfig) -> tuple[TrainConfig, np.ndarray | None]:
        """``cfg`` with the data keys this data was prepared with, and the embedding matrix to start from.

        Vectors only initialise the embedding, so ``vectors: none`` also runs on data prepared with vectors:
        the same token ids, an embedding of the config's ``embedding_dim`` started at random.
        """
        keys = self.data_config()
        embeddings = self.embeddings
        if cfg.vectors.lower() == "none" and embeddings is not None:
            keys.update(vectors="none", embedding_dim=cfg.embedding_dim)
            embeddings = None
        return dataclasses.replace(cfg, **keys), embeddings


def prepare_data(cfg: TrainConfig, cache_dir: str | None = None) -> PreparedData:
    """Run the data stages for ``cfg``: load, split, pretokenize, build the vocabulary on train, encode, vectors."""
    from sentiment.data import load_imdb, split_imdb
    from sentiment.text import PAD_ID, build_vocabulary, encode_splits, pretokenize_splits
    from sentiment.vectors import embedding_matrix

    raw = load_imdb(cfg.dataset, cache_dir=cache_dir)
    splits = split_imdb(
        raw,
        scheme=cfg.split_scheme,
        valid_fraction=cfg.validation_fraction,
        seed=cfg.split_seed,
        max_train_samples=cfg.max_train_samples,
        max_eval_samples=cfg.max_eval_samples,
    )
    if cfg.with_unsupervised:  # for language-model pretraining; never used by the classifier
        if "unsupervised" not in raw:
            raise PreparedDataError(
                f"with_unsupervised: {cfg.dataset} has no unsupervised split (IMDB's 50,000 unlabelled reviews); "
                "point --dataset at a copy that has it, or set with_unsupervised: false"
            )
        splits["unsupervised"] = raw["unsupervised"]
    num_proc = cfg.num_proc or min(os.cpu_count() or 1, 8)
    tokenized = pretokenize_splits(splits, num_proc=num_proc)
    tokenizer = build_vocabulary(tokenized["train"], cfg.max_vocab_size, cfg.min_freq, cfg.lowercase, cfg.max_length)
    encoded = encode_splits(tokenized, tokenizer)
    arrays = {name: EncodedSplit.from_arrow(ds.with_format("arrow")[:]) for name, ds in encoded.items()}
    info: dict[str, Any] = {key: getattr(cfg, key) for key in DATA_KEYS}
    info["valid_fraction"] = cfg.validation_fraction
    info["vocab_size"] = tokenizer.get_vocab_size()
    info["pad_id"] = PAD_ID
    info["sizes"] = {name: len(split) for name, split in arrays.items()}
    info["positive_fraction"] = {
        name: float(split.labels.mean()) for name, split in arrays.items() if name != "unsupervised"
    }
    info["tokens"] = {name: int(split.lengths.sum()) for name, split in arrays.items()}
    embeddings = None
    if cfg.vectors.lower() != "none":
        init = embedding_matrix(tokenizer, cfg.vectors, oov_init=cfg.oov_init, seed=cfg.split_seed)
        embeddings = init.weight
        info["embedding_dim"] = int(init.weight.shape[1])
        info["vectors_coverage"] = init.coverage
        info["vectors_found"] = init.found
    return PreparedData(arrays, tokenizer, embeddings, info)
