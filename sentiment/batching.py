"""Batching: encoded reviews in flat arrays, a length-grouped batch sampler (the BucketIterator idea) that
shards across processes, evaluation batches sorted by length, and a padding collate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass
class EncodedSplit(Dataset):
    """A split of encoded reviews: all token ids in one flat array, ``offsets`` (n + 1) and ``labels`` (n)."""

    token_ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_arrow(cls, table: pa.Table) -> EncodedSplit:
        """From a table with ``input_ids`` (list of ints) and ``label`` columns (zero-copy where possible)."""
        ids = table.column("input_ids").combine_chunks()
        if isinstance(ids, pa.ChunkedArray):  # an empty table
            ids = pa.array([], pa.list_(pa.int32()))
        base = ids.offsets[0].as_py() if len(ids) else 0
        offsets = ids.offsets.to_numpy().astype(np.int64) - base
        values = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        labels = table.column("label").to_numpy().astype(np.int64)
        return cls(values, offsets, labels)

    @property
    def lengths(self) -> np.ndarray:
        """The number of tokens of each review."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.token_ids[self.offsets[index] : self.offsets[index + 1]], int(self.labels[index])


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of reviews of similar length, drawn afresh each epoch, sharded across processes.

    Each epoch (``set_epoch``) shuffles the indices with ``seed + epoch``, sorts them by length within chunks of
    ``chunk_batches`` batches and cuts the chunks into batches. Under several processes (``num_replicas``), the
    batches of one step are neighbours in a chunk's length order, so the processes of a step train on batches of
    similar length and none waits long for another: each chunk's batches form groups of ``num_replicas``, the
    groups are shuffled, and process ``rank`` takes the ``rank``-th batch of each group. To give every process
    the same number of batches while still showing every review exactly once, a chunk's largest batches are
    halved until its count divides evenly (so no review is dropped or repeated; only with ``batch_size`` 1 and a
    count that does not divide are the last few reviews of the epoch left out). Batches of one step may so differ
    in size: ``step_sizes`` gives each step's total, for a loss that weighs every review of a step the same. With
    one process, the batches are simply shuffled.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        seed: int = 0,
        chunk_batches: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}) (got {rank})")
        if len(lengths) < num_replicas:
            raise ValueError(f"{len(lengths)} examples cannot be shared by {num_replicas} processes")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.chunk_size = batch_size * chunk_batches
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch whose batches ``__iter__`` yields (deterministic per seed and epoch), leaving out this
        process's first ``skip_batches`` batches (to continue an epoch interrupted after that many steps)."""
        self.epoch = epoch
        self.skip_batches = skip_batches

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The batches of this epoch (or of ``epoch``) for all processes together, in order: step after step, the
        ``num_replicas`` batches of each step one after another."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        order = rng.permutation(len(self.lengths))
        replicas = self.num_replicas
        groups: list[list[np.ndarray]] = []
        left: list[np.ndarray] = []  # batches a chunk could not share out evenly (single reviews)
        for start in range(0, len(order), self.chunk_size):
            chunk = order[start : start + self.chunk_size]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            cut = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            batches = _even_out(cut, replicas)
            shared = len(batches) - len(batches) % replicas
            groups += [batches[i : i + replicas] for i in range(0, shared, replicas)]
            left += batches[shared:]
        while len(left) % replicas and groups:  # give up a step of larger batches to share out what is left
            index = max(range(len(groups)), key=lambda i: max(len(batch) for batch in groups[i]))
            if max(len(batch) for batch in groups[index]) == 1:
                break
            left += _even_out(groups.pop(index), replicas + 1)
        left.sort(key=lambda batch: -int(self.lengths[batch].max()))
        shared = len(left) - len(left) % replicas  # only single reviews that cannot be shared stay out
        groups += [left[i : i + replicas] for i in range(0, shared, replicas)]
        return [batch for index in rng.permutation(len(groups)) for batch in groups[index]]

    def step_sizes(self) -> list[int]:
        """For each step this process takes (after ``skip_batches``), the reviews all processes train on in it."""
        batches = self.global_batches()
        replicas = self.num_replicas
        sizes = [sum(len(batch) for batch in batches[i : i + replicas]) for i in range(0, len(batches), replicas)]
        return sizes[self.skip_batches :]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.rank :: self.num_replicas][self.skip_batches :]:
            yield batch.tolist()

    def __len__(self) -> int:
        return max(len(self.global_batches()) // self.num_replicas - self.skip_batches, 0)


def _even_out(batches: list[np.ndarray], replicas: int) -> list[np.ndarray]:
    """Halve the largest batches (each into two neighbours) until their count divides by ``replicas``, as far as
    batches of more than one review allow (``replicas`` + 1 on a group of ``replicas``: one halving)."""
    while len(batches) % replicas:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) == 1:
            break
        batch = batches.pop(largest)
        half = math.ceil(len(batch) / 2)
        batches[largest:largest] = [batch[:half], batch[half:]]
    return batches


class SortedBatchSampler(Sampler[list[int]]):
    """Evaluation batches: indices sorted by length (longest first), batched, dealt round-robin to processes.

    Processes may get different numbers of batches; every example is evaluated exactly once overall.
    """

    def __init__(
        self, lengths: Sequence[int] | np.ndarray, batch_size: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        order = np.argsort(-np.asarray(lengths), kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.batches = batches[rank::num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self.batches)


def bucket_length(length: int, per_octave: int = 8) -> int:
    """The smallest length of a bounded ladder that is at least ``length``: every length up to
    ``2 * per_octave``, then ``per_octave`` evenly spaced lengths per octave (at most 1/``per_octave`` more padding),
    so batches of any length take one of a few dozen shapes."""
    if length <= 2 * per_octave:
        return max(length, 1)
    octave = 1 << (length.bit_length() - 1)
    step = octave // per_octave
    return -(-length // step) * step


class PadCollator:
    """Pad a list of ``(ids, label)`` into ``input_ids`` (B x T, int64), ``lengths`` (B, on CPU, as
    ``pack_padded_sequence`` wants) and ``labels`` (B, float32).

    With ``fixed_rows`` (for CUDA graphs, which replay fixed shapes), T is rounded up by :func:`bucket_length`,
    the batch is filled up to ``fixed_rows`` rows with one-token filler reviews, and ``weights`` (1 for a real
    review, 0 for filler) is added.
    """

    def __init__(self, pad_id: int, fixed_rows: int | None = None) -> None:
        self.pad_id = pad_id
        self.fixed_rows = fixed_rows

    def __call__(self, examples: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        lengths = [len(ids) for ids, _ in examples]
        labels = [label for _, label in examples]
        rows, steps = len(examples), max(lengths)
        if self.fixed_rows is not None:
            if rows > self.fixed_rows:
                raise ValueError(f"a batch of {rows} reviews does not fit fixed_rows={self.fixed_rows}")
            rows, steps = self.fixed_rows, bucket_length(steps)
        input_ids = np.full((rows, steps), self.pad_id, dtype=np.int64)
        for row, (ids, _) in enumerate(examples):
            input_ids[row, : len(ids)] = ids
        filler = rows - len(examples)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "lengths": torch.tensor(lengths + [1] * filler, dtype=torch.int64),
            "labels": torch.tensor(labels + [0] * filler, dtype=torch.float32),
        }
        if self.fixed_rows is not None:
            batch["weights"] = torch.tensor([1.0] * len(examples) + [0.0] * filler, dtype=torch.float32)
        return batch


def make_dataloader(
    split: EncodedSplit,
    batch_size: int,
    pad_id: int,
    train: bool,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    fixed_shapes: bool = False,
) -> DataLoader:
    """A DataLoader over ``split``: length-grouped shuffled batches for training, sorted ones for evaluation.
    ``fixed_shapes``: batches of exactly ``batch_size`` rows and bucketed lengths (see :class:`PadCollator`)."""
    if train:
        sampler: Sampler = LengthGroupedBatchSampler(
            split.lengths, batch_size, seed=seed, num_replicas=num_replicas, rank=rank
        )
    else:
        sampler = SortedBatchSampler(split.lengths, batch_size, num_replicas=num_replicas, rank=rank)
    # A generator of its own: creating an iterator draws a seed from it, which would otherwise come from the global
    # RNG and make a run resumed mid-epoch draw different dropout masks than the uninterrupted run.
    generator = torch.Generator().manual_seed(seed)
    collate = PadCollator(pad_id, fixed_rows=batch_size if fixed_shapes else None)
    # Fixed shapes feed CUDA graphs: pinned batches copy to the GPU without waiting for the step in flight.
    pin_memory = fixed_shapes and torch.cuda.is_available()
    return DataLoader(split, batch_sampler=sampler, collate_fn=collate, generator=generator, pin_memory=pin_memory)
