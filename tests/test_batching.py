"""Tests for sentiment.batching (samplers, collate, EncodedSplit) and PreparedData's save/load round trip."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from sentiment.batching import (
    EncodedSplit,
    LengthGroupedBatchSampler,
    PadCollator,
    SortedBatchSampler,
    make_dataloader,
)
from sentiment.config import TrainConfig
from sentiment.prepare import MANIFEST, PreparedData, PreparedDataError, prepare_data
from sentiment.text import PAD_ID


def random_lengths(n: int, seed: int = 0, high: int = 1000) -> np.ndarray:
    """``n`` random review lengths in 1..high."""
    return np.random.default_rng(seed).integers(1, high + 1, size=n)


def batches_of(sampler: LengthGroupedBatchSampler | SortedBatchSampler) -> list[list[int]]:
    """All batches one pass over ``sampler`` yields."""
    return [list(batch) for batch in sampler]


def flat(batches: list[list[int]]) -> list[int]:
    """The indices of ``batches`` in order."""
    return [i for batch in batches for i in batch]


# -------------------------------------------------------------------------------------- length-grouped


@pytest.mark.parametrize(("n", "batch_size"), [(1000, 32), (1001, 32), (17, 5), (7, 64), (250, 1)])
def test_every_index_once_per_epoch(n: int, batch_size: int) -> None:
    """Each epoch yields every index exactly once, in batches of at most batch_size."""
    sampler = LengthGroupedBatchSampler(random_lengths(n), batch_size, seed=1, chunk_batches=4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = batches_of(sampler)
        assert sorted(flat(batches)) == list(range(n))
        assert all(1 <= len(b) <= batch_size for b in batches)
        assert len(sampler) == len(batches)


def test_deterministic_per_seed_and_epoch() -> None:
    """Same (seed, epoch) gives the same batches; another epoch or seed gives different ones."""
    lengths = random_lengths(500)
    a = LengthGroupedBatchSampler(lengths, 16, seed=5)
    b = LengthGroupedBatchSampler(lengths, 16, seed=5)
    other_seed = LengthGroupedBatchSampler(lengths, 16, seed=6)
    a.set_epoch(2)
    b.set_epoch(2)
    other_seed.set_epoch(2)
    assert batches_of(a) == batches_of(b)
    assert batches_of(a) != batches_of(other_seed)
    epoch_2 = batches_of(a)
    a.set_epoch(3)
    assert batches_of(a) != epoch_2
    a.set_epoch(2)
    assert batches_of(a) == epoch_2


def test_order_changes_between_epochs() -> None:
    """Not only the batch order: the grouping of indices into batches changes between epochs."""
    sampler = LengthGroupedBatchSampler(random_lengths(400), 16, seed=0, chunk_batches=5)
    groupings = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        groupings.append({frozenset(b) for b in batches_of(sampler)})
    assert groupings[0] != groupings[1]


def test_batches_group_similar_lengths() -> None:
    """The mean spread of lengths within a batch is far below that of random batches."""
    lengths = random_lengths(4000, seed=3)
    batch_size = 32
    sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=0)
    grouped = np.mean([np.ptp(lengths[b]) for b in batches_of(sampler)])
    permutation = np.random.default_rng(9).permutation(len(lengths))
    shuffled = np.mean([np.ptp(lengths[permutation[i : i + batch_size]]) for i in range(0, 4000, batch_size)])
    assert grouped < 0.1 * shuffled


def test_batch_order_is_shuffled() -> None:
    """Batches are not served longest-first: the order of batch lengths is mixed."""
    lengths = random_lengths(2000, seed=4)
    sampler = LengthGroupedBatchSampler(lengths, 20, seed=0, chunk_batches=100)
    maxima = [int(lengths[b].max()) for b in batches_of(sampler)]
    assert maxima != sorted(maxima, reverse=True)
    assert maxima != sorted(maxima)


@pytest.mark.parametrize("num_replicas", [2, 3])
@pytest.mark.parametrize(("n", "batch_size"), [(1000, 32), (1001, 32), (103, 10), (5, 64), (11, 2)])
def test_sharded_across_processes(num_replicas: int, n: int, batch_size: int) -> None:
    """Ranks get equally many batches, are disjoint, and together cover every index exactly once."""
    lengths = random_lengths(n, seed=n)
    for epoch in range(2):
        per_rank = []
        for rank in range(num_replicas):
            sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=7, num_replicas=num_replicas, rank=rank)
            sampler.set_epoch(epoch)
            batches = batches_of(sampler)
            assert len(sampler) == len(batches)
            assert all(1 <= len(b) <= batch_size for b in batches)
            per_rank.append(batches)
        assert len({len(batches) for batches in per_rank}) == 1, [len(b) for b in per_rank]
        counts = Counter(i for batches in per_rank for i in flat(batches))
        assert sorted(counts) == list(range(n))
        assert set(counts.values()) == {1}


def test_sharding_matches_single_process_batches() -> None:
    """With 2 processes, rank r takes every 2nd batch of the global batch list."""
    lengths = random_lengths(300)
    ranks = [LengthGroupedBatchSampler(lengths, 8, seed=2, num_replicas=2, rank=r) for r in range(2)]
    global_batches = [b.tolist() for b in ranks[0].global_batches()]
    assert batches_of(ranks[0]) == global_batches[0::2]
    assert batches_of(ranks[1]) == global_batches[1::2]


def test_batch_size_one_uneven_drops_only_the_remainder() -> None:
    """Documented edge: batch_size 1 with a count that does not divide drops n % num_replicas reviews."""
    n, replicas = 7, 3
    lengths = random_lengths(n)
    seen = Counter()
    sizes = set()
    for rank in range(replicas):
        batches = batches_of(LengthGroupedBatchSampler(lengths, 1, num_replicas=replicas, rank=rank))
        sizes.add(len(batches))
        seen.update(flat(batches))
    assert sizes == {n // replicas}
    assert set(seen.values()) == {1}
    assert len(seen) == n - n % replicas


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 4, "num_replicas": 2, "rank": 2}, "rank"),
        ({"batch_size": 4, "num_replicas": 2, "rank": -1}, "rank"),
    ],
)
def test_sampler_argument_errors(kwargs: dict, message: str) -> None:
    """Bad batch size or rank are ValueErrors naming the argument."""
    with pytest.raises(ValueError, match=message):
        LengthGroupedBatchSampler(random_lengths(10), **kwargs)


def test_too_few_examples_for_processes() -> None:
    """Fewer examples than processes is refused."""
    with pytest.raises(ValueError, match="processes"):
        LengthGroupedBatchSampler([3, 4], 4, num_replicas=3, rank=0)


# --------------------------------------------------------------------------------------- sorted (eval)


def test_sorted_sampler_longest_first() -> None:
    """One process: batches of at most batch_size, every index once, lengths non-increasing."""
    lengths = random_lengths(103, seed=8)
    sampler = SortedBatchSampler(lengths, 10)
    batches = batches_of(sampler)
    order = flat(batches)
    assert sorted(order) == list(range(103))
    assert all(len(b) <= 10 for b in batches)
    assert list(lengths[order]) == sorted(lengths, reverse=True)
    assert len(sampler) == len(batches) == 11


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_sorted_sampler_sharded(num_replicas: int) -> None:
    """Several processes: each example is evaluated once overall; each rank goes longest first."""
    lengths = random_lengths(101, seed=9)
    counts = Counter()
    for rank in range(num_replicas):
        sampler = SortedBatchSampler(lengths, 8, num_replicas=num_replicas, rank=rank)
        batches = batches_of(sampler)
        assert len(sampler) == len(batches)
        order = flat(batches)
        assert list(lengths[order]) == sorted(lengths[order], reverse=True)
        counts.update(order)
    assert sorted(counts) == list(range(101))
    assert set(counts.values()) == {1}


# --------------------------------------------------------------------------------------------- collate


@pytest.mark.parametrize("pad_id", [PAD_ID, 7])
def test_pad_collator(pad_id: int) -> None:
    """Rows are the ids followed by pad_id; lengths are the true lengths; labels are float."""
    examples = [(np.array([5, 6, 7]), 1), (np.array([9]), 0), (np.array([2, 3, 4, 5, 8]), 1)]
    batch = PadCollator(pad_id)(examples)
    width = max(len(ids) for ids, _ in examples)
    assert batch["input_ids"].shape == (len(examples), width)
    assert batch["input_ids"].dtype == torch.int64
    for row, (ids, _) in enumerate(examples):
        assert batch["input_ids"][row, : len(ids)].tolist() == ids.tolist()
        assert batch["input_ids"][row, len(ids) :].tolist() == [pad_id] * (width - len(ids))
    assert batch["lengths"].tolist() == [len(ids) for ids, _ in examples]
    assert batch["lengths"].dtype == torch.int64
    assert batch["lengths"].device.type == "cpu"
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [float(label) for _, label in examples]


# ---------------------------------------------------------------------------------------- EncodedSplit


def id_table(rows: list[list[int]], labels: list[int]) -> pa.Table:
    """A table like the encoded datasets: ``input_ids`` list<int32> and ``label``."""
    return pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32())), "label": pa.array(labels, pa.int64())})


ROWS = [[4, 5, 6], [7], [8, 9], [10, 11, 12, 13], [2], [3, 3], [14, 15, 16], [17]]
LABELS = [0, 1, 1, 0, 1, 0, 0, 1]


def check_split(split: EncodedSplit, rows: list[list[int]], labels: list[int]) -> None:
    """``split`` holds exactly ``rows`` and ``labels``."""
    assert len(split) == len(rows)
    assert split.offsets[0] == 0
    assert split.lengths.tolist() == [len(r) for r in rows]
    assert [split[i][0].tolist() for i in range(len(split))] == rows
    assert [split[i][1] for i in range(len(split))] == labels
    assert split.labels.tolist() == labels
    assert split.token_ids.tolist() == [t for r in rows for t in r]


def test_encoded_split_from_arrow() -> None:
    """A table converts into flat ids, offsets and labels that give back every row."""
    check_split(EncodedSplit.from_arrow(id_table(ROWS, LABELS)), ROWS, LABELS)


@pytest.mark.parametrize(("start", "length"), [(3, 4), (1, 7), (5, 1)])
def test_encoded_split_from_sliced_table(start: int, length: int) -> None:
    """A sliced table (offsets not starting at 0) gives the rows of the slice only."""
    table = id_table(ROWS, LABELS).slice(start, length)
    assert table.column("input_ids").chunk(0).offsets[0].as_py() != 0  # the case being tested
    check_split(EncodedSplit.from_arrow(table), ROWS[start : start + length], LABELS[start : start + length])


def test_encoded_split_from_chunked_table() -> None:
    """A table of several (sliced) chunks gives the rows in order."""
    table = pa.concat_tables([id_table(ROWS, LABELS).slice(2, 3), id_table(ROWS, LABELS).slice(5, 3)])
    assert table.column("input_ids").num_chunks == 2
    check_split(EncodedSplit.from_arrow(table), ROWS[2:8], LABELS[2:8])


def test_encoded_split_from_empty_table() -> None:
    """An empty table gives an empty split."""
    split = EncodedSplit.from_arrow(id_table([], []))
    assert len(split) == 0
    assert split.offsets.tolist() == [0]


def test_dataloader_serves_padded_examples() -> None:
    """make_dataloader (train and eval) yields every example once, padded with the pad id."""
    split = EncodedSplit.from_arrow(id_table(ROWS, LABELS))
    for train in (True, False):
        seen = []
        for batch in make_dataloader(split, 3, pad_id=PAD_ID, train=train, seed=1):
            for row, length, label in zip(batch["input_ids"], batch["lengths"], batch["labels"], strict=True):
                ids = row[:length].tolist()
                assert row[length:].tolist() == [PAD_ID] * (len(row) - length)
                seen.append((tuple(ids), int(label)))
        assert Counter(seen) == Counter((tuple(r), label) for r, label in zip(ROWS, LABELS, strict=True))


# ---------------------------------------------------------------------------------------- PreparedData


@pytest.fixture(scope="session")
def prepared(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """prepare_data on the hub fixture with the packaged GloVe 6B 50d."""
    cfg = TrainConfig(dataset=str(hub_imdb), report_to="none", vectors="glove-6b-50d", num_proc=1)
    return prepare_data(cfg, cache_dir=str(tmp_path_factory.mktemp("prepare-cache")))


def test_prepared_data_contents(prepared: PreparedData) -> None:
    """The prepared data has the three splits, 50-d embeddings for the vocabulary, and consistent info."""
    assert set(prepared.splits) == {"train", "validation", "test"}
    assert prepared.embeddings is not None
    assert prepared.embeddings.shape == (prepared.tokenizer.get_vocab_size(), 50)
    assert prepared.info["sizes"] == {name: len(split) for name, split in prepared.splits.items()}
    assert prepared.info["sizes"]["test"] == 60
    assert prepared.info["sizes"]["train"] + prepared.info["sizes"]["validation"] == 80
    assert prepared.info["embedding_dim"] == 50
    assert 0 < prepared.info["vectors_coverage"] <= 1


def test_prepared_save_load_round_trip(prepared: PreparedData, tmp_path: Path) -> None:
    """save then load gives the same ids, labels, tokenizer vocabulary, embeddings and info."""
    folder = prepared.save(tmp_path / "prepared")
    loaded = PreparedData.load(folder)
    assert set(loaded.splits) == set(prepared.splits)
    for name, split in prepared.splits.items():
        other = loaded.splits[name]
        np.testing.assert_array_equal(other.token_ids, split.token_ids)
        np.testing.assert_array_equal(other.offsets, split.offsets)
        np.testing.assert_array_equal(other.labels, split.labels)
    assert loaded.tokenizer.get_vocab() == prepared.tokenizer.get_vocab()
    assert loaded.tokenizer.to_str() == prepared.tokenizer.to_str()
    assert loaded.embeddings is not None and prepared.embeddings is not None
    assert loaded.embeddings.dtype == np.float32
    np.testing.assert_array_equal(loaded.embeddings, prepared.embeddings)
    assert loaded.info == {"format_version": 1, **json.loads(json.dumps(prepared.info))}
    assert loaded.data_config() == prepared.data_config()


def test_prepared_without_embeddings_round_trip(prepared: PreparedData, tmp_path: Path) -> None:
    """With no embeddings (vectors: none) no embeddings file is written and load gives None."""
    data = PreparedData(prepared.splits, prepared.tokenizer, None, {"vectors": "none"})
    folder = data.save(tmp_path / "prepared")
    assert not (folder / "embeddings.safetensors").exists()
    assert PreparedData.load(folder).embeddings is None


def test_save_replaces_existing_folder(prepared: PreparedData, tmp_path: Path) -> None:
    """Saving onto an existing folder replaces its contents and leaves no temporary folder behind."""
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    prepared.save(folder)
    prepared.save(folder)
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            "train.parquet",
            "validation.parquet",
            "test.parquet",
            "tokenizer.json",
            "embeddings.safetensors",
            MANIFEST,
        ]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]
    assert len(PreparedData.load(folder).splits["test"]) == len(prepared.splits["test"])


def test_load_rejects_incomplete_folders(prepared: PreparedData, tmp_path: Path) -> None:
    """A folder without the manifest, or missing a split, is a PreparedDataError naming what is missing."""
    with pytest.raises(PreparedDataError, match=MANIFEST):
        PreparedData.load(tmp_path)
    folder = prepared.save(tmp_path / "prepared")
    (folder / "validation.parquet").unlink()
    with pytest.raises(PreparedDataError, match=r"validation\.parquet"):
        PreparedData.load(folder)


def _ddp_step(rank: int, folder: str, weighted: bool) -> None:
    """One DDP training step on two gloo processes: rank 0 trains on 4 reviews, rank 1 on 2 (a halved batch)."""
    import torch.distributed as dist

    from sentiment.graphs import train_step
    from sentiment.model import LSTMClassifier

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = LSTMClassifier(40, 6, 5, 1, True, dropout=0.0).double()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        reviews = _six_reviews()
        mine = reviews[:4] if rank == 0 else reviews[4:]
        batch = PadCollator(pad_id=1)(mine)
        batch["labels"] = batch["labels"].double()
        totals = torch.zeros(3, dtype=torch.float64)
        train_step(ddp, optimizer, batch, totals, denominator=6 / 2 if weighted else None)
        torch.save([p.detach() for p in model.parameters()], f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _six_reviews() -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(3)
    lengths, labels = [9, 8, 8, 7, 3, 2], [1, 0, 1, 1, 0, 0]
    return [(rng.integers(2, 40, length), label) for length, label in zip(lengths, labels, strict=True)]


@pytest.mark.parametrize("weighted", [True, False])
def test_two_processes_weigh_every_review_of_a_step_the_same(tmp_path: Path, weighted: bool) -> None:
    """Two processes whose batches of one step differ in size (4 and 2 reviews) take the step of one process on
    all 6 reviews when each loss is divided by the step's reviews over the process count; a plain mean per process
    (the halved batch's reviews weighing twice) does not."""
    import torch.multiprocessing as mp

    from sentiment.graphs import train_step
    from sentiment.model import LSTMClassifier

    mp.spawn(_ddp_step, args=(str(tmp_path), weighted), nprocs=2, join=True)
    torch.manual_seed(0)
    model = LSTMClassifier(40, 6, 5, 1, True, dropout=0.0).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = PadCollator(pad_id=1)(_six_reviews())
    batch["labels"] = batch["labels"].double()
    train_step(model, optimizer, batch, torch.zeros(3, dtype=torch.float64))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*ranks, strict=True))  # DDP: the same weights on both
    same = all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(ranks[0], model.parameters(), strict=True))
    assert same == weighted
