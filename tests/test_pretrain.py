"""Language-model pretraining: the model (tied output), the pretraining run on the fixtures (train + unlabelled
reviews), and a classifier started from it (``init_from``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_split
from test_text import write_hub
from test_training import tiny_config

from sentiment.batching import EncodedSplit
from sentiment.config import ConfigError
from sentiment.lm import LSTMLanguageModel, init_from_language_model
from sentiment.model import CheckpointError, LSTMClassifier
from sentiment.prepare import PreparedData, PreparedDataError, prepare_data
from sentiment.pretrain import pretrain, token_streams
from sentiment.training import train

LM = {"with_unsupervised": True, "vectors": "none", "embedding_dim": 16, "hidden_dim": 16, "n_layers": 2,
      "batch_size": 4, "eval_batch_size": 2, "bptt": 8, "lr": 0.01, "dropout": 0.1}  # fmt: skip


def test_output_layer_is_the_embedding(tmp_path: Path) -> None:
    """The logits are the projected LSTM outputs times the embedding matrix (plus a bias): the output's gradient
    reaches the embedding rows of words that were never input; save/load gives the same logits."""
    torch.manual_seed(0)
    model = LSTMLanguageModel(30, 6, 10, 2, dropout=0.0).eval()
    ids = torch.randint(2, 10, (3, 7))
    logits, (hidden, _) = model(ids)
    assert logits.shape == (3, 7, 30) and hidden.shape == (2, 3, 10)
    logits[..., 25].sum().backward()  # word 25 is never an input
    assert model.embedding.weight.grad[25].abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = LSTMLanguageModel.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_token_streams_lay_reviews_end_to_end() -> None:
    first = EncodedSplit(np.arange(10), np.array([0, 4, 10]), np.array([0, 1]))
    second = EncodedSplit(np.arange(10, 13), np.array([0, 3]), np.array([-1]))
    assert token_streams([first, second], 3).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ConfigError, match="lower batch_size"):
        token_streams([first], 8)


@pytest.fixture(scope="module")
def pretrained(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    folder = tmp_path_factory.mktemp("lm")
    prepare_data(tiny_config(hub_imdb, folder, **LM)).save(folder / "prepared")
    cfg = tiny_config(hub_imdb, folder / "run", prepared=str(folder / "prepared"), epochs=4, **LM)
    return folder / "prepared", folder / "run", pretrain(cfg)


def test_pretraining_learns_and_saves_the_best_epoch(pretrained: tuple[Path, Path, dict]) -> None:
    prepared, run, metrics = pretrained
    history = metrics["history"]
    assert history[-1]["valid_perplexity"] < history[0]["valid_perplexity"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    data = PreparedData.load(prepared)
    assert "unsupervised" in data.splits and len(data.splits["unsupervised"]) == 20
    assert metrics["train_tokens"] == len(data.splits["train"].token_ids) + len(data.splits["unsupervised"].token_ids)
    assert metrics["tokens_per_second"] > 0
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (run / "best").iterdir()}
    assert (run / "curves.png").stat().st_size > 0
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == metrics["best_epoch"]
    assert [h["lr"] for h in history] == [LM["lr"]] * 4  # constant by default


def test_pretraining_follows_the_learning_rate_schedule(pretrained: tuple[Path, Path, dict], hub_imdb: Path) -> None:
    """Under ``lr_schedule: cosine`` the rate falls over all windows of all epochs, to 0 after the last."""
    prepared, run, _ = pretrained
    cfg = tiny_config(hub_imdb, run.parent / "cosine", prepared=str(prepared), epochs=3, lr_schedule="cosine", **LM)
    history = pretrain(cfg)["history"]
    rates = [h["lr"] for h in history]
    assert LM["lr"] > rates[0] > rates[1] > rates[2] == pytest.approx(0.0, abs=1e-12)
    assert all(np.isfinite(h["train_loss"]) for h in history)


def test_classifier_starts_from_the_language_model(
    pretrained: tuple[Path, Path, dict], hub_imdb: Path, tmp_path: Path
) -> None:
    """init_from copies the embedding and every LSTM layer into the classifier (a BiLSTM's forward direction);
    training from there runs and records it."""
    prepared, run, _ = pretrained
    data = PreparedData.load(prepared)
    language_model = LSTMLanguageModel.from_pretrained(run / "best")
    classifier = LSTMClassifier(data.tokenizer.get_vocab_size(), 16, 16, 2, bidirectional=True)
    reverse_before = classifier.lstm.weight_hh_l1_reverse.clone()
    init_from_language_model(classifier, run / "best", data)
    assert torch.equal(classifier.embedding.weight, language_model.embedding.weight)
    assert torch.equal(classifier.lstm.weight_ih_l0, language_model.lstm.weight_ih_l0)
    assert torch.equal(classifier.lstm.weight_hh_l1, language_model.lstm.weight_hh_l1)
    assert torch.equal(classifier.lstm.weight_ih_l1[:, :16], language_model.lstm.weight_ih_l1)
    assert not classifier.lstm.weight_ih_l1[:, 16:].any()  # the backward direction's input to layer 2 starts at 0
    assert torch.equal(classifier.lstm.weight_hh_l1_reverse, reverse_before)
    cfg = tiny_config(hub_imdb, tmp_path / "fine-tuned", prepared=str(prepared), init_from=str(run / "best"),
                      epochs=1, **{**LM, "lr": 0.001})  # fmt: skip
    metrics = train(cfg)
    assert metrics["sizes"]["test"] == 60 and np.isfinite(metrics["test_loss"])
    assert "init_from" in (tmp_path / "fine-tuned" / "config.yaml").read_text()
    # One epoch at lr 0.001 moves the weights little: the run started from the language model's, not at random.
    tuned = LSTMClassifier.from_pretrained(tmp_path / "fine-tuned" / "best")
    moved = (tuned.lstm.weight_hh_l0 - language_model.lstm.weight_hh_l0).abs().max().item()
    assert moved < 0.1 * language_model.lstm.weight_hh_l0.abs().max().item()


def test_token_streams_read_backwards() -> None:
    """reverse: the whole text backwards, so each review is read last token first."""
    first = EncodedSplit(np.arange(10), np.array([0, 4, 10]), np.array([0, 1]))
    assert token_streams([first], 2, reverse=True).tolist() == [[9, 8, 7, 6, 5], [4, 3, 2, 1, 0]]


def test_backward_language_model_starts_a_backward_classifier(
    pretrained: tuple[Path, Path, dict], hub_imdb: Path, tmp_path: Path
) -> None:
    """ULMFiT's backward pair: a language model pretrained with reverse records it; a classifier reading forwards
    cannot start from it (the error names the setting); one reading backwards trains from it."""
    prepared, _, _ = pretrained
    backward_run = tmp_path / "backward-lm"
    metrics = pretrain(tiny_config(hub_imdb, backward_run, prepared=str(prepared), epochs=1, reverse=True, **LM))
    assert np.isfinite(metrics["valid_loss"])
    assert LSTMLanguageModel.from_pretrained(backward_run / "best").reverse is True
    data = PreparedData.load(prepared)
    forwards = LSTMClassifier(data.tokenizer.get_vocab_size(), 16, 16, 2)
    with pytest.raises(CheckpointError, match=r"reads reviews backwards .* set reverse: true"):
        init_from_language_model(forwards, backward_run / "best", data)
    cfg = tiny_config(hub_imdb, tmp_path / "backward-classifier", prepared=str(prepared), epochs=1, reverse=True,
                      init_from=str(backward_run / "best"), **{**LM, "lr": 0.001})  # fmt: skip
    assert np.isfinite(train(cfg)["test_loss"])
    backward = LSTMClassifier.from_pretrained(tmp_path / "backward-classifier" / "best")
    assert backward.reverse is True
    language_model = LSTMLanguageModel.from_pretrained(backward_run / "best")
    moved = (backward.embedding.weight - language_model.embedding.weight).abs().max().item()
    assert moved < 0.1 * language_model.embedding.weight.abs().max().item()  # started from the backward model


def test_init_from_names_what_does_not_match(pretrained: tuple[Path, Path, dict], hub_imdb: Path) -> None:
    prepared, run, _ = pretrained
    data = PreparedData.load(prepared)
    with pytest.raises(CheckpointError, match="hidden_dim is 16 there and 32 here"):
        init_from_language_model(LSTMClassifier(data.tokenizer.get_vocab_size(), 16, 32, 2), run / "best", data)
    other = prepare_data(tiny_config(hub_imdb, run, **{**LM, "max_vocab_size": 10}))
    with pytest.raises(CheckpointError, match="vocabulary differs"):
        init_from_language_model(LSTMClassifier(other.tokenizer.get_vocab_size(), 16, 16, 2), run / "best", other)


def test_with_unsupervised_needs_the_split(tmp_path: Path) -> None:
    root = write_hub(tmp_path / "imdb", make_split(20, 1)[0], make_split(20, 2)[0])
    with pytest.raises(PreparedDataError, match="no unsupervised split"):
        prepare_data(tiny_config(root, tmp_path / "out", **LM))


def test_language_model_weight_dropout() -> None:
    """The language model's DropConnect: random in training, carries the state like nn.LSTM, no effect in
    evaluation; its explicit torch.lstm call equals nn.LSTM's own forward."""
    torch.manual_seed(0)
    model = LSTMLanguageModel(30, 6, 10, 2, dropout=0.0, weight_dropout=0.4)
    ids = torch.randint(2, 30, (3, 7))
    first, (hidden, cell) = model.train()(ids)
    assert hidden.shape == cell.shape == (2, 3, 10)
    assert not torch.allclose(first, model(ids)[0])
    model(ids, (hidden, cell))[0].sum().backward()
    assert model.lstm.weight_hh_l0.grad.abs().sum() > 0
    reference = LSTMLanguageModel(30, 6, 10, 2, dropout=0.0)
    reference.load_state_dict(model.state_dict())
    assert torch.equal(model.eval()(ids)[0], reference.eval()(ids)[0])
    model.weight_dropout = 1e-12  # the explicit torch.lstm call, masks that keep every weight
    torch.testing.assert_close(model.train()(ids, (hidden, cell))[0], reference.train()(ids, (hidden, cell))[0])
    outputs, state = reference.lstm(reference.embedding(ids), (hidden, cell))  # nn.LSTM's own forward
    projected = reference.projection(outputs)
    logits = torch.nn.functional.linear(projected, reference.embedding.weight, reference.decoder_bias)
    ours, our_state = reference.eval()(ids, (hidden, cell))
    torch.testing.assert_close(ours, logits)
    torch.testing.assert_close(our_state, state)


def test_language_model_under_bf16_autocast() -> None:
    """Under a bfloat16 autocast the language model's LSTM runs in bfloat16 (not the float16 PyTorch's autocast
    gives cuDNN's LSTM); its carried state comes back in bfloat16, the float32 weights get finite gradients."""
    torch.manual_seed(0)
    model = LSTMLanguageModel(30, 6, 10, 2, dropout=0.1, weight_dropout=0.3).train()
    ids = torch.randint(2, 30, (3, 7))
    reference = model.eval()(ids)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, (hidden, cell) = model.eval()(ids)
        assert hidden.dtype == cell.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), reference, rtol=0.0, atol=0.05)
        logits = model.train()(ids, (hidden, cell))[0]
    logits.float().sum().backward()
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
