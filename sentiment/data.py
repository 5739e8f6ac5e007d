"""Load IMDB (hub id, local hub-layout folder or Stanford's aclImdb folder) and split it.

``load_imdb`` returns a ``DatasetDict`` with ``train`` and ``test`` (and ``unsupervised`` when present), every
split with a ``text`` string column and a ``label`` ClassLabel column (0 = neg, 1 = pos), checked for bad labels
and empty reviews. ``split_imdb`` turns it into seeded, stratified ``train`` / ``validation`` / ``test`` splits.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import ClassLabel, DatasetDict, Features, Value

from sentiment.files import atomic_path
from sentiment.sampling import TEST_IN_FILE_ORDER, sample_rows

logger = logging.getLogger(__name__)

LABEL_NAMES = ["neg", "pos"]
FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=LABEL_NAMES)})
DEFAULT_DATASET = "stanfordnlp/imdb"
# split_scheme movie_blocks: IMDB's files keep each movie's reviews (at most 30 per movie) next to each other within
# a label, so validation is carved as whole blocks of this many rows: a movie is split off only at a block's ends.
MOVIE_BLOCK_ROWS = 100


class DataError(ValueError):
    """The dataset is missing or malformed; the message names the problem and the fix."""


def _is_aclimdb(path: Path) -> bool:
    return (path / "train" / "pos").is_dir() and (path / "train" / "neg").is_dir()


def _looks_local(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else (``./x``, ``a/b/c``, ``/abs``) is a local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is None


def _read_review(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}). Re-encode the file as UTF-8 or remove it."
        ) from None


def _review_order(path: Path) -> tuple[int, int, str]:
    """Sort key of an aclImdb review file ``<id>_<rating>.txt``: by its numeric id, the hub copy's order within a
    label (``0_3.txt``, ``1_1.txt``, ``2_1.txt``, ..., ``10000_4.txt``), not the string order of the names; files
    named otherwise come after, by name."""
    match = re.fullmatch(r"(\d+)_\d+", path.stem)
    return (0, int(match.group(1)), path.name) if match else (1, 0, path.name)


def _load_aclimdb(root: Path, cache_dir: str | None) -> DatasetDict:
    """Read Stanford's aclImdb layout once into parquet under the datasets cache, then load it memory-mapped.

    Each split holds the ``neg/`` reviews, then the ``pos/`` ones, each by review id (``_review_order``): the
    hub copy's order, so both give the same splits for the same ``split_seed``."""
    splits: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "test"):
        files: list[tuple[Path, int]] = []
        for label, name in enumerate(LABEL_NAMES):
            folder = root / split / name
            if not folder.is_dir():
                raise DataError(
                    f"aclImdb folder {root} has no {split}/{name}/ folder; it needs train/ and test/ "
                    "each with pos/ and neg/ folders of .txt reviews"
                )
            files += [(p, label) for p in sorted(folder.glob("*.txt"), key=_review_order)]
        if not files:
            raise DataError(f"aclImdb folder {root}/{split} holds no .txt reviews")
        splits[split] = files
    if (root / "train" / "unsup").is_dir():
        splits["unsupervised"] = [(p, -1) for p in sorted((root / "train" / "unsup").glob("*.txt"), key=_review_order)]

    digest = hashlib.sha256(f"{root.resolve()}|review id order".encode())
    for split, files in splits.items():
        for path, label in files:
            stat = path.stat()
            digest.update(f"{split}|{path.name}|{label}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    cache_root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "aclimdb_parquet" / digest.hexdigest()[:16]
    data_files = {split: str(cache_root / f"{split}.parquet") for split in splits}
    if not all(Path(f).exists() for f in data_files.values()):
        cache_root.mkdir(parents=True, exist_ok=True)
        for split, files in splits.items():
            table = pa.table(
                {
                    "text": pa.array([_read_review(p) for p, _ in files], pa.string()),
                    "label": pa.array([label for _, label in files], pa.int64()),
                }
            )
            with atomic_path(cache_root / f"{split}.parquet") as tmp:
                pq.write_table(table, tmp)
    return datasets.load_dataset("parquet", data_files=data_files, cache_dir=cache_dir)


def _check_parquet_files(path: Path) -> None:
    """Name a damaged parquet file before datasets fails on it with a generic message."""
    for file in sorted(path.rglob("*.parquet")):
        try:
            pq.read_metadata(file)
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError for truncated or foreign files
            raise DataError(
                f"{file} is not a readable parquet file ({type(err).__name__}: {str(err)[:200]}). It is damaged or "
                "incomplete: download it again, or remove it"
            ) from None


def _split_parquet_files(path: Path) -> dict[str, list[str]] | None:
    """Without a dataset card (README.md) listing the files, datasets only knows train/validation/test file
    names; find ``train-*.parquet``, ``test-*.parquet`` and ``unsupervised-*.parquet`` ourselves."""
    if (path / "README.md").is_file():
        return None
    files: dict[str, list[str]] = {}
    for split in ("train", "test", "unsupervised"):
        found = sorted(str(p) for p in path.rglob("*.parquet") if re.match(rf"{split}([-._]|$)", p.stem))
        if found:
            files[split] = found
    return files or None


def load_imdb(name: str = DEFAULT_DATASET, cache_dir: str | None = None) -> DatasetDict:
    """Load IMDB from a hub id, a local folder in the hub's layout, or an aclImdb folder; validate it."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"dataset path {path} is a file; pass the folder that holds the splits")
        if not any(path.iterdir()):
            raise DataError(f"dataset folder {path} is empty; it needs train and test splits")
        if _is_aclimdb(path):
            raw = _load_aclimdb(path, cache_dir)
        else:
            _check_parquet_files(path)
            try:
                parquet_files = _split_parquet_files(path)
                if parquet_files:
                    raw = datasets.load_dataset("parquet", data_files=parquet_files, cache_dir=cache_dir)
                else:
                    raw = datasets.load_dataset(str(path), cache_dir=cache_dir)
            except Exception as err:  # datasets raises many types for unreadable folders
                raise DataError(
                    f"could not read dataset folder {path}: {type(err).__name__}: {err}. It must hold the hub's "
                    "layout (parquet files named train-*.parquet / test-*.parquet, e.g. under plain_text/) "
                    "or Stanford's aclImdb layout (train/pos, train/neg, test/pos, test/neg)"
                ) from err
    elif _looks_local(name):
        raise DataError(
            f"dataset folder {name} does not exist. Pass a hub id (default {DEFAULT_DATASET}), a local folder in "
            "the hub's layout, or an aclImdb folder"
        )
    else:
        try:
            raw = datasets.load_dataset(name, cache_dir=cache_dir)
        except Exception as err:  # offline: ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, ...
            raise DataError(
                f"could not load '{name}' from the Hugging Face Hub ({type(err).__name__}: {err}). If you are "
                "offline, download it elsewhere and point --dataset at the local copy: a folder in the hub's "
                "layout (as `huggingface-cli download stanfordnlp/imdb --repo-type dataset --local-dir DIR` "
                "writes) or Stanford's aclImdb folder"
            ) from err
    return _validate(raw, name)


def _validate(raw: DatasetDict, name: str) -> DatasetDict:
    missing = [s for s in ("train", "test") if s not in raw]
    if missing:
        raise DataError(f"dataset {name} has no {' or '.join(missing)} split (found: {list(raw)}); IMDB needs both")
    checked = {}
    for split, ds in raw.items():
        columns = set(ds.column_names)
        if not {"text", "label"} <= columns:
            raise DataError(
                f"split '{split}' of {name} has columns {sorted(columns)}; it needs a 'text' column (the review) "
                "and a 'label' column (0 = negative, 1 = positive)"
            )
        ds = ds.select_columns(["text", "label"])
        table = ds.with_format("arrow")[:]
        labels = table.column("label")
        if split != "unsupervised":
            bad = pc.sum(pc.invert(pc.is_in(labels, value_set=pa.array([0, 1], labels.type)))).as_py() or 0
            if labels.null_count or bad:
                values = sorted({v for v in labels.to_pylist() if v not in (0, 1)}, key=str)[:5]
                raise DataError(
                    f"split '{split}' of {name} has {bad + labels.null_count} labels outside {{0, 1}} "
                    f"(e.g. {values}); labels must be 0 (negative) or 1 (positive)"
                )
        texts = table.column("text")
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(texts, ""))), 0)
        n_empty = pc.sum(empty).as_py() or 0
        if n_empty:
            rows = [i for i, e in enumerate(empty.to_pylist()) if e][:5]
            raise DataError(
                f"split '{split}' of {name} has {n_empty} empty reviews (rows {rows}); remove them from the data"
            )
        if split != "unsupervised" and ds.features["label"] != FEATURES["label"]:
            ds = ds.cast(FEATURES)
        checked[split] = ds
    return DatasetDict(checked)


def split_imdb(
    raw: DatasetDict,
    scheme: str = "standard",
    valid_fraction: float = 0.1,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> DatasetDict:
    """Seeded, stratified train / validation / test splits.

    ``standard``: validation is ``valid_fraction`` of train; the full test set is the test set.
    ``seed`` (the report's scheme): train is the full train set; test is divided into test and validation,
    ``valid_fraction`` of it going to validation (the report used 0.3).
    ``movie_blocks``: as ``standard``, but validation is a seeded choice of whole blocks of ``MOVIE_BLOCK_ROWS``
    consecutive reviews of each label. IMDB's train file keeps a movie's reviews together, so these validation
    reviews are mostly of movies that training never sees - like the test set's, which are disjoint from train's -
    while a random carve shares movies with training and overestimates test accuracy
    (``scripts/validation_split_gap.py``).
    ``max_train_samples`` / ``max_eval_samples`` keep the first N of each shuffled split (``sample_rows``; the
    test file of ``standard`` and ``movie_blocks`` is shuffled with ``seed`` first).
    """
    if scheme in ("standard", "movie_blocks"):
        if scheme == "standard":
            parts = raw["train"].train_test_split(test_size=valid_fraction, stratify_by_column="label", seed=seed)
            splits = DatasetDict(train=parts["train"], validation=parts["test"], test=raw["test"])
        else:
            is_valid = movie_block_rows(raw["train"]["label"], valid_fraction, seed)
            splits = DatasetDict(
                train=raw["train"].select(np.flatnonzero(~is_valid)).shuffle(seed=seed),
                validation=raw["train"].select(np.flatnonzero(is_valid)).shuffle(seed=seed),
                test=raw["test"],
            )
    elif scheme == "seed":
        parts = raw["test"].train_test_split(test_size=valid_fraction, stratify_by_column="label", seed=seed)
        splits = DatasetDict(train=raw["train"].shuffle(seed=seed), validation=parts["test"], test=parts["train"])
    else:
        raise DataError(f"split_scheme must be 'standard', 'movie_blocks' or 'seed' (got {scheme!r})")
    kept = sample_rows(
        {name: len(ds) for name, ds in splits.items()},
        seed=seed,
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
        test_in_file_order=scheme in TEST_IN_FILE_ORDER,
    )
    for name, rows in kept.items():
        splits[name] = splits[name].select(rows)
    return splits


def movie_block_rows(
    labels: list[int], valid_fraction: float, seed: int, block_rows: int = MOVIE_BLOCK_ROWS
) -> np.ndarray:
    """A boolean mask of the validation rows for ``split_scheme: movie_blocks``.

    The rows of each label, in file order, are cut into blocks of ``block_rows``; a seeded ``valid_fraction`` of
    each label's blocks (at least one) is validation, so both labels keep their share.
    """
    labels_array = np.asarray(labels)
    rng = np.random.default_rng(seed)
    is_valid = np.zeros(len(labels_array), dtype=bool)
    for label in np.unique(labels_array):
        rows = np.flatnonzero(labels_array == label)
        blocks = [rows[start : start + block_rows] for start in range(0, len(rows), block_rows)]
        if len(blocks) < 2:
            raise DataError(
                f"split_scheme movie_blocks carves validation in blocks of {block_rows} reviews per label, but label "
                f"{label} has only {len(rows)} training reviews; use split_scheme: standard for a dataset this small"
            )
        chosen = rng.choice(len(blocks), size=max(1, round(valid_fraction * len(blocks))), replace=False)
        for block in chosen:
            is_valid[blocks[block]] = True
    return is_valid
