"""Fixed-shape batches (bucketed lengths, filler rows of weight 0) and CUDA-graph training steps.

On CPU: a step on a fixed-shape batch changes the weights exactly as a plain step on the unpadded batch does.
On a GPU (skipped without one): graph replay matches eager steps.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sentiment.batching import PadCollator, bucket_length
from sentiment.graphs import GraphedTrainStep, weighted_train_step
from sentiment.model import LSTMClassifier

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def examples(lengths: list[int], vocab_size: int = 60, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(2, vocab_size, length), int(rng.integers(0, 2))) for length in lengths]


def test_bucket_length_ladder() -> None:
    """Every length maps to a ladder length at least as long and at most 1/8 longer; few distinct shapes."""
    buckets = [bucket_length(length) for length in range(1, 5001)]
    assert all(b >= length for length, b in zip(range(1, 5001), buckets, strict=True))
    assert all(b <= max(length * 9 / 8, 16) for length, b in zip(range(1, 5001), buckets, strict=True))
    assert buckets == sorted(buckets)
    assert bucket_length(16) == 16 and bucket_length(17) == 18 and bucket_length(1000) == 1024
    assert len(set(buckets)) <= 16 + 8 * 9  # 16 short lengths, 8 per octave up to 8192


def test_fixed_rows_collate_pads_rows_and_length() -> None:
    batch = PadCollator(pad_id=1, fixed_rows=5)(examples([17, 3, 9]))
    assert batch["input_ids"].shape == (5, 18)
    assert batch["weights"].tolist() == [1, 1, 1, 0, 0]
    assert batch["lengths"].tolist() == [17, 3, 9, 1, 1]
    assert (batch["input_ids"][3:] == 1).all() and (batch["input_ids"][0, 17:] == 1).all()
    with pytest.raises(ValueError, match="fixed_rows"):
        PadCollator(pad_id=1, fixed_rows=2)(examples([4, 4, 4]))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_weighted_step_on_fixed_shape_equals_plain_step(bidirectional: bool) -> None:
    """Three steps on bucketed, row-filled batches leave the same weights and figures as plain steps."""
    torch.manual_seed(0)
    pooling = "concat" if bidirectional else "last"
    plain = LSTMClassifier(60, 6, 5, 2, bidirectional, dropout=0.0, rnn_input="fused", pooling=pooling)
    plain = plain.double().train()
    fixed = copy.deepcopy(plain)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=0.01)
    fixed_opt = torch.optim.Adam(fixed.parameters(), lr=0.01)
    totals = torch.zeros(3, dtype=torch.float64)
    plain_loss_sum = plain_correct = plain_count = 0.0
    for seed, lengths in enumerate([[19, 7, 3], [4, 4], [33, 30, 2, 9]]):
        batch = examples(lengths, seed=seed)
        loose = PadCollator(pad_id=1)(batch)
        logits = plain(loose["input_ids"], loose["lengths"])
        loss = F.binary_cross_entropy_with_logits(logits, loose["labels"].double())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        plain_opt.step()
        plain_opt.zero_grad()
        plain_loss_sum += loss.item() * len(lengths)
        plain_correct += ((logits > 0).double() == loose["labels"]).sum().item()
        plain_count += len(lengths)

        tight = PadCollator(pad_id=1, fixed_rows=6)(batch)
        tight = {k: v.double() if v.is_floating_point() else v for k, v in tight.items()}
        weighted_train_step(fixed, fixed_opt, tight, totals, max_grad_norm=0.5)
        fixed_opt.zero_grad()
    # float64; Adam divides by the root of tiny second moments, which turns rounding in the summation order of
    # near-zero embedding gradients into differences of about 1e-8 (everything else agrees to 1e-12).
    for a, b in zip(plain.parameters(), fixed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(totals, torch.tensor([plain_loss_sum, plain_correct, plain_count], dtype=torch.float64))


@needs_cuda
def test_graph_replay_matches_eager_steps() -> None:
    """Graph replays over several shapes, in any order, update the weights as eager steps do."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    eager = LSTMClassifier(80, 8, 16, 2, True, dropout=0.0, rnn_input="fused").to(device).train()
    graphed = copy.deepcopy(eager)
    eager_opt = torch.optim.Adam(eager.parameters(), lr=0.01, capturable=True)
    graph_opt = torch.optim.Adam(graphed.parameters(), lr=0.01, capturable=True)
    step = GraphedTrainStep(graphed, graph_opt, max_grad_norm=1.0)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    collate = PadCollator(pad_id=1, fixed_rows=8)
    for seed, lengths in enumerate([[40, 33], [5, 5, 5, 5, 5, 5, 5, 5], [37, 38, 3], [6, 2], [120, 64, 100]]):
        batch = collate(examples(lengths, vocab_size=80, seed=seed))
        step.step(batch)
        weighted_train_step(eager, eager_opt, {k: v.to(device) for k, v in batch.items()}, totals, 1.0)
        eager_opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    assert len(step.graphs) == 4  # lengths 40 and 37/38 share the bucket 40
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step.totals, totals, rtol=1e-5, atol=1e-4)
