"""LSTMClassifier: shapes, the packed and padded paths agree, save_pretrained / from_pretrained round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sentiment.model import CheckpointError, LSTMClassifier


def padded_batch(vocab_size: int, lengths: list[int], pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids right-padded with ``pad_id`` to the longest length."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab_size, (len(lengths), max(lengths)), generator=generator)
    for row, length in enumerate(lengths):
        ids[row, length:] = pad_id
    return ids, torch.tensor(lengths)


@pytest.mark.parametrize("rnn_input", ["packed", "padded", "fused"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_reverse_reads_each_review_backwards(rnn_input: str, bidirectional: bool, tmp_path: Path) -> None:
    """A ``reverse`` model gives, on every path, the logits of the same weights reading forwards on reviews whose
    tokens were reversed by hand within their lengths (padding left after them); save/load keeps the setting."""
    torch.manual_seed(0)
    forwards = LSTMClassifier(40, 6, 8, 2, bidirectional, dropout=0.0, rnn_input=rnn_input).double().eval()
    backwards = LSTMClassifier(40, 6, 8, 2, bidirectional, dropout=0.0, rnn_input=rnn_input, reverse=True)
    backwards.load_state_dict(forwards.state_dict())
    backwards = backwards.double().eval()
    ids, lengths = padded_batch(40, [9, 2, 6, 9, 4])
    by_hand = ids.clone()
    for row, length in enumerate(lengths.tolist()):
        by_hand[row, :length] = ids[row, :length].flip(0)
    torch.testing.assert_close(backwards(ids, lengths), forwards(by_hand, lengths), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(backwards(ids, lengths), forwards(ids, lengths))
    backwards.save_pretrained(tmp_path)
    assert LSTMClassifier.from_pretrained(tmp_path).reverse is True


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("pooling", ["last", "concat"])
def test_packed_and_padded_paths_agree(bidirectional: bool, n_layers: int, pooling: str) -> None:
    """The padded path (each review's state at its true last token, backward direction on a reversed copy) and
    the fused path (one call per layer, the input gate closed over padding) compute the same logits
    and gradients as nn.LSTM on packed sequences."""
    torch.manual_seed(0)
    model = LSTMClassifier(50, 8, 12, n_layers, bidirectional, dropout=0.3, pooling=pooling).double().eval()
    ids, lengths = padded_batch(50, [9, 1, 4, 9, 6, 2])
    results = []
    for rnn_input in ("packed", "padded", "fused"):
        model.rnn_input = rnn_input
        model.zero_grad()
        logits = model(ids, lengths)
        (logits**2).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logits.detach(), grads))
    for logits, grads in results[1:]:
        torch.testing.assert_close(results[0][0], logits, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(results[0][1], grads, rtol=1e-10, atol=1e-12)


def test_padding_does_not_change_a_review() -> None:
    """A review scores the same alone and in a batch with longer reviews (padding is ignored)."""
    model = LSTMClassifier(40, 6, 5, 2, True, dropout=0.0, pooling="concat").eval()
    ids, lengths = padded_batch(40, [3, 11, 7])
    longer = torch.cat([ids, torch.full((3, 5), model.pad_id)], dim=1)  # padded further, as bucketed batches are
    for rnn_input in ("packed", "padded", "fused"):
        model.rnn_input = rnn_input
        together = model(ids, lengths)
        alone = model(ids[:1, :3], lengths[:1])
        torch.testing.assert_close(together[:1], alone)
        torch.testing.assert_close(model(longer, lengths), together)


def test_output_shape_and_embedding_init() -> None:
    """One logit per review; pretrained vectors are copied in; frozen embeddings get no gradient."""
    model = LSTMClassifier(30, 4, 7, bidirectional=True, freeze_embeddings=True)
    vectors = torch.randn(30, 4)
    model.load_embeddings(vectors)
    assert torch.equal(model.embedding.weight, vectors)
    ids, lengths = padded_batch(30, [5, 2])
    logits = model(ids, lengths)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert model.embedding.weight.grad is None
    assert model.lstm.weight_ih_l0.grad is not None
    with pytest.raises(ValueError, match="shape"):
        model.load_embeddings(torch.zeros(29, 4))


def test_rejects_unknown_rnn_input_and_pooling() -> None:
    with pytest.raises(ValueError, match="rnn_input"):
        LSTMClassifier(10, rnn_input="cudnn")
    with pytest.raises(ValueError, match="pooling"):
        LSTMClassifier(10, pooling="attention")


def test_embedding_dropout_drops_whole_words() -> None:
    """In training, a dropped word's vector is zero in every dimension; kept ones are scaled by 1/(1-p); in
    evaluation nothing is dropped."""
    torch.manual_seed(0)
    model = LSTMClassifier(30, 8, 4, dropout=0.0, embedding_dropout=0.5)
    seen = {}
    model.lstm.register_forward_hook(lambda module, args, output: seen.update(inputs=args[0]))
    model.rnn_input = "packed"
    ids, lengths = padded_batch(30, [40, 40])
    model.train()(ids, lengths)
    inputs = pad_packed_sequence_first(seen["inputs"])
    vectors = model.embedding(ids)
    dropped = (inputs == 0).all(dim=-1)
    assert 0.3 < dropped.float().mean() < 0.7
    torch.testing.assert_close(inputs[~dropped], 2 * vectors[~dropped])
    model.eval()(ids, lengths)
    torch.testing.assert_close(pad_packed_sequence_first(seen["inputs"]), vectors)


def pad_packed_sequence_first(packed: torch.nn.utils.rnn.PackedSequence) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_packed_sequence(packed, batch_first=True)[0]


def test_save_and_load_give_identical_logits(tmp_path: Path) -> None:
    """save_pretrained writes model.safetensors + config.json; from_pretrained rebuilds the same model."""
    model = LSTMClassifier(
        60, 6, 9, 2, True, dropout=0.2, lowercase=True, max_length=50, pooling="concat", embedding_dropout=0.1
    ).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()
    loaded = LSTMClassifier.from_pretrained(tmp_path).eval()
    assert loaded.lowercase is True and loaded.max_length == 50
    assert loaded.pooling == "concat" and loaded.embedding_dropout == 0.1
    assert loaded.lstm.bidirectional and loaded.lstm.num_layers == 2
    ids, lengths = padded_batch(60, [7, 3, 5])
    assert torch.equal(model(ids, lengths), loaded(ids, lengths))


def test_checkpoint_saved_with_the_triton_path_loads_on_auto(tmp_path: Path) -> None:
    """A config.json that says rnn_input "triton" (the Triton LSTM, now outside the package) loads with a
    warning on the auto path, gives the saved model's logits, and is saved again with rnn_input "auto"."""
    model = LSTMClassifier(40, 6, 5, 1, True).eval()
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    (tmp_path / "saved" / "config.json").write_text(json.dumps({**config, "rnn_input": "triton"}))
    with pytest.warns(UserWarning, match="rnn_input 'triton'.*experiments/triton_lstm.*'auto'"):
        loaded = LSTMClassifier.from_pretrained(tmp_path / "saved").eval()
    assert loaded.rnn_input == "auto"
    ids, lengths = padded_batch(40, [6, 2, 4])
    assert torch.equal(loaded(ids, lengths), model(ids, lengths))
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["rnn_input"] == "auto"


def test_save_with_cudnn_style_shared_weights(tmp_path: Path) -> None:
    """On GPU cuDNN makes the LSTM weights views of one flat buffer; saving must still write every weight."""
    model = LSTMClassifier(20, 4, 3, 2, True).eval()
    params = [p for _, p in model.lstm.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in params])
    offset = 0
    for param in params:
        param.data = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
    model.save_pretrained(tmp_path)
    loaded = LSTMClassifier.from_pretrained(tmp_path).eval()
    for (name, original), (_, reloaded) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(original, reloaded), name


def test_truncated_checkpoint_gives_clear_error(tmp_path: Path) -> None:
    LSTMClassifier(10, 4, 3).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(CheckpointError, match=r"could not load .*runs/NAME/best"):
        LSTMClassifier.from_pretrained(tmp_path)


def test_mismatched_checkpoint_gives_clear_error(tmp_path: Path) -> None:
    """Weights of another shape than config.json describes."""
    LSTMClassifier(10, 4, 3).save_pretrained(tmp_path)
    LSTMClassifier(10, 4, 5).save_pretrained(tmp_path / "other")
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"size mismatch|shape"):
        LSTMClassifier.from_pretrained(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuDNN's LSTM kernels)")
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_path_matches_packed_on_cudnn(bidirectional: bool) -> None:
    """On cuDNN, in float32, the fused path (the closed input gate over padding included) gives the logits and
    gradients of packed nn.LSTM, on reviews padded well past their length as bucketed batches are (TF32 off:
    it alone moves results by ~1e-5; state leaking from padding would move them by far more)."""
    torch.manual_seed(0)
    model = LSTMClassifier(200, 16, 24, 2, bidirectional, dropout=0.0, pooling="concat").cuda().train()
    ids, lengths = padded_batch(200, [57, 3, 40, 1, 57, 22, 9, 31])
    ids = torch.cat([ids, torch.full((len(lengths), 20), model.pad_id)], dim=1).cuda()
    results = []
    for rnn_input in ("packed", "fused"):
        model.rnn_input = rnn_input
        model.zero_grad()
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            logits = model(ids, lengths)
            (logits**2).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for packed_grad, fused_grad in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(packed_grad, fused_grad, rtol=1e-3, atol=1e-5)


def share_one_storage(module: torch.nn.Module) -> None:
    """Make the LSTM's parameters views of one flat buffer, as cuDNN's ``flatten_parameters`` does on a GPU."""
    params = list(module.lstm.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])
    offset = 0
    for param in params:
        param.data = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in params)


def test_checkpoints_save_weights_that_share_one_storage(tmp_path: Path) -> None:
    """The classifier and the language model save and reload LSTM weights that live in one flat buffer (safetensors
    refuses shared storage; on a GPU cuDNN always packs them so): every weight comes back."""
    from sentiment.lm import LSTMLanguageModel

    for model in (LSTMClassifier(30, 4, 6, 2, bidirectional=True), LSTMLanguageModel(30, 4, 6, 2)):
        share_one_storage(model)
        model.save_pretrained(tmp_path / type(model).__name__)
        loaded = type(model).from_pretrained(tmp_path / type(model).__name__)
        for (name, expected), (_, got) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(expected, got), name


@pytest.mark.parametrize("rnn_input", ["padded", "fused", "packed"])
def test_bf16_autocast_runs_the_lstm_in_bfloat16(rnn_input: str) -> None:
    """Under a bfloat16 autocast the padded and fused paths run the LSTM in bfloat16 (PyTorch's own autocast
    would pick float16 for cuDNN, which overflows without a gradient scaler), the packed path in float32; the
    logits stay close to float32's and the float32 weights get finite gradients."""
    torch.manual_seed(0)
    model = LSTMClassifier(50, 8, 16, 2, True, dropout=0.0, rnn_input=rnn_input, pooling="concat").train()
    ids, lengths = padded_batch(50, [9, 4, 7])
    reference = model(ids, lengths)
    seen: list[torch.dtype] = []
    hook = model.lstm.register_forward_hook(lambda module, args, output: seen.append(output[0].data.dtype))
    original_lstm = torch.lstm

    def recording_lstm(inputs: torch.Tensor, *args: object) -> tuple[torch.Tensor, ...]:
        seen.append(inputs.dtype)
        return original_lstm(inputs, *args)

    torch.lstm = recording_lstm
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids, lengths)
    finally:
        torch.lstm = original_lstm
        hook.remove()
    assert seen and set(seen) == {torch.float32 if rnn_input == "packed" else torch.bfloat16}
    torch.testing.assert_close(logits.float(), reference, rtol=0.0, atol=0.05)
    logits.float().sum().backward()
    for param in model.parameters():
        assert param.dtype == torch.float32 and param.grad is not None and torch.isfinite(param.grad).all()


@pytest.mark.parametrize("rnn_input", ["padded", "fused"])
def test_lstm_runs_in_training_mode_only_while_training(rnn_input: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The padded and fused paths call ``torch.lstm`` with ``train`` set as the model is: cuDNN keeps what its
    backward pass needs only in training mode (with ``train=False`` backward fails on a GPU, though not on CPU)."""
    modes: list[bool] = []
    real_lstm = torch.lstm

    def recording_lstm(*args: object) -> object:
        modes.append(bool(args[6]))  # torch.lstm(input, hx, params, has_biases, num_layers, dropout, train, ...)
        return real_lstm(*args)

    monkeypatch.setattr(torch, "lstm", recording_lstm)
    model = LSTMClassifier(50, 8, 12, 2, bidirectional=True, rnn_input=rnn_input)
    ids, lengths = padded_batch(50, [9, 4, 7])
    model.train()(ids, lengths).sum().backward()
    assert modes and all(modes)
    modes.clear()
    with torch.no_grad():
        model.eval()(ids, lengths)
    assert modes and not any(modes)
