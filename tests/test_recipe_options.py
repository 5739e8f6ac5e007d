"""Training-recipe options: AdamW and weight decay, learning-rate schedules, pooling, word-level embedding
dropout and early stopping, each through real training runs on the fixtures."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from test_training import tiny_config

from sentiment.config import ConfigError, build_config
from sentiment.optim import LRFactor
from sentiment.training import TrainingStopped, train

RECIPE = {
    "epochs": 3,
    "optimizer": "adamw",
    "weight_decay": 0.01,
    "lr_schedule": "cosine",
    "warmup_ratio": 0.2,
    "pooling": "concat",
    "embedding_dropout": 0.1,
}


def test_lr_factors() -> None:
    """cosine: linear warm-up to 1, then down to 0; onecycle: from 1/25 up to 1, then down to 1/10,000."""
    cosine = LRFactor(build_config(None, {"lr_schedule": "cosine", "warmup_ratio": 0.1}), total_steps=100)
    factors = [cosine(step) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert cosine(100) == pytest.approx(0.0)
    onecycle = LRFactor(build_config(None, {"lr_schedule": "onecycle"}), total_steps=100)
    assert onecycle(0) == pytest.approx(1 / 25 + (1 - 1 / 25) / 30)
    assert onecycle(29) == pytest.approx(1.0)
    assert onecycle(100) == pytest.approx(1e-4)


def test_recipe_trains_and_resumes_exactly(hub_imdb: Path, tmp_path: Path) -> None:
    """AdamW + cosine schedule + concat pooling + embedding dropout: the schedule changes the run, its state is
    saved, and a run stopped after epoch 1 resumes to exactly the uninterrupted figures."""
    full = train(tiny_config(hub_imdb, tmp_path / "full", **RECIPE))
    constant = train(tiny_config(hub_imdb, tmp_path / "constant", **{**RECIPE, "lr_schedule": "constant"}))
    assert [h["train_loss"] for h in full["history"]] != pytest.approx([h["train_loss"] for h in constant["history"]])
    scheduler_state = torch.load(tmp_path / "full" / "state" / "custom_checkpoint_0.pkl", weights_only=True)
    batches = math.ceil(full["sizes"]["train"] / 8)  # batch_size 8: one scheduler step per optimizer step
    assert scheduler_state["last_epoch"] == 3 * batches
    assert scheduler_state["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)

    def stop_after_first_epoch(epoch: int, record: dict[str, float]) -> None:
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped):
        train(tiny_config(hub_imdb, tmp_path / "stopped", **RECIPE), on_epoch_end=stop_after_first_epoch)
    resumed = train(tiny_config(hub_imdb, tmp_path / "stopped", resume=True, **RECIPE))
    for key in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
        assert [h[key] for h in resumed["history"]] == pytest.approx([h[key] for h in full["history"]], abs=1e-6)
    assert resumed["test_acc"] == pytest.approx(full["test_acc"], abs=1e-9)


def test_early_stopping_ends_the_run_and_resume_keeps_it_ended(hub_imdb: Path, tmp_path: Path) -> None:
    """With a learning rate too small to change anything, validation never improves after epoch 1: patience 1
    stops the run after epoch 2 of 5, and --resume does not train further."""
    cfg = tiny_config(hub_imdb, tmp_path / "run", epochs=5, lr=1e-12, early_stopping_patience=1)
    metrics = train(cfg)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["best_epoch"] == 1
    state = json.loads((tmp_path / "run" / "state" / "trainer_state.json").read_text())
    assert state["stopped_early"] is True
    resumed = train(tiny_config(hub_imdb, tmp_path / "run", epochs=5, lr=1e-12, early_stopping_patience=1, resume=True))
    assert len(resumed["history"]) == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [("embedding_dropout", 1.0), ("weight_decay", -0.1), ("warmup_ratio", 1.0), ("early_stopping_patience", 0)],
)
def test_recipe_values_out_of_range(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=key):
        build_config(None, {key: value})


def test_recipe_choices_are_checked() -> None:
    with pytest.raises(ConfigError, match="lr_schedule"):
        build_config(None, {"lr_schedule": "linear"})
    with pytest.raises(ConfigError, match="pooling"):
        build_config(None, {"pooling": "attention"})


def test_parameter_groups_give_discriminative_learning_rates() -> None:
    """Head, LSTM layers top down, embedding: each parameter in exactly one group, lr * decay ** depth; a frozen
    embedding is left out."""
    from sentiment.model import LSTMClassifier
    from sentiment.optim import parameter_groups

    model = LSTMClassifier(50, 8, 12, 2, bidirectional=True)
    groups = parameter_groups(model, 0.01, 0.5)
    assert [g["depth"] for g in groups] == [0, 1, 2, 3]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.005, 0.0025, 0.00125])
    names = {id(p): name for name, p in model.named_parameters()}
    grouped = [[names[id(p)] for p in g["params"]] for g in groups]
    assert sorted(itertools.chain.from_iterable(grouped)) == sorted(names.values())
    assert grouped[0] == ["classifier.weight", "classifier.bias"] and grouped[3] == ["embedding.weight"]
    assert all(name.endswith(("_l1", "_l1_reverse")) for name in grouped[1]) and len(grouped[1]) == 8
    frozen = LSTMClassifier(50, 8, 12, 2, freeze_embeddings=True)
    assert [g["depth"] for g in parameter_groups(frozen, 0.01)] == [0, 1, 2]


def test_gradual_unfreezing_factors() -> None:
    """Depth d waits d epochs, then follows the schedule (here constant)."""
    cfg = build_config(None, {"gradual_unfreezing": True})
    factors = [LRFactor(cfg, total_steps=40, steps_per_epoch=10, depth=depth) for depth in range(3)]
    assert [[f(step) for step in (0, 9, 10, 19, 20, 39)] for f in factors] == [
        [1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1],
    ]


def test_unfreeze_warmup_ramps_each_newly_unfrozen_group() -> None:
    """With unfreeze_warmup 0.5 (epochs) a group rises linearly from 0 over half an epoch after it unfreezes, then
    follows the schedule; the head (depth 0) follows the schedule from the first step."""
    cfg = build_config(None, {"gradual_unfreezing": True, "unfreeze_warmup": 0.5})
    factors = [LRFactor(cfg, total_steps=40, steps_per_epoch=10, depth=depth) for depth in range(3)]
    assert [[f(step) for step in (0, 9, 10, 11, 14, 15, 19, 20, 24, 25, 39)] for f in factors] == [
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0.2, 0.4, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0.2, 1, 1, 1],
    ]
    onecycle = build_config(None, {"gradual_unfreezing": True, "unfreeze_warmup": 0.5, "lr_schedule": "onecycle"})
    plain = LRFactor(build_config(None, {"gradual_unfreezing": True, "lr_schedule": "onecycle"}), 40, 10, depth=1)
    ramped = LRFactor(onecycle, 40, 10, depth=1)
    assert ramped(12) == pytest.approx(plain(12) * 3 / 5) and ramped(30) == plain(30)
    with pytest.raises(ConfigError, match="unfreeze_warmup"):
        build_config(None, {"unfreeze_warmup": -1})


def test_gradual_unfreezing_moves_only_the_unfrozen_layers(hub_imdb: Path, tmp_path: Path) -> None:
    """Two epochs of a 2-layer model with gradual unfreezing and layer decay: the head and the top LSTM layer
    train, the bottom layer and the embedding keep exactly their starting values (a run with lr 1e-30, which
    moves nothing, gives those)."""
    from safetensors.torch import load_file

    options = {"epochs": 2, "n_layers": 2, "gradual_unfreezing": True, "lr_layer_decay": 0.5}
    train(tiny_config(hub_imdb, tmp_path / "start", **{**options, "lr": 1e-30}))
    metrics = train(tiny_config(hub_imdb, tmp_path / "unfrozen", **options))
    assert len(metrics["history"]) == 2
    start = load_file(tmp_path / "start" / "best" / "model.safetensors")
    trained = load_file(tmp_path / "unfrozen" / "state" / "model.safetensors")
    for name, value in start.items():
        moved = not torch.equal(value, trained[name])
        assert moved == (name.startswith("classifier") or "_l1" in name), name


def test_weight_dropout_masks_recurrent_weights_in_training_only() -> None:
    """DropConnect on the hidden-to-hidden matrices: random in training (gradients still reach the weights), no
    effect in evaluation, on the padded and fused paths; the packed path refuses it."""
    from sentiment.model import LSTMClassifier

    torch.manual_seed(0)
    ids, lengths = torch.randint(2, 40, (4, 9)), torch.tensor([9, 3, 7, 1])
    for rnn_input in ("padded", "fused"):
        plain = LSTMClassifier(40, 6, 8, 2, True, dropout=0.0, rnn_input=rnn_input)
        dropped = LSTMClassifier(40, 6, 8, 2, True, dropout=0.0, rnn_input=rnn_input, weight_dropout=0.5)
        dropped.load_state_dict(plain.state_dict())
        assert torch.equal(plain.eval()(ids, lengths), dropped.eval()(ids, lengths))
        dropped.train()
        first, second = dropped(ids, lengths), dropped(ids, lengths)
        assert not torch.allclose(first, second) and not torch.allclose(first, plain.train()(ids, lengths))
        first.sum().backward()
        assert dropped.lstm.weight_hh_l1_reverse.grad.abs().sum() > 0
    dropped.rnn_input = "packed"
    with pytest.raises(ValueError, match="weight_dropout"):
        dropped(ids, lengths)
    with pytest.raises(ConfigError, match="weight_dropout"):
        build_config(None, {"weight_dropout": 0.3, "rnn_input": "packed"})
    with pytest.raises(ConfigError, match="lr_layer_decay"):
        build_config(None, {"lr_layer_decay": 0.0})
