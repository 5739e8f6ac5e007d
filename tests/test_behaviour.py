"""The trainer's behaviour pinned: a fixed seed trained on CPU for two epochs gives the same losses, accuracies and
weights as the values recorded once, before the training loop was split into modules. A change that moves code
without meaning to change what it computes must keep this test passing; one that means to change the numbers
records new ones and says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sentiment.config import build_config
from sentiment.training import train

# Many options at once, so that a change to any of them shows: a 2-layer BiLSTM with every dropout, max pooling,
# AdamW with weight decay, warm-up + cosine schedule, gradient clipping.
OPTIONS = {
    "num_proc": 1,
    "epochs": 2,
    "batch_size": 8,
    "eval_batch_size": 16,
    "hidden_dim": 8,
    "n_layers": 2,
    "bidirectional": True,
    "dropout": 0.3,
    "embedding_dropout": 0.1,
    "weight_dropout": 0.2,
    "pooling": "max",
    "optimizer": "adamw",
    "weight_decay": 0.01,
    "lr": 0.01,
    "lr_schedule": "cosine",
    "warmup_ratio": 0.1,
    "max_grad_norm": 1.0,
    "seed": 3,
    "report_to": "none",
}

# Recorded at commit cea37cd (CPU, torch 2.13.0): per epoch, then the best model's test figures and, per weight
# tensor of best/model.safetensors, its sum and sum of squares.
EXPECTED: dict = {
    "train_loss": [0.6858718262778388, 0.6611410246955024],
    "valid_loss": [0.6775185465812683, 0.6672284007072449],
    "valid_acc": [0.625, 0.75],
    "test_loss": 0.6683972358703614,
    "test_acc": 0.8,
    "best_epoch": 2,
    "weights": {
        "classifier.bias": [0.09815068542957306, 0.009633557050295005],
        "classifier.weight": [-0.15054426714777946, 0.42898379689485505],
        "embedding.weight": [122.0231792749255, 2917.5996576459947],
        "lstm.bias_hh_l0": [1.6558828242123127, 1.3242281274865964],
        "lstm.bias_hh_l0_reverse": [-2.520941238850355, 1.7575080797614644],
        "lstm.bias_hh_l1": [1.7760398220270872, 1.9073110737775085],
        "lstm.bias_hh_l1_reverse": [-0.35478656250052154, 1.3057596236918962],
        "lstm.bias_ih_l0": [0.6546176578849554, 1.319565900438763],
        "lstm.bias_ih_l0_reverse": [0.952591915614903, 1.1991835813316944],
        "lstm.bias_ih_l1": [1.5668881554156542, 1.2770527941126963],
        "lstm.bias_ih_l1_reverse": [1.3127524927258492, 1.1403689030106503],
        "lstm.weight_hh_l0": [1.9740530275157653, 10.432556996933279],
        "lstm.weight_hh_l0_reverse": [-0.33839416698901914, 11.075426555854126],
        "lstm.weight_hh_l1": [-2.0425933587830514, 10.756011986515851],
        "lstm.weight_hh_l1_reverse": [0.049760875990614295, 11.891088130724768],
        "lstm.weight_ih_l0": [9.714977728202939, 70.42724037615938],
        "lstm.weight_ih_l0_reverse": [5.5005086891651445, 67.89886705133026],
        "lstm.weight_ih_l1": [-7.774089194950648, 21.778817045322455],
        "lstm.weight_ih_l1_reverse": [0.9221147139323875, 22.806351255534565],
    },
}


def test_a_fixed_seed_trains_as_recorded(hub_imdb: Path, tmp_path: Path) -> None:
    metrics = train(build_config(None, {**OPTIONS, "dataset": str(hub_imdb), "output_dir": str(tmp_path / "run")}))
    weights = load_file(tmp_path / "run" / "best" / "model.safetensors")
    got = {
        "train_loss": [h["train_loss"] for h in metrics["history"]],
        "valid_loss": [h["valid_loss"] for h in metrics["history"]],
        "valid_acc": [h["valid_acc"] for h in metrics["history"]],
        "test_loss": metrics["test_loss"],
        "test_acc": metrics["test_acc"],
        "best_epoch": metrics["best_epoch"],
        "weights": {name: [float(t.double().sum()), float(t.double().square().sum())] for name, t in weights.items()},
    }
    assert got["best_epoch"] == EXPECTED["best_epoch"]
    for key in ("train_loss", "valid_loss", "valid_acc", "test_loss", "test_acc"):
        assert got[key] == pytest.approx(EXPECTED[key], rel=1e-5, abs=1e-6), key
    assert set(got["weights"]) == set(EXPECTED["weights"])
    for name, sums in got["weights"].items():
        assert sums == pytest.approx(EXPECTED["weights"][name], rel=1e-4, abs=1e-6), name
    assert torch.isfinite(torch.tensor(got["train_loss"])).all()
