"""End to end on CPU: real spaCy, tokenizers, GloVe, Accelerate training steps, files written and read back."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REAL_IMDB
from tokenizers import Tokenizer

from sentiment.config import RESUME_FIXED, RESUME_MAY_CHANGE, ConfigError, TrainConfig, build_config, config_keys
from sentiment.data import load_imdb, split_imdb
from sentiment.model import LSTMClassifier
from sentiment.prepare import PreparedData, PreparedDataError, prepare_data
from sentiment.text import PAD_ID, encode_tokens, pretokenize
from sentiment.training import TrainingStopped, train


def tiny_config(dataset: Path, output_dir: Path, **overrides: object) -> TrainConfig:
    """A config that trains in seconds on the fixtures."""
    values = {
        "dataset": str(dataset),
        "output_dir": str(output_dir),
        "epochs": 3,
        "batch_size": 8,
        "eval_batch_size": 16,
        "hidden_dim": 16,
        "n_layers": 1,
        "dropout": 0.1,
        "bidirectional": True,
        "lr": 0.01,
        "report_to": "none",
        "num_proc": 1,
    }
    values.update(overrides)
    return build_config(None, values)


@pytest.fixture(scope="module")
def trained_run(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, Path, dict]:
    """One real training run on the hub-layout fixture, shared by the tests below."""
    output_dir = tmp_path_factory.mktemp("runs") / "bilstm"
    cfg = tiny_config(hub_imdb, output_dir)
    return cfg, output_dir, train(cfg)


def test_run_folder_holds_everything(trained_run: tuple[TrainConfig, Path, dict]) -> None:
    """config.yaml, best/ (weights, config.json, tokenizer.json), state/, metrics.json, curves.png."""
    cfg, output_dir, metrics = trained_run
    for name in (
        "config.yaml",
        "metrics.json",
        "curves.png",
        "best/model.safetensors",
        "best/config.json",
        "best/tokenizer.json",
        "state/model.safetensors",
        "state/optimizer.bin",
        "state/trainer_state.json",
    ):
        assert (output_dir / name).is_file(), name
    assert not list(output_dir.glob(".*tmp*")), "temporary folders left behind"
    resolved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert resolved["hidden_dim"] == cfg.hidden_dim
    assert resolved["embedding_dim"] == 50  # follows the packaged GloVe vectors
    on_disk = json.loads((output_dir / "metrics.json").read_text())
    assert on_disk["test_acc"] == metrics["test_acc"]
    assert [h["epoch"] for h in on_disk["history"]] == [1, 2, 3]
    assert on_disk["sizes"] == {"train": 72, "validation": 8, "test": 60}
    assert (output_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_folder_holds_every_reviews_logit(trained_run: tuple[TrainConfig, Path, dict]) -> None:
    """validation-logits.npz and test-logits.npz: the selected model's logit and the label of every review of the
    split (the trainer's figures follow from them), in the split's order (the labels are the split's)."""
    cfg, output_dir, metrics = trained_run
    data = prepare_data(cfg)
    for split, accuracy in (("validation", metrics["valid_acc"]), ("test", metrics["test_acc"])):
        with np.load(output_dir / f"{split}-logits.npz") as saved:
            logits, labels = saved["logits"], saved["labels"]
        assert np.array_equal(labels, data.splits[split].labels)
        assert float(np.mean((logits > 0) == labels)) == pytest.approx(accuracy, abs=1e-12)
    loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits).double(), torch.from_numpy(labels).double())
    assert loss.item() == pytest.approx(metrics["test_loss"], rel=1e-5)


def test_training_learns(trained_run: tuple[TrainConfig, Path, dict]) -> None:
    """Training loss falls and the fixture's sentiment words are learnt."""
    _, _, metrics = trained_run
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["test_acc"] > 0.7


def test_checkpoint_reproduces_test_accuracy(trained_run: tuple[TrainConfig, Path, dict], hub_imdb: Path) -> None:
    """Reload best/ with from_pretrained and tokenizer.json, redo the preprocessing from the raw test texts, and
    get the trainer's test loss and accuracy."""
    cfg, output_dir, metrics = trained_run
    model = LSTMClassifier.from_pretrained(output_dir / "best").eval()
    tokenizer = Tokenizer.from_file(str(output_dir / "best" / "tokenizer.json"))
    test = split_imdb(load_imdb(str(hub_imdb)), valid_fraction=cfg.validation_fraction, seed=cfg.split_seed)["test"]
    ids = encode_tokens(tokenizer, pretokenize(test["text"]))
    lengths = torch.tensor([len(x) for x in ids])
    batch = torch.full((len(ids), int(lengths.max())), PAD_ID)
    for row, row_ids in enumerate(ids):
        batch[row, : len(row_ids)] = torch.tensor(row_ids)
    labels = torch.tensor(test["label"], dtype=torch.float32)
    with torch.no_grad():
        logits = model(batch, lengths)
    accuracy = ((logits > 0).float() == labels).sum().item() / len(labels)
    assert accuracy == pytest.approx(metrics["test_acc"], abs=1e-9)
    assert F.binary_cross_entropy_with_logits(logits, labels).item() == pytest.approx(metrics["test_loss"], rel=1e-4)


def test_same_seed_same_figures(trained_run: tuple[TrainConfig, Path, dict], hub_imdb: Path, tmp_path: Path) -> None:
    """A second run with the same config reproduces the figures; --resume continues an interrupted run to
    exactly the uninterrupted run's figures."""
    _, _, metrics = trained_run
    interrupted = tiny_config(hub_imdb, tmp_path / "resumed", epochs=2)
    first = train(interrupted)
    assert len(first["history"]) == 2
    state = json.loads((tmp_path / "resumed" / "state" / "trainer_state.json").read_text())
    assert state["epoch"] == 2
    resumed = train(tiny_config(hub_imdb, tmp_path / "resumed", epochs=3, resume=True))
    for key in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
        assert [h[key] for h in resumed["history"]] == pytest.approx([h[key] for h in metrics["history"]], abs=1e-6)
    assert resumed["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-9)


def test_refuses_to_overwrite_a_run(trained_run: tuple[TrainConfig, Path, dict], hub_imdb: Path) -> None:
    _, output_dir, _ = trained_run
    with pytest.raises(ConfigError, match=r"already holds a run.*--resume.*--overwrite"):
        train(tiny_config(hub_imdb, output_dir))


def test_resume_without_state_is_an_error(hub_imdb: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no saved state"):
        train(tiny_config(hub_imdb, tmp_path / "fresh", resume=True))


@pytest.fixture(scope="module")
def one_cosine_epoch(hub_imdb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a run of one epoch (9 steps) under a cosine schedule; tests resume copies of it."""
    output_dir = tmp_path_factory.mktemp("runs") / "cosine"
    train(tiny_config(hub_imdb, output_dir, epochs=1, lr_schedule="cosine"))
    return output_dir


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_resume_with_more_epochs_rebuilds_the_lr_schedule(
    one_cosine_epoch: Path,
    hub_imdb: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One epoch under a cosine schedule, then --epochs=3 --resume: the schedule (whose factor had reached 0 at the
    end of the saved run's 9 steps) is rebuilt for 27 steps from step 9, so epochs 2 and 3 train and differ; the
    run's config.yaml says 3 epochs."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_cosine_epoch, run_dir)
    applied = []  # the head's learning rate at each optimizer step
    adam_step = torch.optim.Adam.step

    def recording_step(self: torch.optim.Adam, *args: object, **kwargs: object) -> object:
        applied.append(float(self.param_groups[0]["lr"]))
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    with caplog.at_level(logging.INFO, logger="sentiment"):
        metrics = train(tiny_config(hub_imdb, run_dir, epochs=3, lr_schedule="cosine", resume=True))
    valid_losses = [h["valid_loss"] for h in metrics["history"]]
    assert len(valid_losses) == 3 and len(set(valid_losses)) == 3
    assert len(applied) == 18
    assert min(applied[:9]) > 0  # epoch 2
    assert applied[0] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 9 / 27)))  # 0.0075
    assert "lr schedule rebuilt for 3 epochs: 27 steps in all (was 9)" in caplog.text
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["epochs"] == 3


def test_resume_refuses_settings_the_saved_state_cannot_follow(
    one_cosine_epoch: Path, hub_imdb: Path, tmp_path: Path
) -> None:
    """A model shape or an optimizer setting changed on --resume: a ConfigError before any work, naming every
    changed key with its saved and new values and the ways on; the run folder is left as it was."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_cosine_epoch, run_dir)
    before = folder_contents(run_dir)
    changed = tiny_config(hub_imdb, run_dir, epochs=3, lr_schedule="cosine", resume=True, hidden_dim=8, lr=0.02)
    with pytest.raises(ConfigError) as refused:
        train(changed)
    message = str(refused.value)
    for text in ("hidden_dim: 16 -> 8", "lr: 0.01 -> 0.02", "--hidden_dim=16 --lr=0.01", "--overwrite", "--output_dir"):
        assert text in message, text
    assert "epochs" not in message  # a change that may happen
    assert folder_contents(run_dir) == before


def test_resume_accepts_a_new_early_stopping_patience(
    one_cosine_epoch: Path, hub_imdb: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """early_stopping_patience may change on --resume; config.yaml records the new value. (The saved run's one
    epoch is all it asks for: nothing is left to train, the best model is tested again.)"""
    run_dir = tmp_path / "run"
    shutil.copytree(one_cosine_epoch, run_dir)
    with caplog.at_level(logging.INFO, logger="sentiment"):
        metrics = train(
            tiny_config(hub_imdb, run_dir, epochs=1, lr_schedule="cosine", resume=True, early_stopping_patience=2)
        )
    assert "early_stopping_patience null -> 2" in caplog.text
    assert "nothing left to train: 1 of 1 epochs done" in caplog.text
    assert len(metrics["history"]) == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["early_stopping_patience"] == 2


def test_resume_refuses_fewer_epochs_than_done(
    trained_run: tuple[TrainConfig, Path, dict], hub_imdb: Path, tmp_path: Path
) -> None:
    """--epochs below the epochs a saved run has finished cannot be honoured: a ConfigError saying the least."""
    _, output_dir, _ = trained_run
    run_dir = tmp_path / "run"
    shutil.copytree(output_dir, run_dir)
    before = folder_contents(run_dir)
    with pytest.raises(ConfigError, match=r"epochs: 3 -> 2 \(3 epochs are done already: pass --epochs of at least 3"):
        train(tiny_config(hub_imdb, run_dir, epochs=2, resume=True))
    assert folder_contents(run_dir) == before


def test_resume_of_a_run_whose_embedding_follows_the_vectors(
    one_cosine_epoch: Path, hub_imdb: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run with the GloVe vectors and embedding_dim left out records the resolved size (50) in its config.yaml.
    Resumed with embedding_dim still left out, with the run's own config.yaml (which says 50, and, as a run folder
    from before the key was removed, unfreeze_warmup: 0.0) or with 50 as a flag, it passes the resume checks: the
    resolved sizes are compared, never None with 50. Any other size, 100 included, is refused before the resume."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_cosine_epoch, run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["embedding_dim"] == 50
    left_out = tiny_config(hub_imdb, run_dir, epochs=1, lr_schedule="cosine", resume=True)
    assert left_out.embedding_dim is None
    own_config = tmp_path / "old-config.yaml"
    own_config.write_text(yaml.safe_dump({**saved, "unfreeze_warmup": 0.0}, sort_keys=False))
    with caplog.at_level(logging.INFO, logger="sentiment"):
        for cfg in (
            left_out,
            build_config(own_config, {"output_dir": str(run_dir), "resume": True}),
            dataclasses.replace(left_out, embedding_dim=50),
        ):
            assert len(train(cfg)["history"]) == 1
    assert caplog.text.count("nothing left to train: 1 of 1 epochs done") == 3
    assert caplog.text.count("unfreeze_warmup was removed; its value 0.0 changed nothing, ignored") == 1
    assert "embedding_dim" not in caplog.text  # no change logged, none refused
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["embedding_dim"] == 50
    with pytest.raises(ConfigError, match="embedding_dim 100 does not match the 50-d vectors glove-6b-50d"):
        train(dataclasses.replace(left_out, embedding_dim=100))


def test_every_config_key_has_a_resume_rule() -> None:
    """Each config key may change on --resume or may not, never both; docs/reliability.md lists those that may."""
    may_change, fixed = set(RESUME_MAY_CHANGE), set(RESUME_FIXED)
    assert may_change | fixed == set(config_keys()) and not may_change & fixed
    docs = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    section = docs.split("## Settings that may change on --resume", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    assert {key for cell in first_cells for key in re.findall(r"`(\w+)`", cell)} == may_change


def test_overwrite_replaces_a_run(hub_imdb: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    train(tiny_config(hub_imdb, output_dir, epochs=1))
    (output_dir / "stale.txt").write_text("from the old run")
    metrics = train(tiny_config(hub_imdb, output_dir, epochs=1, overwrite=True, hidden_dim=8))
    assert not (output_dir / "stale.txt").exists()
    assert len(metrics["history"]) == 1
    assert yaml.safe_load((output_dir / "config.yaml").read_text())["hidden_dim"] == 8


def test_prepared_folder_trains_like_raw_data(hub_imdb: Path, tmp_path: Path) -> None:
    """Training from a `prepare`d folder gives the same figures as training from the raw dataset, and the
    resolved config records the data settings the folder was made with."""
    prepare_cfg = tiny_config(hub_imdb, tmp_path / "prepared", lowercase=True, epochs=2)
    prepare_data(prepare_cfg).save(tmp_path / "prepared")
    from_raw = train(tiny_config(hub_imdb, tmp_path / "raw", lowercase=True, epochs=2))
    from_prepared = train(
        tiny_config("/nonexistent", tmp_path / "from-prepared", prepared=str(tmp_path / "prepared"), epochs=2)
    )
    assert from_prepared["test_acc"] == from_raw["test_acc"]
    assert [h["train_loss"] for h in from_prepared["history"]] == pytest.approx(
        [h["train_loss"] for h in from_raw["history"]], abs=1e-6
    )
    resolved = yaml.safe_load((tmp_path / "from-prepared" / "config.yaml").read_text())
    assert resolved["lowercase"] is True
    assert resolved["dataset"] == str(hub_imdb)


def test_random_embedding_on_data_prepared_with_vectors(hub_imdb: Path, tmp_path: Path) -> None:
    """`vectors: none` on a folder prepared with GloVe trains on the folder's token ids with a random embedding of
    the config's embedding_dim, and the run's config.yaml says so; the folder's GloVe still serves other runs, whose
    embedding_dim follows the vectors (another size is refused, not replaced)."""
    prepared = prepare_data(tiny_config(hub_imdb, tmp_path / "unused"))
    assert prepared.embeddings is not None and prepared.embeddings.shape[1] == 50
    prepared.save(tmp_path / "prepared")
    run = tmp_path / "random"
    metrics = train(
        tiny_config(
            "/nonexistent", run, prepared=str(tmp_path / "prepared"), vectors="none", embedding_dim=12, epochs=1
        )
    )
    assert np.isfinite(metrics["history"][0]["train_loss"])
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert (resolved["vectors"], resolved["embedding_dim"]) == ("none", 12)
    model = LSTMClassifier.from_pretrained(run / "best")
    assert tuple(model.embedding.weight.shape) == (prepared.tokenizer.get_vocab_size(), 12)
    glove_run = tmp_path / "glove"
    train(tiny_config("/nonexistent", glove_run, prepared=str(tmp_path / "prepared"), epochs=1))
    resolved = yaml.safe_load((glove_run / "config.yaml").read_text())
    assert (resolved["vectors"], resolved["embedding_dim"]) == ("glove-6b-50d", 50)
    with pytest.raises(ConfigError, match="embedding_dim 12 does not match the 50-d vectors"):  # not replaced silently
        train(tiny_config("/nonexistent", tmp_path / "g12", prepared=str(tmp_path / "prepared"), embedding_dim=12))


def test_clipping_and_bf16_autocast_train(hub_imdb: Path, tmp_path: Path) -> None:
    """max_grad_norm and Accelerate's bf16 mixed precision run end to end on CPU with finite figures."""
    metrics = train(tiny_config(hub_imdb, tmp_path / "bf16", epochs=2, max_grad_norm=0.5, mixed_precision="bf16"))
    assert len(metrics["history"]) == 2
    assert all(np.isfinite(h["train_loss"]) for h in metrics["history"])
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]


def test_missing_prepared_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PreparedDataError, match="sentiment prepare"):
        PreparedData.load(tmp_path)


def test_wandb_offline_run_is_written(hub_imdb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """report_to: wandb without a login writes an offline run that `wandb sync` can upload."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train(tiny_config(hub_imdb, tmp_path / "tracked", epochs=1, report_to="wandb", run_name="tracked"))
    runs = list((tmp_path / "tracked" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = json.loads((tmp_path / "tracked" / "state" / "trainer_state.json").read_text())["wandb_run_id"]
    assert runs[0].name.endswith(run_id)
    record = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for key in (b"hidden_dim", b"valid_acc", b"train_loss", b"test_acc"):  # config and logged metrics
        assert key in record, key


@pytest.mark.integration
def test_real_imdb_one_epoch(tmp_path: Path) -> None:
    """One epoch on a few thousand real IMDB reviews (truncated to 200 tokens) learns something: accuracy well
    above chance (0.5; on 1000 reviews chance stays within about +-0.05)."""
    cfg = build_config(
        None,
        {
            "dataset": str(REAL_IMDB),
            "output_dir": str(tmp_path / "imdb"),
            "max_train_samples": 5000,
            "max_eval_samples": 1000,
            "max_length": 200,
            "lowercase": True,
            "epochs": 1,
            "batch_size": 16,
            "hidden_dim": 64,
            "bidirectional": True,
            "pooling": "max",  # with the final state alone, one epoch of 313 steps often stays near chance
            "lr": 0.003,
            "report_to": "none",
        },
    )
    metrics = train(cfg)
    assert metrics["sizes"] == {"train": 5000, "validation": 1000, "test": 1000}
    prepared = json.loads((tmp_path / "imdb" / "metrics.json").read_text())
    assert prepared["test_acc"] == metrics["test_acc"]
    assert metrics["valid_acc"] > 0.6
    assert metrics["test_acc"] > 0.6
    assert np.isfinite(metrics["test_loss"])


def test_sigterm_saves_state_and_resume_matches(
    trained_run: tuple[TrainConfig, Path, dict], hub_imdb: Path, tmp_path: Path
) -> None:
    """SIGTERM stops the run after the current step with its state saved (mid-epoch); --resume then ends with
    exactly the uninterrupted run's figures."""
    _, _, metrics = trained_run

    def terminate_after_first_epoch(epoch: int, record: dict[str, float]) -> None:
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the next step saves and stops

    with pytest.raises(TrainingStopped, match=r"after step 1.*--resume"):
        train(tiny_config(hub_imdb, tmp_path / "stopped"), on_epoch_end=terminate_after_first_epoch)
    state = json.loads((tmp_path / "stopped" / "state" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 1)
    assert not (tmp_path / "stopped" / "metrics.json").exists()
    resumed = train(tiny_config(hub_imdb, tmp_path / "stopped", resume=True))
    for key in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
        assert [h[key] for h in resumed["history"]] == pytest.approx([h[key] for h in metrics["history"]], abs=1e-9)
    assert resumed["test_acc"] == metrics["test_acc"]


def test_sigkill_mid_epoch_then_resume_matches(hub_imdb: Path, tmp_path: Path) -> None:
    """A run killed with SIGKILL in the middle of an epoch continues from its last mid-epoch save (model,
    optimizer, RNG, sampler position, partial figures) to exactly the figures of an uninterrupted run."""
    settings = {"epochs": 3, "batch_size": 1, "save_steps": 5}
    reference = train(tiny_config(hub_imdb, tmp_path / "reference", **settings))
    run_dir = tmp_path / "killed"
    args = [f"--{k}={v}" for k, v in tiny_config(hub_imdb, run_dir, **settings).to_dict().items() if v is not None]
    process = subprocess.Popen([sys.executable, "-m", "sentiment.cli", "train", *args], cwd=Path(__file__).parents[1],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    state_file = run_dir / "state" / "trainer_state.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if state_file.exists() and json.loads(state_file.read_text()).get("step", 0) > 0:
                break  # a mid-epoch save has landed
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = json.loads(state_file.read_text())
    assert state["step"] > 0 and not (run_dir / "metrics.json").exists()
    resumed = train(tiny_config(hub_imdb, run_dir, resume=True, **settings))
    for key in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
        assert [h[key] for h in resumed["history"]] == pytest.approx([h[key] for h in reference["history"]], abs=1e-9)
    assert resumed["test_acc"] == reference["test_acc"]
    assert resumed["test_loss"] == pytest.approx(reference["test_loss"], abs=1e-12)


def test_replace_dir_never_drops_the_last_complete_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between replace_dir's two renames leaves only best.old (found by _existing_dir); the next save,
    crashing again before its new folder is in place, must still leave that copy."""
    from sentiment import checkpoint

    final, old = tmp_path / "best", tmp_path / "best.old"
    old.mkdir()
    (old / "model.safetensors").write_text("epoch 1")
    new = tmp_path / ".best.tmp"
    new.mkdir()
    (new / "model.safetensors").write_text("epoch 2")
    real_replace = os.replace

    def crash_on_the_new_folder(src: str | Path, dst: str | Path) -> None:
        if Path(src) == new:
            raise OSError("crash")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_the_new_folder)
    with pytest.raises(OSError, match="crash"):
        checkpoint.replace_dir(new, final)
    assert checkpoint.existing_dir(final) == old and (old / "model.safetensors").read_text() == "epoch 1"
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    checkpoint.replace_dir(new, final)
    assert (final / "model.safetensors").read_text() == "epoch 2" and not old.exists()
