"""How steps fit in GPU memory: splitting a batch into groups of rows, evaluation in pieces, trials that leave no
trace (on CPU); the memory plan's choices under a memory budget, and the graphs' memory against eager steps (on a
GPU, skipped without one)."""

from __future__ import annotations

import contextlib
import copy
import gc

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from sentiment.batching import EncodedSplit, PadCollator, bucket_length, make_dataloader
from sentiment.graphs import GraphedTrainStep, train_step, unchanged
from sentiment.memory import MemoryPlanError, out_of_memory, plan_steps, use_expandable_segments
from sentiment.model import LSTMClassifier
from sentiment.training import evaluate

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def examples(lengths: list[int], vocab_size: int = 60, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(2, vocab_size, length), int(rng.integers(0, 2))) for length in lengths]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_step_split_into_groups_of_rows_equals_the_whole_step(bidirectional: bool) -> None:
    """Three steps whose batches run as groups of at most 2 rows (gradients summed, one optimizer step) change the
    weights and the figures exactly as the same steps on whole batches; filler rows still count for nothing."""
    torch.manual_seed(0)
    whole = LSTMClassifier(60, 6, 5, 2, bidirectional, dropout=0.0, rnn_input="fused", pooling="max").double()
    split = copy.deepcopy(whole)
    whole_opt = torch.optim.Adam(whole.parameters(), lr=0.01)
    split_opt = torch.optim.Adam(split.parameters(), lr=0.01)
    whole_totals = torch.zeros(3, dtype=torch.float64)
    split_totals = torch.zeros(3, dtype=torch.float64)
    collate = PadCollator(pad_id=1, fixed_rows=5)
    for seed, lengths in enumerate([[19, 7, 3], [4, 4], [33, 30, 2, 9, 12]]):
        batch = collate(examples(lengths, seed=seed))
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        train_step(whole, whole_opt, batch, whole_totals, max_grad_norm=0.5)
        steps = batch["input_ids"].shape[1]
        train_step(split, split_opt, batch, split_totals, max_grad_norm=0.5, chunk_tokens=2 * steps)
        whole_opt.zero_grad()
        split_opt.zero_grad()
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(split_totals, whole_totals, rtol=1e-12, atol=1e-12)
    assert split_totals[2].item() == 10  # real reviews only


def test_a_split_batch_runs_as_few_groups_of_rows_as_fit_and_of_even_size() -> None:
    """Seven rows under a cap of five rows' tokens run as two groups, of four and three rows (not five and two:
    the same two passes in less memory)."""
    model = LSTMClassifier(60, 4, 3, 1, False, dropout=0.0)
    rows_seen: list[int] = []
    model.register_forward_pre_hook(lambda _module, args: rows_seen.append(args[0].shape[0]))
    batch = PadCollator(pad_id=1, fixed_rows=7)(examples([10] * 7))
    steps = batch["input_ids"].shape[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, optimizer, batch, torch.zeros(3, dtype=torch.float64), chunk_tokens=5 * steps)
    assert rows_seen == [4, 3]


def test_evaluation_in_pieces_gives_the_same_figures_and_logits() -> None:
    """An evaluation whose batches run in pieces of at most 40 tokens gives the same loss, accuracy and per-review
    logits (in the split's order) as whole batches."""
    rng = np.random.default_rng(0)
    pieces = [rng.integers(2, 60, length) for length in rng.integers(1, 30, 23)]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    split = EncodedSplit(np.concatenate(pieces), offsets, rng.integers(0, 2, 23))
    torch.manual_seed(0)
    model = LSTMClassifier(60, 6, 5, 1, True, dropout=0.0).double()
    accelerator = Accelerator(cpu=True)
    try:
        loader = make_dataloader(split, 8, pad_id=1, train=False)
        whole = evaluate(model, loader, accelerator, keep_logits=True)
        pieces = evaluate(model, loader, accelerator, keep_logits=True, max_tokens=40)
    finally:
        AcceleratorState._reset_state()
    assert pieces["count"] == whole["count"] == 23
    assert pieces["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert pieces["acc"] == whole["acc"]
    np.testing.assert_allclose(pieces["logits"], whole["logits"], rtol=1e-5, atol=1e-6)


def test_trial_steps_leave_weights_optimizer_and_random_numbers_unchanged() -> None:
    """Steps inside ``unchanged`` (one of them failing halfway) leave the weights, Adam's moments and step count,
    the gradients and the random number generator exactly as they were."""
    torch.manual_seed(0)
    model = LSTMClassifier(60, 6, 5, 1, False, dropout=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    batch = PadCollator(pad_id=1, fixed_rows=4)(examples([9, 5, 7]))
    totals = torch.zeros(3, dtype=torch.float64)
    with unchanged(model, optimizer):  # a trial before the first step: the optimizer keeps no state of it
        train_step(model, optimizer, batch, totals)
    assert not optimizer.state
    train_step(model, optimizer, batch, totals)
    optimizer.zero_grad(set_to_none=True)
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    rng_state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="out of memory, say"), unchanged(model, optimizer):
        train_step(model, optimizer, batch, totals)
        train_step(model, optimizer, batch, totals)
        raise RuntimeError("out of memory, say")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights, strict=True))
    assert all(torch.equal(optimizer.state[p]["exp_avg"], m) for p, m in zip(model.parameters(), moments, strict=True))
    assert all(optimizer.state[p]["step"].item() == 1 for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_state)


def _bilstm_and_batches(device: torch.device, rows: int = 16) -> tuple[LSTMClassifier, list[dict[str, torch.Tensor]]]:
    """A BiLSTM of the config's sizes (hidden 150, 2 layers) and fixed-shape batches of mixed lengths up to 1,500."""
    torch.manual_seed(0)
    model = LSTMClassifier(2000, 50, 150, 2, True, dropout=0.5, rnn_input="fused").to(device).train()
    rng = np.random.default_rng(0)
    collate = PadCollator(pad_id=1, fixed_rows=rows)
    batches = []
    for longest in (1500, 90, 400, 40, 700, 1500, 200, 90):
        lengths = [int(n) for n in rng.integers(longest // 2, longest + 1, rows)]
        batches.append(collate(examples(lengths, vocab_size=2000, seed=longest)))
    return model, batches


@needs_cuda
def test_graphs_need_at_most_one_and_a_half_times_the_memory_of_eager_steps() -> None:
    """On mixed lengths (8 shapes), the graphed path's peak reserved GPU memory, the graphs' shared pool included,
    stays within 1.5x that of the same steps run eagerly."""
    device = torch.device("cuda", torch.cuda.current_device())
    use_expandable_segments()  # as the trainer does
    peaks = {}
    for mode in ("eager", "graphs"):
        model, batches = _bilstm_and_batches(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        if mode == "graphs":
            step = GraphedTrainStep(model, optimizer, 1.0)
            step.capture({tuple(batch["input_ids"].shape) for batch in batches})
        for batch in batches:
            if mode == "graphs":
                step.step(batch)
            else:
                train_step(model, optimizer, {k: v.to(device) for k, v in batch.items()}, totals, 1.0)
                optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        peaks[mode] = torch.cuda.max_memory_reserved(device)
        if mode == "graphs":
            step.close()  # the pool goes back to the device: what stays is the model, Adam and the graphs' totals
            assert torch.cuda.memory_reserved(device) <= 2**30 + torch.cuda.memory_allocated(device)
        del model, optimizer
        torch.cuda.empty_cache()
    assert peaks["graphs"] <= 1.5 * peaks["eager"], {k: f"{v / 2**30:.2f} GiB" for k, v in peaks.items()}


@needs_cuda
def test_evaluation_in_the_graphs_pool_changes_nothing_and_adds_little_memory() -> None:
    """Evaluation between graph replays run in the graphs' pool (``sharing_pool``) gives the logits that evaluation
    beside the pool gives, the training after it is the same, and the peak reserved memory stays within 10% of what
    the captured graphs hold; beside the pool, evaluation adds its own memory."""
    device = torch.device("cuda", torch.cuda.current_device())
    use_expandable_segments()  # as the trainer does
    results = {}
    for where in ("beside", "in pool"):
        torch.cuda.empty_cache()
        model, batches = _bilstm_and_batches(device, rows=32)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
        step = GraphedTrainStep(model, optimizer, 1.0)
        step.capture({tuple(batch["input_ids"].shape) for batch in batches})
        lengths = [int(n) for n in np.random.default_rng(1).integers(750, 1501, 32)]
        evaluation = PadCollator(pad_id=1)(examples(lengths, vocab_size=2000, seed=1))
        ids, review_lengths = evaluation["input_ids"].to(device), evaluation["lengths"].to(device)
        torch.cuda.synchronize(device)
        captured = torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        logits = []
        for batch in batches:
            step.step(batch)
            model.eval()
            with step.sharing_pool() if where == "in pool" else contextlib.nullcontext(), torch.no_grad():
                logits.append(model(ids, review_lengths).cpu())
            model.train()
        torch.cuda.synchronize(device)
        added = torch.cuda.max_memory_reserved(device) - captured
        results[where] = (torch.stack(logits), [p.detach().cpu() for p in model.parameters()], added, captured)
        step.close()
        del model, optimizer, step
    beside, in_pool = results["beside"], results["in pool"]
    torch.testing.assert_close(in_pool[0], beside[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(in_pool[1], beside[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    gib = {where: f"+{r[2] / 2**30:.2f} GiB on {r[3] / 2**30:.2f} GiB" for where, r in results.items()}
    assert in_pool[2] <= 0.1 * in_pool[3], gib
    assert in_pool[2] < beside[2], gib


@needs_cuda
def test_runs_one_after_another_leave_no_gpu_memory_behind() -> None:
    """Graphs captured, replayed, evaluated beside in their pool and closed, three times in one process (as a sweep
    worker runs its trials): the memory reserved after each close does not grow."""
    device = torch.device("cuda", torch.cuda.current_device())
    use_expandable_segments()
    reserved = []
    for _ in range(3):
        model, batches = _bilstm_and_batches(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
        step = GraphedTrainStep(model, optimizer, 1.0)
        step.capture({tuple(batch["input_ids"].shape) for batch in batches})
        for batch in batches[:3]:
            step.step(batch)
            model.eval()
            with step.sharing_pool(), torch.no_grad():
                model(batch["input_ids"].to(device), batch["lengths"].to(device)).sum().item()
            model.train()
        step.close()
        del model, optimizer, step
        gc.collect()
        torch.cuda.empty_cache()
        reserved.append(torch.cuda.memory_reserved(device))
    assert reserved[2] <= reserved[0] + 2**20, [f"{r / 2**20:.0f} MiB" for r in reserved]


@needs_cuda
def test_a_memory_budget_too_small_for_graphs_falls_back_and_nothing_fitting_stops_with_the_fix() -> None:
    """Under a per-process memory budget below what one whole step needs, the plan falls back to graphs or eager
    steps of batches split into groups of rows, and training steps then run within the budget;
    under a budget that not even one review fits, it stops before training with a message naming the memory
    needed, batch_size and max_length."""
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    model, batches = _bilstm_and_batches(device, rows=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    shapes = {tuple(batch["input_ids"].shape) for batch in batches}
    largest = max(shapes, key=lambda shape: shape[0] * shape[1])
    assert largest == (32, bucket_length(1500))
    # What one eager step of the longest batch takes at its peak.
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with unchanged(model, optimizer):
        from sentiment.graphs import dummy_batch

        totals = torch.zeros(3, dtype=torch.float64, device=device)
        train_step(model, optimizer, dummy_batch(largest, 1, device), totals, 1.0)
    step_peak = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    try:
        # Graphs need at least one eager step's memory: 60% of it leaves eager steps on groups of rows.
        torch.cuda.set_per_process_memory_fraction((base + 0.6 * step_peak + 64 * 2**20) / total, device)
        plan = plan_steps(model, optimizer, shapes, (64, 1500), graphs=True, max_grad_norm=1.0, pad_id=1)
        assert plan.mode in ("graphs, split", "eager, split"), plan.describe()
        assert plan.eval_tokens and plan.chunk_tokens < 32 * bucket_length(1500)
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        for batch in batches:
            if plan.graph_step is not None:
                plan.graph_step.step(batch)
            else:
                on_device = {k: v.to(device) for k, v in batch.items()}
                train_step(model, optimizer, on_device, totals, 1.0, chunk_tokens=plan.chunk_tokens)
                optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if plan.graph_step is not None:
            totals = plan.graph_step.totals
            plan.graph_step.close()
        assert totals[2].item() == 32 * len(batches)
        torch.cuda.set_per_process_memory_fraction((base + 8 * 2**20) / total, device)
        with pytest.raises(MemoryPlanError, match=r"(?s)GiB.*max_length.*batch_size \(now 32\)"):
            plan_steps(model, optimizer, shapes, (64, 1500), graphs=True, max_grad_norm=1.0, pad_id=1)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    unbudgeted = plan_steps(model, optimizer, shapes, (64, 1500), graphs=True, max_grad_norm=1.0, pad_id=1)
    assert unbudgeted.mode == "graphs" and len(unbudgeted.graph_step.graphs) == len(shapes)
    unbudgeted.graph_step.close()


def test_max_step_tokens_trains_the_same_model_in_smaller_pieces(hub_imdb, tmp_path, monkeypatch) -> None:
    """A run whose batches go through the model in groups of at most 40 tokens (``max_step_tokens``) ends with the
    same figures and weights as one that takes them whole (no dropout: the same update, up to rounding); one whose
    evaluation forwards take at most 40 tokens (``max_eval_tokens``) evaluates to the same figures."""
    from safetensors.torch import load_file

    from sentiment.config import build_config
    from sentiment.training import train

    forwards: list[dict[bool, list[tuple[int, int]]]] = []  # per run, the (rows, length) of each forward, by mode
    forward = LSTMClassifier.forward

    def recording(self: LSTMClassifier, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        forwards[-1][self.training].append(tuple(input_ids.shape))
        return forward(self, input_ids, lengths)

    monkeypatch.setattr(LSTMClassifier, "forward", recording)

    options = {"dataset": str(hub_imdb), "num_proc": 1, "epochs": 1, "batch_size": 8, "hidden_dim": 8,
               "bidirectional": True, "dropout": 0.0, "report_to": "none"}  # fmt: skip
    runs = {}
    for name, caps in {"whole": {}, "steps": {"max_step_tokens": 40}, "evaluation": {"max_eval_tokens": 40}}.items():
        forwards.append({True: [], False: []})
        folder = tmp_path / name
        metrics = train(build_config(None, {**options, "max_step_tokens": None, **caps, "output_dir": str(folder)}))
        runs[name] = (metrics, load_file(folder / "best" / "model.safetensors"))
    whole_forwards, step_forwards, eval_forwards = forwards
    assert max(rows * steps for rows, steps in whole_forwards[True]) > 40
    assert all(rows * steps <= 40 or rows == 1 for rows, steps in step_forwards[True])  # one review: the least
    assert len(step_forwards[True]) > len(whole_forwards[True])
    assert max(rows * steps for rows, steps in whole_forwards[False]) > 40
    assert all(rows * steps <= 40 or rows == 1 for rows, steps in eval_forwards[False])
    assert eval_forwards[True] == whole_forwards[True]
    (whole, whole_weights), (pieces, piece_weights) = runs["whole"], runs["steps"]
    assert pieces["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert pieces["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-4)
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(piece_weights[name], tensor, rtol=1e-4, atol=1e-5)
    evaluated = runs["evaluation"][0]
    for key in ("test_loss", "test_acc", "valid_loss", "valid_acc"):
        assert evaluated[key] == pytest.approx(whole[key], rel=1e-5), key


def test_out_of_memory_is_told_apart_from_other_errors() -> None:
    """The plan falls back on the GPU's out-of-memory errors, PyTorch's and cuDNN's, and on nothing else."""
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
