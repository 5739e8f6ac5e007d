"""A full disk while saving, for real: the run folder lies on a small tmpfs that the test fills up. The save that
hits ENOSPC raises a ``SaveError`` naming the folder, removes its temporary files, keeps the last ``best/`` and
``state/``, and ``--resume`` finishes the run once there is room again.

Mounting needs root; for another user the tests run again, in a child pytest, as root of a user and mount
namespace (``unshare``)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_training import tiny_config
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from sentiment.checkpoint import SaveError, save_best
from sentiment.model import LSTMClassifier
from sentiment.predict import SentimentClassifier
from sentiment.training import train

REVIEWS = ["A wonderful, moving film.", "Boring and awful, the worst plot.", "The movie was a film."]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted at ``tmp_path/disk``."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (test_without_root_in_a_user_namespace runs these tests)")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Write a ballast file until the disk is full (ENOSPC), then free about ``leave`` bytes of it."""
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, bytes(2**16))
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    os.truncate(ballast, ballast.stat().st_size - leave)
    return ballast


def leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if ".tmp" in path.name or path.name.endswith(".old")]


def test_disk_full_mid_run_keeps_the_last_checkpoint_and_resume_finishes(
    hub_imdb: Path, small_disk: Path, tmp_path: Path
) -> None:
    """The disk fills after epoch 1. Epoch 2's first save, the state after 5 steps (save_steps), has room for
    model.safetensors but not for optimizer.bin, where torch.save fails with an opaque RuntimeError. --resume
    trains epochs 2 and 3; the disk fills again and metrics.json cannot be written; --resume writes it."""
    run = small_disk / "run"
    epoch_1: dict[str, float] = {}

    def fill_after_epoch_1(epoch: int, record: dict[str, float]) -> None:
        if epoch == 1:
            epoch_1.update(record)
            shutil.copytree(run / "best", tmp_path / "best-epoch-1")
            fill(small_disk, leave=(run / "state" / "model.safetensors").stat().st_size + 8192)

    with pytest.raises(SaveError) as caught:
        train(tiny_config(hub_imdb, run, save_steps=5), on_epoch_end=fill_after_epoch_1)
    message = str(caught.value)
    assert message.startswith(f"disk full while writing {run / 'state'} ("), message
    assert f"the last complete checkpoint in {run / 'best'} and the state in {run / 'state'} are intact" in message
    assert f"Free space on that disk, then continue with the same command and --resume --output_dir {run} " in message
    assert sorted(path.name for path in run.iterdir()) == ["best", "config.yaml", "state"]
    assert leftovers(run) == []
    state = json.loads((run / "state" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 0)
    kept = SentimentClassifier.from_pretrained(run / "best", device="cpu").logits(REVIEWS)
    copy = SentimentClassifier.from_pretrained(tmp_path / "best-epoch-1", device="cpu").logits(REVIEWS)
    np.testing.assert_array_equal(kept, copy)

    (small_disk / "ballast").unlink()

    def fill_after_epoch_3(epoch: int, record: dict[str, float]) -> None:
        if epoch == 3:
            fill(small_disk, leave=0)

    with pytest.raises(SaveError, match=rf"^disk full while writing {re.escape(str(run))} \(No space left on device"):
        train(tiny_config(hub_imdb, run, save_steps=5, resume=True), on_epoch_end=fill_after_epoch_3)
    assert sorted(path.name for path in run.iterdir()) == ["best", "config.yaml", "state"]  # no metrics.json
    assert leftovers(run) == []

    (small_disk / "ballast").unlink()
    resumed = train(tiny_config(hub_imdb, run, save_steps=5, resume=True))  # all epochs done: test, write
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][0] == epoch_1
    assert json.loads((run / "metrics.json").read_text())["test_acc"] == resumed["test_acc"]
    assert leftovers(run) == []


def test_save_best_on_a_full_disk_keeps_the_previous_best(small_disk: Path) -> None:
    """safetensors reports a full disk as "os error 28"; best/ keeps the previous weights, .best.tmp goes."""
    run = small_disk / "run"
    run.mkdir()
    data = SimpleNamespace(tokenizer=Tokenizer(WordLevel({"<unk>": 0, "<pad>": 1, "great": 2}, unk_token="<unk>")))
    model = LSTMClassifier(vocab_size=3, embedding_dim=50, hidden_dim=64, pad_id=1)  # 120 kB of weights
    save_best(model, data, run)
    saved = (run / "best" / "model.safetensors").read_bytes()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    fill(small_disk, leave=4096)
    best = re.escape(str(run / "best"))
    with pytest.raises(SaveError, match=rf"^disk full while writing {best} \(No space left on device\)\. .*"
                                        rf"checkpoint in {best} is intact\. .*--overwrite"):  # fmt: skip
        save_best(model, data, run)
    assert sorted(path.name for path in run.iterdir()) == ["best"]
    assert leftovers(run) == []
    assert (run / "best" / "model.safetensors").read_bytes() == saved
    assert LSTMClassifier.from_pretrained(run / "best").embedding.weight.shape == (3, 50)


@pytest.mark.skipif(os.geteuid() == 0, reason="as root the tests above mount their tmpfs themselves")
def test_without_root_in_a_user_namespace(tmp_path: Path) -> None:
    """Without root: run the tests above as root of a new user and mount namespace, where a tmpfs may be mounted."""
    unshare = ["unshare", "--user", "--map-root-user", "--mount"]
    probe = subprocess.run(
        [*unshare, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp_path)], capture_output=True, text=True
    ) if shutil.which("unshare") else None  # fmt: skip
    if probe is None or probe.returncode != 0:
        reason = probe.stderr.strip() if probe else "no unshare command"
        pytest.skip(f"neither root nor a user namespace may mount a tmpfs here ({reason})")
    result = subprocess.run(
        [*unshare, sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        cwd=Path(__file__).parents[1], capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
