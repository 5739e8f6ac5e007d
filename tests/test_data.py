"""Tests for sentiment.data: loading IMDB (hub layout, aclImdb), validation errors, and splitting."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_split
from datasets import ClassLabel, Dataset, DatasetDict

import sentiment.data
from sentiment.config import ConfigError, build_config
from sentiment.data import FEATURES, DataError, load_imdb, split_imdb
from sentiment.prepare import PreparedData, prepare_command, prepare_data


def write_hub(root: Path, tables: dict[str, pa.Table]) -> Path:
    """Write ``tables`` in the hub's layout (plain_text/<split>-00000-of-00001.parquet) under ``root``."""
    (root / "plain_text").mkdir(parents=True)
    for split, table in tables.items():
        pq.write_table(table, root / "plain_text" / f"{split}-00000-of-00001.parquet")
    return root


def review_table(n: int, seed: int, labels: list[int] | None = None) -> pa.Table:
    """A table of ``n`` fixture reviews with the given (or balanced, sorted) labels."""
    texts, balanced = make_split(n, seed)
    return pa.table({"text": texts, "label": pa.array(labels or balanced, pa.int64())})


def in_memory(n_train: int, n_test: int, positive: float = 0.5) -> DatasetDict:
    """A DatasetDict with unique texts ``train-i`` / ``test-i``; labels sorted neg-then-pos like IMDB."""

    def split(name: str, n: int) -> Dataset:
        n_pos = round(n * positive)
        labels = [0] * (n - n_pos) + [1] * n_pos
        return Dataset.from_dict({"text": [f"{name}-{i}" for i in range(n)], "label": labels}, features=FEATURES)

    return DatasetDict(train=split("train", n_train), test=split("test", n_test))


def positive_fraction(ds: Dataset) -> float:
    """The share of label 1 in ``ds``."""
    labels = ds["label"]
    return sum(labels) / len(labels)


@pytest.fixture(scope="session")
def hub_raw(hub_imdb: Path) -> DatasetDict:
    """The hub-layout fixture loaded once."""
    return load_imdb(str(hub_imdb))


# --------------------------------------------------------------------------------------------- loading


def check_split(ds: Dataset, texts: list[str], labels: list[int]) -> None:
    """``ds`` has columns text/label, ClassLabel neg/pos, and exactly the given rows."""
    assert ds.column_names == ["text", "label"]
    assert isinstance(ds.features["label"], ClassLabel)
    assert ds.features["label"].names == ["neg", "pos"]
    assert len(ds) == len(texts)
    assert Counter(zip(ds["text"], ds["label"], strict=True)) == Counter(zip(texts, labels, strict=True))


def test_load_hub_layout(hub_raw: DatasetDict) -> None:
    """The hub-layout folder loads into train/test with the fixture's reviews and ClassLabel labels."""
    check_split(hub_raw["train"], *make_split(80, 1))
    check_split(hub_raw["test"], *make_split(60, 2))


def test_load_hub_layout_keeps_unsupervised(hub_raw: DatasetDict) -> None:
    """The hub-layout fixture's unsupervised parquet file is loaded as the ``unsupervised`` split."""
    assert "unsupervised" in hub_raw, f"unsupervised split dropped; got {list(hub_raw)}"
    assert len(hub_raw["unsupervised"]) == 20
    assert hub_raw["unsupervised"]["text"] == make_split(20, 3)[0]


def test_load_aclimdb(aclimdb: Path, tmp_path: Path) -> None:
    """The aclImdb folder loads into train/test/unsupervised with neg/pos from the folder names."""
    raw = load_imdb(str(aclimdb), cache_dir=str(tmp_path))
    assert set(raw) == {"train", "test", "unsupervised"}
    check_split(raw["train"], *make_split(40, 4))
    check_split(raw["test"], *make_split(30, 5))
    assert len(raw["unsupervised"]) == 6
    assert sorted(raw["unsupervised"]["text"]) == sorted(make_split(6, 6)[0])
    assert raw["unsupervised"].column_names == ["text", "label"]


def test_load_aclimdb_labels_follow_folders(aclimdb: Path, tmp_path: Path) -> None:
    """Every review from pos/ has label 1 and every one from neg/ label 0."""
    raw = load_imdb(str(aclimdb), cache_dir=str(tmp_path))
    by_text = dict(zip(raw["train"]["text"], raw["train"]["label"], strict=True))
    for name, label in (("neg", 0), ("pos", 1)):
        for path in (aclimdb / "train" / name).glob("*.txt"):
            assert by_text[path.read_text(encoding="utf-8")] == label


def test_aclimdb_second_load_reuses_parquet_cache(
    aclimdb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load reads every review into parquet; a second load reads no review file again."""
    reads: list[Path] = []
    real_read = sentiment.data._read_review

    def counting_read(path: Path) -> str:
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(sentiment.data, "_read_review", counting_read)
    first = load_imdb(str(aclimdb), cache_dir=str(tmp_path))
    assert len(reads) == 40 + 30 + 6
    parquet = sorted((tmp_path / "aclimdb_parquet").rglob("*.parquet"))
    assert [p.name for p in parquet] == ["test.parquet", "train.parquet", "unsupervised.parquet"]
    stamps = [p.stat().st_mtime_ns for p in parquet]

    def no_read(path: Path) -> str:
        raise AssertionError(f"review {path} read again despite the cache")

    monkeypatch.setattr(sentiment.data, "_read_review", no_read)
    second = load_imdb(str(aclimdb), cache_dir=str(tmp_path))
    assert [p.stat().st_mtime_ns for p in parquet] == stamps
    assert second["train"]["text"] == first["train"]["text"]
    assert second["test"]["label"] == first["test"]["label"]


def test_aclimdb_cache_sees_changed_files(aclimdb: Path, tmp_path: Path) -> None:
    """Editing a review invalidates the parquet cache: the new text is loaded."""
    root = tmp_path / "aclImdb"
    shutil.copytree(aclimdb, root)
    cache = str(tmp_path / "cache")
    load_imdb(str(root), cache_dir=cache)
    target = root / "test" / "pos" / "29_8.txt"
    target.write_text("An edited review that is much longer than before, and wonderful.", encoding="utf-8")
    raw = load_imdb(str(root), cache_dir=cache)
    assert target.read_text(encoding="utf-8") in raw["test"]["text"]


# ----------------------------------------------------------------------------------------- load errors


def test_missing_folder(tmp_path: Path) -> None:
    """A path that does not exist is a DataError saying so."""
    with pytest.raises(DataError, match="does not exist"):
        load_imdb(str(tmp_path / "no_such_imdb"))


def test_empty_folder(tmp_path: Path) -> None:
    """An empty folder is a DataError saying it is empty."""
    (tmp_path / "imdb").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_imdb(str(tmp_path / "imdb"))


def test_file_instead_of_folder(tmp_path: Path) -> None:
    """A file path is a DataError asking for the folder."""
    path = tmp_path / "train.parquet"
    pq.write_table(review_table(4, 0), path)
    with pytest.raises(DataError, match="is a file"):
        load_imdb(str(path))


def test_label_outside_0_1(tmp_path: Path) -> None:
    """A label 2 is a DataError that counts the bad labels and shows the value."""
    labels = [0, 1, 2, 0, 1, 1]
    root = write_hub(tmp_path / "imdb", {"train": review_table(6, 0, labels), "test": review_table(4, 1)})
    with pytest.raises(DataError, match=r"outside \{0, 1\}") as err:
        load_imdb(str(root))
    assert "'train'" in str(err.value)
    assert "[2]" in str(err.value)


def test_missing_text_column(tmp_path: Path) -> None:
    """Splits without a 'text' column are a DataError naming the needed column and the ones found."""
    tables = {
        split: review_table(4, seed).rename_columns(["review", "label"]) for split, seed in [("train", 0), ("test", 1)]
    }
    root = write_hub(tmp_path / "imdb", tables)
    with pytest.raises(DataError, match="'text' column") as err:
        load_imdb(str(root))
    assert "review" in str(err.value)


def test_missing_test_split(tmp_path: Path) -> None:
    """A folder with only a train split is a DataError naming the missing test split."""
    root = write_hub(tmp_path / "imdb", {"train": review_table(4, 0)})
    with pytest.raises(DataError, match="no test split"):
        load_imdb(str(root))


@pytest.mark.parametrize("empty", ["", "   \n\t"])
def test_empty_review(tmp_path: Path, empty: str) -> None:
    """An empty (or whitespace-only) review is a DataError giving the row."""
    table = review_table(4, 1)
    texts = table.column("text").to_pylist()
    texts[2] = empty
    table = table.set_column(0, "text", pa.array(texts))
    root = write_hub(tmp_path / "imdb", {"train": review_table(4, 0), "test": table})
    with pytest.raises(DataError, match="empty review") as err:
        load_imdb(str(root))
    assert "'test'" in str(err.value)
    assert "[2]" in str(err.value)


def test_aclimdb_invalid_utf8(aclimdb: Path, tmp_path: Path) -> None:
    """A review file with invalid UTF-8 bytes is a DataError naming that file."""
    root = tmp_path / "aclImdb"
    shutil.copytree(aclimdb, root)
    bad = root / "train" / "neg" / "3_2.txt"
    bad.write_bytes(b"A bad \xff\xfe review")
    with pytest.raises(DataError, match="UTF-8") as err:
        load_imdb(str(root), cache_dir=str(tmp_path / "cache"))
    assert str(bad) in str(err.value)


def test_aclimdb_missing_test_folder(aclimdb: Path, tmp_path: Path) -> None:
    """An aclImdb folder lacking test/pos is a DataError naming the missing folder."""
    root = tmp_path / "aclImdb"
    shutil.copytree(aclimdb, root)
    shutil.rmtree(root / "test" / "pos")
    with pytest.raises(DataError, match="test/pos"):
        load_imdb(str(root), cache_dir=str(tmp_path / "cache"))


def test_hub_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A hub id while offline is a DataError pointing at a local copy, caused by offline mode."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # datasets and huggingface_hub read the flags at import time.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_imdb("nobody-here/imdb-missing", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "nobody-here/imdb-missing" in message
    assert "local copy" in message
    assert "offline" in str(err.value.__cause__).lower()


# ------------------------------------------------------------------------------------------ split_imdb


def test_standard_split_sizes(hub_raw: DatasetDict) -> None:
    """Standard: validation is 10% of train, train the other 90%, test the full test set."""
    splits = split_imdb(hub_raw, "standard", valid_fraction=0.1, seed=0)
    n_train = len(hub_raw["train"])
    assert len(splits["validation"]) == round(0.1 * n_train)
    assert len(splits["train"]) == n_train - round(0.1 * n_train)
    assert sorted(splits["test"]["text"]) == sorted(hub_raw["test"]["text"])


def test_standard_split_partitions_train(hub_raw: DatasetDict) -> None:
    """Train and validation do not overlap and together are the original train split."""
    splits = split_imdb(hub_raw, "standard", valid_fraction=0.1, seed=3)
    train, valid = splits["train"]["text"], splits["validation"]["text"]
    assert not set(train) & set(valid)
    assert Counter(train) + Counter(valid) == Counter(hub_raw["train"]["text"])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_standard_split_is_stratified(seed: int) -> None:
    """With 30% positives, train and validation both keep 30% (exactly, for every seed)."""
    raw = in_memory(400, 50, positive=0.3)
    splits = split_imdb(raw, "standard", valid_fraction=0.1, seed=seed)
    assert positive_fraction(splits["validation"]) == pytest.approx(0.3)
    assert positive_fraction(splits["train"]) == pytest.approx(0.3)


def test_hub_split_is_balanced(hub_raw: DatasetDict) -> None:
    """On the balanced fixture, train and validation are both about half positive."""
    splits = split_imdb(hub_raw, "standard", valid_fraction=0.1, seed=42)
    assert positive_fraction(splits["train"]) == pytest.approx(0.5, abs=0.05)
    assert positive_fraction(splits["validation"]) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("scheme", ["standard", "seed"])
def test_split_is_seeded(hub_raw: DatasetDict, scheme: str) -> None:
    """The same seed gives the same splits; another seed gives a different validation set."""
    a = split_imdb(hub_raw, scheme, valid_fraction=0.3, seed=7)
    b = split_imdb(hub_raw, scheme, valid_fraction=0.3, seed=7)
    c = split_imdb(hub_raw, scheme, valid_fraction=0.3, seed=8)
    for name in ("train", "validation", "test"):
        assert a[name]["text"] == b[name]["text"]
        assert a[name]["label"] == b[name]["label"]
    assert set(a["validation"]["text"]) != set(c["validation"]["text"])


def row_numbers(ds: Dataset) -> list[int]:
    """The original row numbers of ``in_memory`` texts (``train-17`` -> 17), sorted."""
    return sorted(int(text.rsplit("-", 1)[1]) for text in ds["text"])


def test_movie_blocks_validation_is_whole_blocks_of_each_label() -> None:
    """movie_blocks: validation is whole blocks of 100 consecutive rows, the same share of each label (30%
    positives here), train the rest; nothing lost or shared."""
    raw = in_memory(2000, 50, positive=0.3)  # 1400 negatives (14 blocks), then 600 positives (6 blocks)
    splits = split_imdb(raw, "movie_blocks", valid_fraction=0.2, seed=5)
    valid_rows = row_numbers(splits["validation"])
    assert len(valid_rows) == 100 * (round(0.2 * 14) + round(0.2 * 6))
    starts = valid_rows[::100]
    assert all(start % 100 == 0 for start in starts)
    assert valid_rows == [start + i for start in starts for i in range(100)]
    assert positive_fraction(splits["validation"]) == pytest.approx(100 / 400)
    assert sorted(valid_rows + row_numbers(splits["train"])) == list(range(2000))
    assert splits["train"]["text"][:5] != sorted(splits["train"]["text"])[:5]  # shuffled, not in file order
    seen = {
        tuple(row_numbers(split_imdb(raw, "movie_blocks", valid_fraction=0.2, seed=s)["validation"])) for s in range(4)
    }
    assert len(seen) > 1
    assert row_numbers(split_imdb(raw, "movie_blocks", valid_fraction=0.2, seed=5)["validation"]) == valid_rows


def test_movie_blocks_needs_two_blocks_per_label(hub_raw: DatasetDict) -> None:
    """On a dataset too small for 100-review blocks the error names the scheme and the fix."""
    with pytest.raises(DataError, match="split_scheme: standard"):
        split_imdb(hub_raw, "movie_blocks", valid_fraction=0.1, seed=0)


def test_seed_scheme(hub_raw: DatasetDict) -> None:
    """Seed scheme: train is the full train set; test is divided 70/30 into test and validation."""
    splits = split_imdb(hub_raw, "seed", valid_fraction=0.3, seed=42)
    assert Counter(splits["train"]["text"]) == Counter(hub_raw["train"]["text"])
    n_test = len(hub_raw["test"])
    assert len(splits["validation"]) == round(0.3 * n_test)
    assert len(splits["test"]) == n_test - round(0.3 * n_test)
    test, valid = splits["test"]["text"], splits["validation"]["text"]
    assert not set(test) & set(valid)
    assert Counter(test) + Counter(valid) == Counter(hub_raw["test"]["text"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seed_scheme_is_stratified(seed: int) -> None:
    """Seed scheme: with 40% positives in test, its test and validation parts both keep 40%."""
    raw = in_memory(20, 300, positive=0.4)
    splits = split_imdb(raw, "seed", valid_fraction=0.3, seed=seed)
    assert len(splits["validation"]) == 90
    assert positive_fraction(splits["validation"]) == pytest.approx(0.4)
    assert positive_fraction(splits["test"]) == pytest.approx(0.4)
    assert splits["train"]["text"] != raw["train"]["text"]  # shuffled, not IMDB's label-sorted order
    assert sorted(splits["train"]["text"]) == sorted(raw["train"]["text"])


@pytest.mark.parametrize("scheme", ["standard", "seed"])
def test_max_samples_cut_sizes_and_keep_both_labels(hub_raw: DatasetDict, scheme: str) -> None:
    """max_train_samples / max_eval_samples cut the splits; the cuts hold both labels (not a sorted head)."""
    splits = split_imdb(hub_raw, scheme, valid_fraction=0.3, seed=42, max_train_samples=10, max_eval_samples=6)
    assert len(splits["train"]) == 10
    assert len(splits["validation"]) == 6
    assert len(splits["test"]) == 6
    for name in ("train", "test"):
        assert set(splits[name]["label"]) == {0, 1}, name
    full = split_imdb(hub_raw, scheme, valid_fraction=0.3, seed=42)
    assert set(splits["train"]["text"]) <= set(full["train"]["text"])
    assert set(splits["validation"]["text"]) <= set(full["validation"]["text"])
    assert set(splits["test"]["text"]) <= set(full["test"]["text"])


def test_max_samples_larger_than_split(hub_raw: DatasetDict) -> None:
    """A cut larger than a split keeps the whole split."""
    splits = split_imdb(hub_raw, "standard", seed=1, max_train_samples=10_000, max_eval_samples=10_000)
    assert len(splits["train"]) + len(splits["validation"]) == len(hub_raw["train"])
    assert len(splits["test"]) == len(hub_raw["test"])


def test_unknown_scheme(hub_raw: DatasetDict) -> None:
    """An unknown scheme is a DataError naming it."""
    with pytest.raises(DataError, match="'random'"):
        split_imdb(hub_raw, "random")


def test_corrupt_parquet_file_is_named(tmp_path: Path) -> None:
    """A damaged parquet file stops loading with a message naming that file."""
    root = tmp_path / "imdb"
    (root / "plain_text").mkdir(parents=True)
    texts, labels = make_split(20, 1)
    pq.write_table(pa.table({"text": texts, "label": labels}), root / "plain_text" / "train-00000-of-00001.parquet")
    good = pq.read_table(root / "plain_text" / "train-00000-of-00001.parquet")
    broken = root / "plain_text" / "test-00000-of-00001.parquet"
    pq.write_table(good, broken)
    broken.write_bytes(broken.read_bytes()[:-20])  # truncated: the footer is gone
    with pytest.raises(DataError, match=r"test-00000-of-00001\.parquet is not a readable parquet file"):
        load_imdb(str(root))


def test_max_eval_samples_keeps_the_seeded_shuffle_of_the_test_file(hub_raw: DatasetDict) -> None:
    """Under standard and movie_blocks the test split is the test file; max_eval_samples keeps the first N of
    its seed-shuffled order (Dataset.shuffle's permutation), so earlier cut runs keep their reviews."""
    splits = split_imdb(hub_raw, "standard", seed=7, max_eval_samples=9)
    assert splits["test"]["text"] == hub_raw["test"].shuffle(seed=7)["text"][:9]


# ------------------------------------------------------------------------- aclImdb and hub copy: same splits


@pytest.fixture(scope="module")
def same_reviews_two_layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same reviews as an aclImdb folder and as a hub-layout copy (neg then pos, each by review id, as the
    hub orders them). Ids run 0..n-1, so file names sort otherwise as strings (0, 1, 10, 100, 101, ...) than as
    numbers; train has more than two blocks of MOVIE_BLOCK_ROWS per label, for split_scheme movie_blocks."""
    root = tmp_path_factory.mktemp("two_layouts")
    acl, hub = root / "aclImdb", root / "hub"
    tables = {}
    for split, per_label, seed in (("train", 2 * sentiment.data.MOVIE_BLOCK_ROWS + 15, 11), ("test", 30, 12)):
        texts, labels = make_split(2 * per_label, seed)
        texts = [f"{text} ({split} review {i})" for i, text in enumerate(texts)]  # unique texts
        rows = []
        for label, name in enumerate(("neg", "pos")):
            folder = acl / split / name
            folder.mkdir(parents=True)
            own = [text for text, lab in zip(texts, labels, strict=True) if lab == label]
            for review_id, text in enumerate(own):
                (folder / f"{review_id}_{7 if label else 3}.txt").write_text(text, encoding="utf-8")
            rows += [(text, label) for text in own]
        tables[split] = pa.table(
            {"text": [t for t, _ in rows], "label": pa.array([lab for _, lab in rows], pa.int64())}
        )
    write_hub(hub, tables)
    names = [p.name for p in sorted((acl / "train" / "neg").glob("*.txt"))]
    assert names[:4] == ["0_3.txt", "100_3.txt", "101_3.txt", "102_3.txt"]  # string order differs from id order
    return acl, hub


def test_aclimdb_reads_reviews_in_the_hub_order(same_reviews_two_layouts: tuple[Path, Path], tmp_path: Path) -> None:
    """The aclImdb reader gives each split in the hub copy's order: neg then pos, each by numeric review id."""
    acl, hub = same_reviews_two_layouts
    from_acl = load_imdb(str(acl), cache_dir=str(tmp_path))
    from_hub = load_imdb(str(hub), cache_dir=str(tmp_path))
    for split in ("train", "test"):
        assert from_acl[split]["text"] == from_hub[split]["text"], split
        assert from_acl[split]["label"] == from_hub[split]["label"], split
    first_pos = from_acl["train"]["label"].index(1)
    assert from_acl["train"]["text"][1] == (acl / "train" / "neg" / "1_3.txt").read_text(encoding="utf-8")
    assert from_acl["train"]["text"][first_pos + 10] == (acl / "train" / "pos" / "10_7.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("scheme", "caps"),
    [
        ("standard", {}),
        ("movie_blocks", {}),
        ("seed", {}),
        ("standard", {"max_train_samples": 50, "max_eval_samples": 12}),
    ],
)
def test_aclimdb_and_hub_copy_give_the_same_splits(
    same_reviews_two_layouts: tuple[Path, Path], tmp_path: Path, scheme: str, caps: dict[str, int]
) -> None:
    """For a split_seed, the aclImdb folder and a hub-layout copy of the same reviews give identical splits: the
    same texts in the same order in train, validation and test."""
    acl, hub = same_reviews_two_layouts
    valid_fraction = 0.3 if scheme == "seed" else 0.1
    splits = [
        split_imdb(load_imdb(str(path), cache_dir=str(tmp_path)), scheme, valid_fraction, seed=5, **caps)
        for path in (acl, hub)
    ]
    for name in ("train", "validation", "test"):
        assert splits[0][name]["text"] == splits[1][name]["text"], name
        assert splits[0][name]["label"] == splits[1][name]["label"], name


# ---------------------------------------------------------------- cuts of a prepared folder, as of raw data


@pytest.fixture(scope="module")
def full_prepared(same_reviews_two_layouts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per split scheme, a prepared folder of the hub-layout copy with no cuts (token ids only, no vectors)."""
    _, hub = same_reviews_two_layouts
    root = tmp_path_factory.mktemp("full_prepared")
    folders = {}
    for scheme in ("standard", "movie_blocks", "seed"):
        cfg = build_config(None, {"dataset": str(hub), "split_scheme": scheme, "vectors": "none", "num_proc": 1})
        folders[scheme] = prepare_data(cfg, cache_dir=str(root / "cache")).save(root / scheme)
    return folders


@pytest.mark.parametrize("scheme", ["standard", "movie_blocks", "seed"])
@pytest.mark.parametrize(
    "caps", [{"max_train_samples": 40}, {"max_eval_samples": 11}, {"max_train_samples": 25, "max_eval_samples": 7}]
)
def test_prepared_folder_cuts_the_reviews_split_imdb_keeps(
    same_reviews_two_layouts: tuple[Path, Path], full_prepared: dict, scheme: str, caps: dict[str, int]
) -> None:
    """max_train_samples / max_eval_samples on a prepared folder keep the reviews split_imdb keeps from the raw
    data for the same seed, in the same order; the resolved config and the sizes record the cuts."""
    _, hub = same_reviews_two_layouts
    raw = load_imdb(str(hub))
    valid_fraction = 0.3 if scheme == "seed" else 0.1
    full = split_imdb(raw, scheme, valid_fraction, seed=42)
    cut = split_imdb(raw, scheme, valid_fraction, seed=42, **caps)
    data = PreparedData.load(full_prepared[scheme])
    whole = {name: split for name, split in data.splits.items()}
    cfg = build_config(None, {"prepared": str(full_prepared[scheme]), "report_to": "none", **caps})
    resolved, _ = data.resolve(cfg)
    for key in ("max_train_samples", "max_eval_samples"):
        assert getattr(resolved, key) == caps.get(key)
    for name in ("train", "validation", "test"):
        position = {text: i for i, text in enumerate(full[name]["text"])}
        rows = [position[text] for text in cut[name]["text"]]
        assert len(data.splits[name]) == len(rows) == data.info["sizes"][name]
        for i, row in enumerate(rows):
            np.testing.assert_array_equal(data.splits[name][i][0], whole[name][row][0])
        assert data.splits[name].labels.tolist() == cut[name]["label"]
    again, _ = data.resolve(cfg)  # resolving twice cuts nothing more
    assert data.info["sizes"] == {name: len(cut[name]) for name in ("train", "validation", "test")}
    assert again == resolved


def test_prepared_folder_refuses_cuts_and_data_keys_it_cannot_honour(
    same_reviews_two_layouts: tuple[Path, Path], full_prepared: dict, tmp_path: Path
) -> None:
    """A cut larger than a cut folder holds, or a data key set otherwise than the folder was prepared with, is a
    ConfigError naming the key and the `sentiment prepare` command; keys left at their defaults take the folder's."""
    folder = full_prepared["standard"]
    data = PreparedData.load(folder)
    data.resolve(build_config(None, {"prepared": str(folder), "max_train_samples": 30}))
    data.save(tmp_path / "cut")  # a folder holding the first 30 training reviews
    with pytest.raises(ConfigError, match=r"max_train_samples=31 .*max_train_samples=30.*sentiment prepare"):
        PreparedData.load(tmp_path / "cut").resolve(build_config(None, {"prepared": "x", "max_train_samples": 31}))
    smaller, _ = PreparedData.load(tmp_path / "cut").resolve(build_config(None, {"max_train_samples": 20}))
    assert smaller.max_train_samples == 20
    for key, value, spelt in (("lowercase", True, "true"), ("max_vocab_size", 50, "50"), ("split_seed", 7, "7"),
                              ("split_scheme", "seed", "seed")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"{key}: .* there, {spelt} here.*sentiment prepare .*--{key}={spelt}"):
            PreparedData.load(folder).resolve(build_config(None, {"prepared": str(folder), key: value}))
    resolved, _ = PreparedData.load(folder).resolve(
        build_config(None, {"dataset": "/elsewhere", "max_vocab_size": 20000})
    )
    assert resolved.dataset == str(same_reviews_two_layouts[1])  # where the folder's reviews came from


def test_training_from_a_prepared_folder_applies_max_samples(hub_imdb: Path, tmp_path: Path) -> None:
    """`sentiment train --prepared DIR --max_train_samples N --max_eval_samples M` trains and evaluates on the
    cut splits, and the run's config.yaml and metrics.json's sizes say so."""
    from test_training import tiny_config

    from sentiment.training import train

    prepare_data(tiny_config(hub_imdb, tmp_path / "unused")).save(tmp_path / "prepared")
    run = tmp_path / "run"
    cfg = tiny_config("/nonexistent", run, prepared=str(tmp_path / "prepared"), epochs=1)
    metrics = train(build_config(None, {**cfg.to_dict(), "max_train_samples": 30, "max_eval_samples": 20}))
    assert metrics["sizes"] == {"train": 30, "validation": 8, "test": 20}
    assert json.loads((run / "metrics.json").read_text())["sizes"] == metrics["sizes"]
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert (recorded["max_train_samples"], recorded["max_eval_samples"]) == (30, 20)


# ------------------------------------------------------------------ embedding_dim against the vectors' dimension


@pytest.fixture(scope="module")
def glove_folder(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder of the fixture reviews with the packaged 50-d GloVe vectors (the default)."""
    root = tmp_path_factory.mktemp("glove_prepared")
    cfg = build_config(None, {"dataset": str(hub_imdb), "num_proc": 1})
    return prepare_data(cfg, cache_dir=str(root / "cache")).save(root / "prepared")


def test_embedding_dim_other_than_the_vectors_is_refused(
    hub_imdb: Path, glove_folder: Path, glove_txt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """With vectors, an embedding_dim set to another size than theirs is a ConfigError naming both sizes, the
    vectors and the fixes: from `sentiment prepare` (before any review is read), from a prepared folder, and for a
    GloVe file of any dimension. It used to be replaced by the vectors' dimension without a word."""
    from sentiment.cli import main

    with pytest.raises(ConfigError) as raised:  # the dataset does not exist: the check comes first
        prepare_data(build_config(None, {"dataset": "/nonexistent", "embedding_dim": 64}))
    message = str(raised.value)
    assert "embedding_dim 64 does not match the 50-d vectors glove-6b-50d" in message
    assert "Remove embedding_dim" in message and "set it to 50" in message
    assert "--vectors none" in message and "64-d GloVe file" in message
    folder_cfg = build_config(None, {"prepared": str(glove_folder), "embedding_dim": 64})
    folder_name = re.escape(str(glove_folder))
    with pytest.raises(ConfigError, match=rf"64 does not match the 50-d vectors glove-6b-50d of {folder_name}: "):
        PreparedData.load(glove_folder).resolve(folder_cfg)
    file_cfg = build_config(None, {"dataset": str(hub_imdb), "vectors": str(glove_txt), "embedding_dim": 50})
    with pytest.raises(ConfigError, match=rf"50 does not match the 4-d vectors {re.escape(str(glove_txt))}: .*to 4"):
        prepare_data(file_cfg)
    code = main(["prepare", f"--dataset={hub_imdb}", "--embedding_dim=64", f"--output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert "error: embedding_dim 64 does not match the 50-d vectors glove-6b-50d" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_embedding_dim_100_written_out_is_refused_with_50d_vectors(
    hub_imdb: Path, glove_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``embedding_dim: 100`` written in a config (the size of a random embedding when it is left out) is a size
    the user asked for, not "unset": with the default 50-d GloVe it is refused like any other, from a YAML file, a
    flag and a prepared folder, never silently given 50."""
    from sentiment.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"dataset: {hub_imdb}\nembedding_dim: 100\nnum_proc: 1\n")
    expected = "embedding_dim 100 does not match the 50-d vectors glove-6b-50d"
    with pytest.raises(ConfigError, match=f"{expected}: .*set it to 50"):
        prepare_data(build_config(config))
    with pytest.raises(ConfigError, match=f"{expected} of {re.escape(str(glove_folder))}: "):
        PreparedData.load(glove_folder).resolve(build_config(config, {"prepared": str(glove_folder)}))
    code = main(["prepare", f"--dataset={hub_imdb}", "--embedding_dim=100", f"--output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert f"error: {expected}" in capsys.readouterr().err
    code = main(["prepare", f"--config={config}", f"--output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert f"error: {expected}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_embedding_dim_left_out_follows_the_vectors(hub_imdb: Path, glove_folder: Path, glove_txt: Path) -> None:
    """embedding_dim left out (None, its default) takes the vectors' dimension, prepared or not: the resolved config
    holds the integer."""
    data = PreparedData.load(glove_folder)
    assert data.info["embedding_dim"] == 50
    cfg = build_config(None, {"prepared": str(glove_folder)})
    assert cfg.embedding_dim is None
    resolved, embeddings = data.resolve(cfg)
    assert resolved.embedding_dim == 50
    assert embeddings is not None and embeddings.shape == (data.tokenizer.get_vocab_size(), 50)
    cfg = build_config(None, {"dataset": str(hub_imdb), "vectors": str(glove_txt), "num_proc": 1})
    direct = prepare_data(cfg)
    resolved, embeddings = direct.resolve(cfg)
    assert (direct.info["embedding_dim"], resolved.embedding_dim) == (4, 4)
    assert embeddings is not None and embeddings.shape[1] == 4


def test_embedding_dim_equal_to_the_vectors_is_accepted(hub_imdb: Path, glove_folder: Path, glove_txt: Path) -> None:
    """embedding_dim set to the vectors' own dimension is no error, on a prepared folder or raw data."""
    resolved, embeddings = PreparedData.load(glove_folder).resolve(
        build_config(None, {"prepared": str(glove_folder), "embedding_dim": 50})
    )
    assert resolved.embedding_dim == 50 and embeddings is not None and embeddings.shape[1] == 50
    cfg = build_config(None, {"dataset": str(hub_imdb), "vectors": str(glove_txt), "embedding_dim": 4, "num_proc": 1})
    resolved, embeddings = prepare_data(cfg).resolve(cfg)
    assert resolved.embedding_dim == 4 and embeddings is not None and embeddings.shape[1] == 4


def test_embedding_dim_without_vectors_is_the_configs(hub_imdb: Path, glove_folder: Path) -> None:
    """With vectors: none the config's embedding_dim is used, whatever it is (12, 64, 100): on raw data, and on a
    folder prepared with 50-d vectors (a random embedding over its token ids). Left out, it is 100 there, and on a
    folder prepared without vectors the folder's size."""
    cfg = build_config(None, {"dataset": str(hub_imdb), "vectors": "none", "embedding_dim": 64, "num_proc": 1})
    data = prepare_data(cfg)
    resolved, embeddings = data.resolve(cfg)
    assert (data.embeddings, embeddings, data.info["embedding_dim"], resolved.embedding_dim) == (None, None, 64, 64)
    assert data.resolve(build_config(None, {"vectors": "none", "embedding_dim": 12}))[0].embedding_dim == 12
    for size in (12, 100):
        resolved, embeddings = PreparedData.load(glove_folder).resolve(
            build_config(None, {"prepared": str(glove_folder), "vectors": "none", "embedding_dim": size})
        )
        assert (resolved.vectors, resolved.embedding_dim, embeddings) == ("none", size, None)
    left_out, _ = data.resolve(build_config(None, {"vectors": "none"}))
    assert left_out.embedding_dim == 64  # the size the folder was prepared with
    left_out, _ = PreparedData.load(glove_folder).resolve(build_config(None, {"vectors": "none"}))
    assert left_out.embedding_dim == 100  # the default size of a random embedding
    unset = build_config(None, {"dataset": str(hub_imdb), "vectors": "none", "num_proc": 1})
    assert unset.embedding_dim is None
    data = prepare_data(unset)
    assert (data.embeddings, data.info["embedding_dim"], data.resolve(unset)[0].embedding_dim) == (None, 100, 100)
    assert "--embedding_dim" not in prepare_command(data.info, "DIR")  # 100 is what a left-out size gives
    assert "--embedding_dim=12" in prepare_command({**data.info, "embedding_dim": 12}, "DIR")
