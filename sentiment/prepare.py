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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from sentiment.batching import EncodedSplit
from sentiment.config import DATA_KEYS, RANDOM_EMBEDDING_DIM, ConfigError, TrainConfig
from sentiment.sampling import TEST_IN_FILE_ORDER, sample_rows

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
MANIFEST = "prepared.json"
FORMAT_VERSION = 1


class PreparedDataError(ValueError):
    """A prepared folder is missing or incomplete; the message names the problem and the fix."""


def take_rows(split: EncodedSplit, rows: np.ndarray) -> EncodedSplit:
    """The reviews ``rows`` of ``split``, in that order."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = split.lengths[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    positions = np.repeat(split.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
    return EncodedSplit(split.token_ids[positions], offsets, split.labels[rows])


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
        """Read a folder written by ``save``; a missing or damaged file is a ``PreparedDataError`` that names it
        and the ``sentiment prepare`` command that writes the folder again."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise PreparedDataError(
                f"{folder} is not a prepared data folder (no {MANIFEST}). Create one with "
                f"`sentiment prepare --config CONFIG --output_dir {folder}`"
            )
        info = _read_prepared_file(folder / MANIFEST, {}, lambda path: json.loads(path.read_text()))
        if not isinstance(info, dict):
            raise _damaged(folder / MANIFEST, {}, f"it holds a {type(info).__name__}, not a JSON object")
        missing = [f"{s}.parquet" for s in SPLITS if not (folder / f"{s}.parquet").is_file()]
        if not (folder / "tokenizer.json").is_file():
            missing.append("tokenizer.json")
        if missing:
            raise PreparedDataError(
                f"prepared folder {folder} lacks {', '.join(missing)}; prepare it again: "
                f"{prepare_command(info, folder)}"
            )
        names = [*SPLITS, *(["unsupervised"] if (folder / "unsupervised.parquet").is_file() else [])]
        splits = {
            s: _read_prepared_file(
                folder / f"{s}.parquet", info, lambda path: EncodedSplit.from_arrow(pq.read_table(path))
            )
            for s in names
        }
        embeddings_path = folder / "embeddings.safetensors"
        embeddings = None
        if embeddings_path.is_file():
            embeddings = _read_prepared_file(embeddings_path, info, lambda path: load_file(path)["embeddings"])
        tokenizer = _read_prepared_file(folder / "tokenizer.json", info, lambda path: Tokenizer.from_file(str(path)))
        return cls(splits, tokenizer, embeddings, info)

    def data_config(self) -> dict[str, Any]:
        """The data keys of the config this data was prepared with."""
        return {key: self.info[key] for key in DATA_KEYS if key in self.info}

    def resolve(self, cfg: TrainConfig) -> tuple[TrainConfig, np.ndarray | None]:
        """``cfg`` with the data keys this data was prepared with, and the embedding matrix to start from.

        A prepared folder fixes the data keys (``DATA_KEYS``): a key that ``cfg`` sets to neither the folder's value
        nor the default is a ``ConfigError`` naming it and the fix (``dataset`` excepted: it only says where the
        raw reviews were read). ``max_train_samples`` / ``max_eval_samples`` cut the splits here, in place, as
        ``split_imdb`` cuts raw data (``sample_rows``: the same reviews for the same ``split_seed``), unless the
        folder holds fewer reviews than asked because it was prepared with a smaller cut (a ``ConfigError``).
        Vectors only initialise the embedding, so ``vectors: none`` also runs on data prepared with vectors:
        the same token ids, an embedding of the config's ``embedding_dim`` (``RANDOM_EMBEDDING_DIM`` when left out)
        started at random. On data prepared without vectors, ``embedding_dim`` is the config's when it sets one,
        else the folder's. With vectors it is their dimension, and a config that sets ``embedding_dim`` to another
        is a ``ConfigError`` (``check_embedding_dim``). The config returned always holds the size as an integer.
        """
        folder = cfg.prepared or "the prepared data"
        _check_data_keys(self, cfg, folder)
        keys = self.data_config()
        embeddings = self.embeddings
        if cfg.vectors.lower() == "none" and embeddings is not None:
            keys.update(vectors="none", embedding_dim=_random_embedding_dim(cfg))
            embeddings = None
        elif embeddings is None:  # prepared without vectors: the config's size, else the folder's
            if cfg.embedding_dim is not None or keys.get("embedding_dim") is None:
                keys["embedding_dim"] = _random_embedding_dim(cfg)
        else:
            dim = int(embeddings.shape[1])
            check_embedding_dim(cfg, dim, str(self.info.get("vectors", cfg.vectors)), folder)
            keys["embedding_dim"] = dim
        self._cut(cfg, folder)
        keys.update({key: self.info[key] for key in ("max_train_samples", "max_eval_samples") if key in self.info})
        return dataclasses.replace(cfg, **keys), embeddings

    def _cut(self, cfg: TrainConfig, folder: str) -> None:
        """Apply ``cfg``'s ``max_train_samples`` / ``max_eval_samples`` to the splits and record them in ``info``."""
        asked = {"max_train_samples": cfg.max_train_samples, "max_eval_samples": cfg.max_eval_samples}
        cut_splits = {"max_train_samples": ("train",), "max_eval_samples": ("validation", "test")}
        for key, value in list(asked.items()):
            held = self.info.get(key)
            if value is None or value == held:
                asked[key] = None  # nothing to cut: the folder holds what is asked
                continue
            short = [s for s in cut_splits[key] if held is not None and value > held and len(self.splits[s]) >= held]
            if short:
                counts = ", ".join(f"{s}: {len(self.splits[s])} reviews" for s in short)
                raise ConfigError(
                    f"{key}={value} asks for more reviews than {folder} holds: it was prepared with {key}={held} "
                    f"({counts}). Pass --{key} of at most {held}, or prepare a folder with more: "
                    f"{prepare_command({**self.info, key: value}, 'NEW_DIR')}"
                )
        if asked["max_train_samples"] is None and asked["max_eval_samples"] is None:
            return
        scheme = self.info.get("split_scheme", cfg.split_scheme)
        kept = sample_rows(
            {name: len(split) for name, split in self.splits.items()},
            seed=self.info.get("split_seed", cfg.split_seed),
            max_train_samples=asked["max_train_samples"],
            max_eval_samples=asked["max_eval_samples"],
            test_in_file_order=scheme in TEST_IN_FILE_ORDER and self.info.get("max_eval_samples") is None,
        )
        for name, rows in kept.items():
            self.splits[name] = take_rows(self.splits[name], rows)
        self.info.update({key: value for key, value in asked.items() if value is not None})
        self.info["sizes"] = {name: len(split) for name, split in self.splits.items()}
        for name in kept:
            split = self.splits[name]
            self.info.setdefault("positive_fraction", {})[name] = float(split.labels.mean()) if len(split) else 0.0
            self.info.setdefault("tokens", {})[name] = int(split.lengths.sum())


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
# Data keys a run may set with --prepared: where the raw data was (``dataset``), the cuts (applied to the folder's
# splits) and the embedding size (the config's for a random embedding; with vectors it must equal their dimension,
# which ``check_embedding_dim`` checks).
_KEYS_A_RUN_SETS = ("dataset", "max_train_samples", "max_eval_samples", "embedding_dim")


def _random_embedding_dim(cfg: TrainConfig) -> int:
    """The size of a random embedding (``vectors: none``): the config's, else ``RANDOM_EMBEDDING_DIM``."""
    return RANDOM_EMBEDDING_DIM if cfg.embedding_dim is None else cfg.embedding_dim


def check_embedding_dim(cfg: TrainConfig, dim: int, vectors: str, where: str | None = None) -> None:
    """Raise a ``ConfigError`` when ``cfg`` sets ``embedding_dim`` to other than ``dim``, the dimension of the
    ``vectors`` the embedding starts from. Left out (None), ``embedding_dim`` follows the vectors; any value
    set, the default random size of 100 included, must equal theirs."""
    asked = cfg.embedding_dim
    if asked is None or asked == dim:
        return
    place = f" of {where}" if where else ""
    raise ConfigError(
        f"embedding_dim {asked} does not match the {dim}-d vectors {vectors}{place}: the embedding starts from the "
        f"vectors, so its size follows them. Remove embedding_dim from the config and the flags, set it to {dim}, "
        f"or use --vectors none (a random {asked}-d embedding) or a {asked}-d GloVe file"
    )


def _check_data_keys(data: PreparedData, cfg: TrainConfig, folder: str) -> None:
    """Raise a ``ConfigError`` naming the data keys ``cfg`` sets otherwise than the folder was prepared with."""
    prepared = data.data_config()
    uses_vectors = cfg.vectors.lower() != "none" and data.embeddings is not None
    conflicts = {}
    for key, there in prepared.items():
        here = getattr(cfg, key)
        if key in _KEYS_A_RUN_SETS or here == there or here == _DEFAULTS[key]:
            continue
        if key == "vectors" and str(here).lower() == "none":
            continue  # a random embedding over the folder's token ids
        if key == "oov_init" and not uses_vectors:
            continue  # no vectors: nothing to initialise
        conflicts[key] = (there, here)
    if not conflicts:
        return
    listed = "; ".join(
        f"{key}: {_flag_value(there)} there, {_flag_value(here)} here" for key, (there, here) in conflicts.items()
    )
    wanted = {**data.info, **{key: here for key, (_, here) in conflicts.items()}}
    raise ConfigError(
        f"{folder} was prepared with other data settings than this run asks for ({listed}). A prepared folder fixes "
        f"them: drop {', '.join(conflicts)} from the config and the flags to train on the folder as it is, or "
        f"prepare a folder with them and pass it as --prepared: {prepare_command(wanted, 'NEW_DIR')}"
    )


def _flag_value(value: Any) -> str:
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def prepare_command(info: Mapping[str, Any], folder: str | Path) -> str:
    """The ``sentiment prepare`` command that writes a folder with the data settings in ``info`` (a manifest)."""
    flags = []
    for key in DATA_KEYS:
        if key not in info or info[key] == _DEFAULTS[key]:
            continue
        if key == "embedding_dim" and (
            str(info.get("vectors", _DEFAULTS["vectors"])).lower() != "none" or info[key] == RANDOM_EMBEDDING_DIM
        ):
            continue  # the vectors' dimension, or the size of a random embedding when it is left out
        if key == "valid_fraction" and info[key] == (0.3 if info.get("split_scheme") == "seed" else 0.1):
            continue  # the split scheme's own fraction (TrainConfig.validation_fraction)
        flags.append(f"--{key}={_flag_value(info[key])}")
    return f"`sentiment prepare {' '.join([*flags, f'--output_dir {folder}'])}`"


def _damaged(path: Path, info: Mapping[str, Any], reason: str) -> PreparedDataError:
    command = (
        prepare_command(info, path.parent)
        if info
        else f"`sentiment prepare --config CONFIG --output_dir {path.parent}` with the config it was made with"
    )
    return PreparedDataError(f"{path} is damaged or incomplete ({reason}). Prepare the folder again: {command}")


def _read_prepared_file(path: Path, info: Mapping[str, Any], read: Callable[[Path], Any]) -> Any:
    """``read(path)``, or a ``PreparedDataError`` naming ``path`` and the fix when the file cannot be read."""
    try:
        return read(path)
    except Exception as err:  # pyarrow, safetensors, tokenizers and json each raise their own types
        text = str(err).replace(f" '{path}'", "").replace(str(path), "the file")
        if len(text) > 200:
            text = text[:200].rsplit(" ", 1)[0] + " ..."
        raise _damaged(path, info, f"{type(err).__name__}: {text}") from None


def prepare_data(cfg: TrainConfig, cache_dir: str | None = None) -> PreparedData:
    """Run the data stages for ``cfg``: load, split, pretokenize, build the vocabulary on train, encode, vectors."""
    from sentiment.data import load_imdb, split_imdb
    from sentiment.text import PAD_ID, build_vocabulary, encode_splits, pretokenize_splits
    from sentiment.vectors import embedding_matrix, vectors_dim

    if cfg.vectors.lower() != "none":  # before the slow stages: a wrong size is a config error, not a late surprise
        check_embedding_dim(cfg, vectors_dim(cfg.vectors), cfg.vectors)
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
    info["embedding_dim"] = _random_embedding_dim(cfg)  # the vectors' dimension replaces it below
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
