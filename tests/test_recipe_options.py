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
from sentiment.training import LRFactor, TrainingStopped, train

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
