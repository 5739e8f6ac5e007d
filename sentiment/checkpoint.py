"""The run folder: writing files whole (a temporary name, then a rename), ``best/`` and ``state/``,
a full disk, and what may change when a run resumes."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file

from sentiment.config import RESUME_FIXED, ConfigError, TrainConfig
from sentiment.hub import write_model_card
from sentiment.prepare import PreparedData

logger = logging.getLogger(__name__)


TRAINER_STATE = "trainer_state.json"


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completely written folder ``tmp`` to ``final``; the old ``final`` survives until the new one is in."""
    old = final.with_name(final.name + ".old")
    if final.exists():  # then any .old is stale; without final, .old is the last complete copy: keep it for now
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def existing_dir(final: Path) -> Path | None:
    """``final``, or its ``.old`` copy when a crash struck between the two renames of ``replace_dir``."""
    old = final.with_name(final.name + ".old")
    return final if final.is_dir() else old if old.is_dir() else None


class SaveError(RuntimeError):
    """The disk (or the quota) ran full while saving; the partial files were removed, the last complete
    ``best/`` and ``state/`` kept."""


def _disk_full(err: BaseException, folder: Path) -> str | None:
    """Why ``err`` looks like a full disk, or None. torch.save reports one as an opaque RuntimeError ("unexpected
    pos ..."), safetensors as "os error 28": when the error does not say, the free space on ``folder``'s disk does."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return err.strerror
    for text in ("No space left on device", "Disk quota exceeded"):
        if text in str(err):
            return text
    try:
        disk = os.statvfs(folder)
    except OSError:
        return None
    free = disk.f_bavail * disk.f_frsize
    return f"{type(err).__name__} with {free} bytes free on the disk" if free < 2**20 else None


@contextlib.contextmanager
def saving(output_dir: Path, target: Path, clean_up: bool = True) -> Iterator[None]:
    """Write ``target`` of the run in ``output_dir``: on a full disk remove the temporary files (``clean_up``: on
    the process that writes them) and raise a ``SaveError`` saying what was kept and what to do."""
    try:
        yield
    except Exception as err:
        reason = _disk_full(err, output_dir)
        if reason is None:
            raise
        if clean_up:
            for partial in [*output_dir.glob(".*.tmp*"), *output_dir.glob("best/.*.tmp")]:
                shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
        best, state = existing_dir(output_dir / "best"), existing_dir(output_dir / "state")
        saved = {"the last complete checkpoint": best, "the state": state}
        kept = " and ".join(f"{what} in {where}" for what, where in saved.items() if where is not None)
        kept = f"{kept} {'are' if best and state else 'is'} intact" if kept else "nothing was saved yet"
        then = (
            f"continue with the same command and --resume --output_dir {output_dir} (or copy {output_dir} to a disk "
            "with room and resume there)"
            if state is not None
            else "start the run again with --overwrite (or pick an --output_dir on a disk with room)"
        )
        raise SaveError(
            f"disk full while writing {target} ({reason}). The partial files were removed; {kept}. Free space on "
            f"that disk, then {then}"
        ) from err


def default_run_name(cfg: TrainConfig) -> str:
    kind = "bilstm" if cfg.bidirectional else "lstm"
    name = f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_id = os.environ.get("WANDB_RUN_ID")  # set by `wandb agent`: several agents may start in one second
    return f"{name}-{run_id}" if run_id else name


def check_output_dir(cfg: TrainConfig, output_dir: Path) -> None:
    holds_run = (output_dir / "config.yaml").exists() or existing_dir(output_dir / "state") is not None
    if cfg.resume:
        if existing_dir(output_dir / "state") is None:
            raise ConfigError(f"--resume: {output_dir} holds no saved state to continue; start it without --resume")
    elif holds_run and not cfg.overwrite:
        raise ConfigError(
            f"output_dir {output_dir} already holds a run. Pass --resume to continue it, --overwrite to "
            "replace it, or choose another --output_dir"
        )


def _flag_text(value: Any) -> str:
    """A value as a flag takes it: null, true, 0.001."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _read_saved_run(output_dir: Path) -> dict[str, Any]:
    """What ``--resume`` checks a run against: the saved run's config (``config``; None when the folder holds no
    config.yaml), the epochs it finished (``epochs_done``; None when the trainer state cannot be read, which the
    load then reports) and a problem that stops the resume (``error``)."""
    saved: dict[str, Any] = {"config": None, "epochs_done": None, "error": None}
    path = output_dir / "config.yaml"
    if path.is_file():
        try:
            saved["config"] = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            saved["error"] = (
                f"--resume: the saved run's {path} cannot be read ({type(err).__name__}), so the settings cannot be "
                f"checked against it. Put back an intact copy of it, or start the run over with --overwrite"
            )
        if saved["config"] is not None and not isinstance(saved["config"], dict):
            saved["config"] = None
    state_dir = existing_dir(output_dir / "state")
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        saved["epochs_done"] = int(json.loads((state_dir / TRAINER_STATE).read_text())["epoch"])
    return saved


def resume_conflicts(saved: dict[str, Any], epochs_done: int | None, cfg: TrainConfig) -> list[str]:
    """The changes from the saved run's config ``saved`` (its config.yaml) to ``cfg`` that ``--resume`` cannot
    honour, one line each: ``key: saved -> new (why)``. A key of ``RESUME_FIXED`` may not change (the saved state
    or the finished epochs follow the saved value); ``epochs`` may, but not below ``epochs_done``. A key the
    saved config lacks (a run written before the key existed) counts as the key's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    conflicts = []
    for key, new in cfg.to_dict().items():
        old = saved.get(key, defaults[key])
        if key == "epochs" and epochs_done is not None and new < epochs_done:
            conflicts.append(
                f"epochs: {old} -> {new} ({epochs_done} epochs are done already: pass --epochs of at least "
                f"{epochs_done})"
            )
        elif key in RESUME_FIXED and old != new:
            conflicts.append(f"{key}: {_flag_text(old)} -> {_flag_text(new)} ({RESUME_FIXED[key]})")
    return conflicts


def check_resume(accelerator: Accelerator, cfg: TrainConfig, output_dir: Path) -> None:
    """``--resume``: compare ``cfg`` (the resolved config of the resumed run) with the saved run's config.yaml, key
    by key, before anything is trained or written. A change the saved state cannot honour (``resume_conflicts``)
    is a ``ConfigError`` listing every such key, its saved and new values and the two ways on; the changes that
    may happen (``RESUME_MAY_CHANGE``) are logged. The main process reads the saved files (another host may
    have no copy of the run folder) and sends them to the others, so every process decides alike."""
    received = [_read_saved_run(output_dir) if accelerator.is_main_process else None]
    broadcast_object_list(received)
    saved = received[0]
    if saved["error"]:
        raise ConfigError(saved["error"])
    if saved["config"] is None:
        if accelerator.is_main_process:
            logger.warning("--resume: %s has no config.yaml; the settings are not checked against it", output_dir)
        return
    conflicts = resume_conflicts(saved["config"], saved["epochs_done"], cfg)
    if conflicts:
        keys = [line.split(":", 1)[0] for line in conflicts]
        as_saved = " ".join(f"--{key}={_flag_text(saved['config'].get(key))}" for key in keys if key in saved["config"])
        raise ConfigError(
            f"--resume: the run in {output_dir} cannot continue with these settings (saved -> new):\n  "
            + "\n  ".join(conflicts)
            + f"\nTo continue the saved run, drop these flags (or pass its values: {as_saved}); to train with the "
            "new settings, start over: the same command with --overwrite instead of --resume, or a new --output_dir"
        )
    changed = {
        key: (saved["config"].get(key), value)
        for key, value in cfg.to_dict().items()
        if key in saved["config"] and key not in ("resume", "overwrite") and saved["config"][key] != value
    }
    if changed and accelerator.is_main_process:
        logger.info(
            "resume with settings changed from the saved run: %s",
            ", ".join(f"{key} {_flag_text(old)} -> {_flag_text(new)}" for key, (old, new) in changed.items()),
        )


def resume_early_stop(state: dict[str, Any], cfg: TrainConfig, log: bool) -> None:
    """After ``--resume``: whether the run stops early, under this run's ``early_stopping_patience`` and ``epochs``
    over the saved history (the same test as at the end of an epoch), so a changed patience takes effect now."""
    patience, done, best = cfg.early_stopping_patience, state["epoch"], state["best_epoch"]
    stop = patience is not None and best is not None and done - best >= patience and done < cfg.epochs
    if log and stop != bool(state.get("stopped_early")):
        if stop:
            logger.info("early stop: no better validation accuracy for %d epochs", patience)
        else:
            logger.info("early_stopping_patience %s: the run that stopped early goes on", _flag_text(patience))
    state["stopped_early"] = stop
    if log and (stop or done >= cfg.epochs):
        logger.info("nothing left to train: %d of %d epochs done", done, cfg.epochs)


def load_best_weights(model: torch.nn.Module, path: Path | None) -> None:
    """Load the weights of ``path`` (a ``model.safetensors``) into ``model`` on every process, reading the file on
    the main process only: rank 0 of the process group (or the only process) sends them to the others, which may
    have no copy of the run folder (several hosts with their own disks). Elsewhere ``path`` is not read and may be
    None. When the main process cannot load them, it raises its error and the others a ``RuntimeError``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        model.load_state_dict(load_file(path))
        return
    expected = model.state_dict()
    device = next(iter(expected.values())).device  # NCCL sends from the process's GPU, gloo from the CPU
    loaded, error = None, None
    if dist.get_rank() == 0:
        try:
            loaded = load_file(path)
            model.load_state_dict(loaded)
        except Exception as err:  # the others must hear of it, not wait for weights that never come
            error = err
    ok = torch.tensor(float(error is None), device=device)
    dist.broadcast(ok, src=0)
    if error is not None:
        raise error
    if not ok.item():
        raise RuntimeError("the main process could not load the best weights (its error says why)")
    received = {}
    for key, like in expected.items():
        tensor = (
            loaded[key].to(device=device, dtype=like.dtype).contiguous()
            if loaded is not None
            else torch.empty_like(like, device=device, memory_format=torch.contiguous_format)
        )
        dist.broadcast(tensor, src=0)
        received[key] = tensor
    if loaded is None:
        model.load_state_dict(received)


def save_best(model: torch.nn.Module, data: PreparedData, output_dir: Path, model_card: bool = True) -> None:
    """Write ``output_dir/best`` (weights, config.json, tokenizer.json and, with ``model_card``, README.md) through
    a temporary folder; a full disk leaves the previous ``best/`` in place (``SaveError``)."""
    tmp = output_dir / ".best.tmp"
    with saving(output_dir, output_dir / "best"):
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        data.tokenizer.save(str(tmp / "tokenizer.json"))
        replace_dir(tmp, output_dir / "best")
        if model_card:
            write_model_card(output_dir / "best", output_dir, results=False)


def save_state(accelerator: Accelerator, state: dict[str, Any], output_dir: Path) -> None:
    tmp = output_dir / ".state.tmp"
    # A process that fails raises without reaching the next wait_for_everyone: the launcher then ends the others.
    with saving(output_dir, output_dir / "state", clean_up=accelerator.is_main_process):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            replace_dir(tmp, output_dir / "state")
        accelerator.wait_for_everyone()


def load_state(accelerator: Accelerator, state_dir: Path) -> dict[str, Any]:
    """Restore the model, optimizer, scheduler and random states saved in ``state_dir`` and return the trainer
    state (``--resume``). A file there that cannot be read (a copy cut short, a full disk) is a ``CheckpointError``
    naming it and the ways on: an intact copy of the folder, or the run started over with ``--overwrite``."""
    from safetensors import safe_open

    from sentiment.model import CheckpointError

    try:
        accelerator.load_state(str(state_dir))
        return json.loads((state_dir / TRAINER_STATE).read_text())
    except Exception as err:  # safetensors, torch.load, pickle and json each raise their own types
        damaged = None
        for path in sorted(state_dir.iterdir()):
            try:
                if path.suffix == ".safetensors":
                    with safe_open(str(path), framework="pt"):  # checks the header against the file's size
                        pass
                elif path.suffix in (".bin", ".pkl", ".pt"):
                    torch.load(path, map_location="cpu", weights_only=False)  # the run's own files, as load_state
                elif path.name == TRAINER_STATE:
                    json.loads(path.read_text())
            except Exception:
                damaged = path
                break
        what = f"{damaged} is damaged or incomplete" if damaged else f"the saved state in {state_dir} cannot be loaded"
        raise CheckpointError(
            f"--resume: {what} ({type(err).__name__}: {str(err)[:200]}), so the run cannot continue from it. Put "
            f"back an intact copy of {state_dir} (an earlier save) and --resume again, or start the run over: the "
            f"same command with --overwrite instead of --resume"
            + ("" if damaged else f" (or resume with the run's own config, {state_dir.parent / 'config.yaml'})")
        ) from None
