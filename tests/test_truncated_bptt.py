"""truncate_bptt (ULMFiT's truncated backpropagation for the classifier): the LSTM runs over a review in chunks,
the state detached between chunks. The logits stay the same; the gradients are those of a hand-written chunked
LSTM; the backward direction counts its chunks from each review's own last token; the config and the model refuse
the paths that cannot chunk; a real run trains with it and checkpoints keep it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_model import padded_batch

from sentiment.config import ConfigError, build_config
from sentiment.model import LSTMClassifier


def logits_and_grads(model: LSTMClassifier, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The logits of ``model`` and the gradients of all its parameters (flattened) for a BCE loss."""
    model.zero_grad()
    logits = model(ids, lengths)
    labels = (torch.arange(len(lengths), device=logits.device) % 2).to(logits.dtype)
    F.binary_cross_entropy_with_logits(logits, labels).backward()
    return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def chunked_reference(model: LSTMClassifier, ids: torch.Tensor, lengths: torch.Tensor, chunk: int) -> torch.Tensor:
    """The logits of a unidirectional ``model`` (pooling ``last``, dropout 0) from an LSTM written cell by cell,
    layer by layer, the state (h, c) detached every ``chunk`` steps."""
    inputs = model.embedding(ids)
    batch, steps, _ = inputs.shape
    for layer in range(model.lstm.num_layers):
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        w_ih, w_hh, b_ih, b_hh = (getattr(model.lstm, f"{name}_l{layer}") for name in names)
        hidden = cell = inputs.new_zeros(batch, model.lstm.hidden_size)
        outputs = []
        for step in range(steps):
            if step % chunk == 0:
                hidden, cell = hidden.detach(), cell.detach()
            i, f, g, o = (F.linear(inputs[:, step], w_ih, b_ih) + F.linear(hidden, w_hh, b_hh)).chunk(4, dim=1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            hidden = torch.sigmoid(o) * torch.tanh(cell)
            outputs.append(hidden)
        inputs = torch.stack(outputs, dim=1)
    return model.classifier(inputs[torch.arange(batch), lengths - 1]).squeeze(-1)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_truncation_keeps_the_logits_and_changes_the_gradients(bidirectional: bool) -> None:
    """In training (dropout 0), 2 layers, unequal lengths: the padded and fused paths give the same logits with and
    without truncation; truncated, both paths give the same gradients (a BiLSTM's fused path trains on the padded
    one), which differ from the untruncated ones."""
    torch.manual_seed(0)
    model = LSTMClassifier(50, 6, 8, 2, bidirectional, dropout=0.0, pooling="concat").double().train()
    ids, lengths = padded_batch(50, [11, 3, 8, 11, 5])
    results = {}
    for rnn_input in ("padded", "fused"):
        for truncate_bptt in (0, 3):
            model.rnn_input, model.truncate_bptt = rnn_input, truncate_bptt
            results[rnn_input, truncate_bptt] = logits_and_grads(model, ids, lengths)
    reference_logits, reference_grads = results["padded", 0]
    for logits, _ in results.values():
        torch.testing.assert_close(logits, reference_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["fused", 0][1], reference_grads, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results["fused", 3][1], results["padded", 3][1], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(results["padded", 3][1], reference_grads, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("rnn_input", ["padded", "fused"])
def test_gradients_match_a_hand_written_chunked_lstm(rnn_input: str) -> None:
    """Unidirectional, 2 layers, pooling last: every parameter's gradient (embedding included) equals that of a
    cell-by-cell LSTM detached every 3 steps, and differs from the full backpropagation's."""
    torch.manual_seed(1)
    model = LSTMClassifier(40, 5, 7, 2, dropout=0.0, rnn_input=rnn_input, truncate_bptt=3).double().train()
    ids, lengths = padded_batch(40, [10, 4, 7, 10, 2])
    _, grads = logits_and_grads(model, ids, lengths)
    model.zero_grad()
    labels = (torch.arange(len(lengths)) % 2).double()
    F.binary_cross_entropy_with_logits(chunked_reference(model, ids, lengths, 3), labels).backward()
    torch.testing.assert_close(grads, torch.cat([p.grad.flatten() for p in model.parameters()]), rtol=1e-9, atol=1e-12)
    model.truncate_bptt = 0
    assert not torch.allclose(logits_and_grads(model, ids, lengths)[1], grads, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("rnn_input", ["padded", "fused"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradients_reach_back_only_within_the_last_chunk(bidirectional: bool, rnn_input: str) -> None:
    """One layer, pooling last, chunks of 4 on a batch of 12 steps, every token its own word: only the words in
    the chunk holding a review's last token get a gradient from the forward direction. The backward direction's
    chunks count from each review's own last token: for the review of 7 words its final state reaches words
    0-2 (reversed positions 4-6), not word 3 (which counting from the padded end, reversed 8-11, would include)."""
    chunk, lengths = 4, [12, 10, 7]
    steps = max(lengths)
    torch.manual_seed(2)
    model = LSTMClassifier(2 + 3 * steps, 5, 6, 1, bidirectional, dropout=0.0, rnn_input=rnn_input, truncate_bptt=chunk)
    ids = torch.arange(2, 2 + 3 * steps).view(3, steps)
    for row, length in enumerate(lengths):
        ids[row, length:] = model.pad_id
    model.train()(ids, torch.tensor(lengths)).sum().backward()
    grad = model.embedding.weight.grad
    for row, length in enumerate(lengths):
        chunk_start = (length - 1) // chunk * chunk
        reached = set(range(chunk_start, length))
        if bidirectional:
            reached |= set(range(length - chunk_start))
        for position in range(length):
            word_grad = grad[ids[row, position]]
            if position in reached:
                assert word_grad.abs().sum() > 0, (row, position)
            else:
                assert torch.equal(word_grad, torch.zeros_like(word_grad)), (row, position)
    if bidirectional:  # the review of 7 words: word 3 gets nothing, nor does word 2 of the review of 10
        assert torch.equal(grad[ids[2, 3]], torch.zeros(5)) and torch.equal(grad[ids[1, 2]], torch.zeros(5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuDNN's LSTM kernels)")
@pytest.mark.parametrize("bidirectional", [False, True])
def test_truncation_on_cudnn_matches_the_cpu(bidirectional: bool) -> None:
    """On cuDNN (float32, TF32 off), the default GPU path with truncation gives the logits and gradients of the CPU
    padded path in float64, on reviews padded past their length (chunks of 7 over 77 steps)."""
    torch.manual_seed(3)
    model = LSTMClassifier(200, 16, 24, 2, bidirectional, dropout=0.0, pooling="concat", truncate_bptt=7).train()
    ids, lengths = padded_batch(200, [57, 3, 40, 1, 57, 22, 9, 31])
    ids = torch.cat([ids, torch.full((len(lengths), 20), model.pad_id)], dim=1)
    cpu_logits, cpu_grads = logits_and_grads(model.double(), ids, lengths)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        gpu_logits, gpu_grads = logits_and_grads(model.float().cuda(), ids.cuda(), lengths)
    torch.testing.assert_close(gpu_logits.cpu().double(), cpu_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu_grads.cpu().double(), cpu_grads, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("value", [1, -1])
def test_config_rejects_too_short_truncation(value: int) -> None:
    with pytest.raises(ConfigError, match="truncate_bptt must be 0"):
        build_config(None, {"truncate_bptt": value})
    with pytest.raises(ValueError, match="truncate_bptt"):
        LSTMClassifier(10, truncate_bptt=value)


def test_paths_that_cannot_chunk_are_refused() -> None:
    """Config: packed with truncation names the fix; the model refuses it in training only."""
    assert build_config(None, {"truncate_bptt": 72, "rnn_input": "fused"}).truncate_bptt == 72
    with pytest.raises(ConfigError, match="use rnn_input auto, padded or fused"):
        build_config(None, {"truncate_bptt": 72, "rnn_input": "packed"})
    model = LSTMClassifier(30, 4, 5, bidirectional=True, truncate_bptt=2, rnn_input="packed")
    ids, lengths = padded_batch(30, [5, 3])
    with pytest.raises(ValueError, match="truncate_bptt needs rnn_input auto, padded or fused"):
        model.train()(ids, lengths)
    assert model.eval()(ids, lengths).shape == (2,)


def test_a_run_trains_with_truncation(hub_imdb: Path, tmp_path: Path) -> None:
    """A real BiLSTM run of 2 layers, truncate_bptt 4 (reviews are 8-60+ tokens): finite losses each epoch,
    metrics written, and the checkpoint records the option. (Imports here: the rest of this file runs where
    ``datasets`` is not installed, as on the GPU machine.)"""
    pytest.importorskip("datasets")
    from test_training import tiny_config

    from sentiment.training import train

    metrics = train(tiny_config(hub_imdb, tmp_path / "run", epochs=2, n_layers=2, truncate_bptt=4))
    assert len(metrics["history"]) == 2
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["valid_loss"]) for h in metrics["history"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["history"] == metrics["history"]
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["truncate_bptt"] == 4
    assert LSTMClassifier.from_pretrained(tmp_path / "run" / "best").truncate_bptt == 4


def test_save_and_load_keep_truncate_bptt(tmp_path: Path) -> None:
    """save_pretrained / from_pretrained keep truncate_bptt; a config.json written before it loads with 0."""
    LSTMClassifier(20, 4, 5, truncate_bptt=72).save_pretrained(tmp_path)
    assert LSTMClassifier.from_pretrained(tmp_path).truncate_bptt == 72
    config = json.loads((tmp_path / "config.json").read_text())
    del config["truncate_bptt"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert LSTMClassifier.from_pretrained(tmp_path).truncate_bptt == 0
