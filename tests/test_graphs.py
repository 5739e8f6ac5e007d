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
from sentiment.config import build_config
from sentiment.graphs import GraphedTrainStep, train_step, zero_nonfinite_gradients
from sentiment.model import LSTMClassifier
from sentiment.optim import build_optimizer, build_schedule

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
        train_step(fixed, fixed_opt, tight, totals, max_grad_norm=0.5)
        fixed_opt.zero_grad()
    # float64; Adam divides by the root of tiny second moments, which turns rounding in the summation order of
    # near-zero embedding gradients into differences of about 1e-8 (everything else agrees to 1e-12).
    for a, b in zip(plain.parameters(), fixed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(totals, torch.tensor([plain_loss_sum, plain_correct, plain_count], dtype=torch.float64))


def test_zero_nonfinite_gradients_clips_or_zeroes() -> None:
    """Finite gradients are clipped to the norm and kept; one infinite or NaN entry sets every gradient to zero."""
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[0].grad = torch.tensor([3.0, 0.0, 4.0])
    params[1].grad = torch.zeros(2, 2)
    assert zero_nonfinite_gradients(params, max_grad_norm=1.0).item() == 0
    torch.testing.assert_close(params[0].grad, torch.tensor([0.6, 0.0, 0.8]), rtol=1e-4, atol=1e-6)
    params[0].grad = torch.tensor([0.5, 0.0, 0.0])  # below the norm: unchanged
    assert zero_nonfinite_gradients(params, max_grad_norm=1.0).item() == 0
    torch.testing.assert_close(params[0].grad, torch.tensor([0.5, 0.0, 0.0]))
    for bad in (float("inf"), float("nan")):
        params[1].grad[0, 1] = bad
        assert zero_nonfinite_gradients(params, max_grad_norm=None).item() == 1
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
        params[1].grad[0, 1] = bad
        assert zero_nonfinite_gradients(params, max_grad_norm=1.0).item() == 1
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_finite_gradients_are_clipped_not_zeroed(dtype: torch.dtype) -> None:
    """Gradients of 1e30 (an exploding LSTM; their squares overflow, so clip_grad_norm_'s norm is infinite) are
    finite: they are clipped to the norm in their own direction, and the step is not counted as an overflow."""
    params = [torch.nn.Parameter(torch.zeros(3, dtype=dtype)), torch.nn.Parameter(torch.zeros(2, dtype=dtype))]
    params[0].grad = torch.tensor([3e30, 0.0, -4e30], dtype=dtype)
    params[1].grad = torch.tensor([1.0, 0.0], dtype=dtype)
    assert not torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params]))  # what clipping used
    assert zero_nonfinite_gradients(params, max_grad_norm=2.0).item() == 0
    expected = torch.tensor([1.2, 0.0, -1.6])
    torch.testing.assert_close(params[0].grad.float(), expected, rtol=1e-2, atol=1e-6)
    assert params[1].grad.abs().max().item() < 1e-20  # its share of the norm, next to 5e30


def test_step_with_nan_gradients_leaves_the_weights_finite() -> None:
    """An overflowing step (NaN gradients in the LSTM) is counted and changes no weight; the next one trains."""
    torch.manual_seed(0)
    model = LSTMClassifier(60, 6, 5, 1, False, dropout=0.0, rnn_input="padded").double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    poison = model.lstm.weight_hh_l0.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    batch = PadCollator(pad_id=1, fixed_rows=4)(examples([9, 5, 7]))
    totals = torch.zeros(3, dtype=torch.float64)
    nonfinite = torch.zeros((), dtype=torch.int64)
    train_step(model, optimizer, batch, totals, max_grad_norm=1.0, nonfinite_steps=nonfinite)
    optimizer.zero_grad(set_to_none=True)
    assert nonfinite.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    poison.remove()
    train_step(model, optimizer, batch, totals, max_grad_norm=1.0, nonfinite_steps=nonfinite)
    assert nonfinite.item() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.lstm.weight_hh_l0, before[2])


@needs_cuda
@pytest.mark.parametrize("capture_first", [False, True])
def test_graph_replay_matches_eager_steps(capture_first: bool) -> None:
    """Graph replays over several shapes, in any order, update the weights as eager steps do: graphs captured on
    first use, and graphs captured before training, largest first, sharing one memory pool."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    eager = LSTMClassifier(80, 8, 16, 2, True, dropout=0.0, rnn_input="fused").to(device).train()
    graphed = copy.deepcopy(eager)
    eager_opt = torch.optim.Adam(eager.parameters(), lr=0.01, capturable=True)
    graph_opt = torch.optim.Adam(graphed.parameters(), lr=0.01, capturable=True)
    step = GraphedTrainStep(graphed, graph_opt, max_grad_norm=1.0)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    collate = PadCollator(pad_id=1, fixed_rows=8)
    lengths_per_step = [[40, 33], [5, 5, 5, 5, 5, 5, 5, 5], [37, 38, 3], [6, 2], [120, 64, 100]]
    if capture_first:  # all shapes before the first step, the largest first: the later ones reuse its memory
        step.capture({(8, bucket_length(max(lengths))) for lengths in lengths_per_step})
        assert list(step.graphs) == [(8, 120), (8, 40), (8, 6), (8, 5)]
        # Captures change nothing: the weights, the optimizer's moments, the totals; no gradient is left.
        assert all(torch.equal(a, b) for a, b in zip(eager.parameters(), graphed.parameters(), strict=True))
        assert all(p.grad is None and not graph_opt.state[p]["exp_avg"].any() for p in graphed.parameters())
        assert not step.totals.any() and not step.nonfinite_steps.any()
    for seed, lengths in enumerate(lengths_per_step):
        batch = collate(examples(lengths, vocab_size=80, seed=seed))
        step.step(batch)
        train_step(eager, eager_opt, {k: v.to(device) for k, v in batch.items()}, totals, 1.0)
        eager_opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    assert len(step.graphs) == 4  # lengths 40 and 37/38 share the bucket 40
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step.totals, totals, rtol=1e-5, atol=1e-4)


@needs_cuda
def test_graph_replay_follows_per_group_schedules() -> None:
    """Discriminative learning rates, gradual unfreezing and one-cycle under graphs: each parameter group's
    learning rate is a device tensor the scheduler rewrites in place, which replays read (frozen groups stay
    exactly as they were); the weights follow eager steps with the same schedule."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    options = {"lr": 0.01, "lr_layer_decay": 0.5, "gradual_unfreezing": True, "lr_schedule": "onecycle", "epochs": 6}
    cfg = build_config(None, {**options, "optimizer": "adamw", "weight_decay": 0.01})
    eager = LSTMClassifier(80, 8, 16, 2, False, dropout=0.0, rnn_input="padded", pooling="concat").to(device)
    graphed = copy.deepcopy(eager)
    eager_opt, graph_opt = (build_optimizer(cfg, model, True, device) for model in (eager, graphed))
    schedulers = [build_schedule(cfg, opt, steps_per_epoch=1) for opt in (eager_opt, graph_opt)]  # 6 epochs of 1 step
    step = GraphedTrainStep(graphed, graph_opt, max_grad_norm=1.0)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    collate = PadCollator(pad_id=1, fixed_rows=8)
    embedding_before = graphed.embedding.weight.detach().clone()
    lengths_per_step = [[40, 33], [5, 5, 5], [37, 38, 3], [6, 2], [40, 12], [7, 7]]
    for seed, lengths in enumerate(lengths_per_step):
        batch = collate(examples(lengths, vocab_size=80, seed=seed))
        step.step(batch)
        train_step(eager, eager_opt, {k: v.to(device) for k, v in batch.items()}, totals, 1.0)
        eager_opt.zero_grad(set_to_none=True)
        for scheduler in schedulers:
            scheduler.step()
        if seed == 2:  # three epochs of one step: the embedding (depth 3) has not moved yet
            torch.cuda.synchronize()
            assert torch.equal(graphed.embedding.weight, embedding_before)
    torch.cuda.synchronize()
    assert not torch.equal(graphed.embedding.weight, embedding_before)  # unfrozen from the fourth epoch
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("chunk_tokens", [None, 100])
def test_graph_replay_draws_the_eager_dropout_masks(chunk_tokens: int | None) -> None:
    """With every kind of dropout on, graphs (captured before training) replayed from a seed train exactly as eager
    steps from the same seed: captures draw no random numbers, and a replay draws what an eager step draws. So a
    run that falls back to eager steps (less memory) trains as the graphed run would; also with the longer
    batches run in groups of rows (``chunk_tokens``) inside the graphs and the eager steps alike."""
    device = torch.device("cuda")
    options = {"dropout": 0.5, "embedding_dropout": 0.2, "weight_dropout": 0.3, "rnn_input": "fused"}
    torch.manual_seed(0)
    eager = LSTMClassifier(80, 8, 16, 2, True, **options).to(device).train()
    graphed = copy.deepcopy(eager)
    eager_opt = torch.optim.Adam(eager.parameters(), lr=0.01, capturable=True)
    graph_opt = torch.optim.Adam(graphed.parameters(), lr=0.01, capturable=True)
    collate = PadCollator(pad_id=1, fixed_rows=8)
    batches = [collate(examples(lengths, vocab_size=80, seed=seed))
               for seed, lengths in enumerate([[40, 33], [5, 5, 5], [37, 38, 3], [120, 64, 100], [6, 2]])]  # fmt: skip
    step = GraphedTrainStep(graphed, graph_opt, max_grad_norm=1.0, chunk_tokens=chunk_tokens)
    step.capture({tuple(batch["input_ids"].shape) for batch in batches})
    torch.cuda.manual_seed(7)
    for batch in batches:
        step.step(batch)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    torch.cuda.manual_seed(7)
    for batch in batches:
        on_device = {k: v.to(device) for k, v in batch.items()}
        train_step(eager, eager_opt, on_device, totals, 1.0, chunk_tokens=chunk_tokens)
        eager_opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step.totals, totals, rtol=1e-5, atol=1e-4)
