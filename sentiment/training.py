"""The Accelerate training loop: train, evaluate, gather metrics, log to trackers, keep the best checkpoint,
save state each epoch for ``--resume``, evaluate the best model on test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import string
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import AutocastKwargs, broadcast_object_list, gather_object, set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sentiment.batching import bucket_length, make_dataloader
from sentiment.config import RESUME_FIXED, ConfigError, TrainConfig
from sentiment.graphs import GraphedTrainStep, tokens, train_step
from sentiment.hub import push_checkpoint, require_push_access, write_model_card
from sentiment.memory import GiB, StepPlan, plan_steps
from sentiment.model import LSTMClassifier
from sentiment.predict import write_logits
from sentiment.prepare import PreparedData, prepare_data

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


def _existing_dir(final: Path) -> Path | None:
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
def _saving(output_dir: Path, target: Path, clean_up: bool = True) -> Iterator[None]:
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
        best, state = _existing_dir(output_dir / "best"), _existing_dir(output_dir / "state")
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


def write_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _default_run_name(cfg: TrainConfig) -> str:
    kind = "bilstm" if cfg.bidirectional else "lstm"
    name = f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_id = os.environ.get("WANDB_RUN_ID")  # set by `wandb agent`: several agents may start in one second
    return f"{name}-{run_id}" if run_id else name


def _check_output_dir(cfg: TrainConfig, output_dir: Path) -> None:
    holds_run = (output_dir / "config.yaml").exists() or _existing_dir(output_dir / "state") is not None
    if cfg.resume:
        if _existing_dir(output_dir / "state") is None:
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
    state_dir = _existing_dir(output_dir / "state")
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


def _check_resume(accelerator: Accelerator, cfg: TrainConfig, output_dir: Path) -> None:
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


def lr_factors(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> list[LRFactor]:
    """One ``LRFactor`` per parameter group of ``optimizer`` (by its ``depth``), over ``cfg.epochs`` epochs of
    ``steps_per_epoch`` optimizer steps: the ``LambdaLR`` of a run."""
    total = cfg.epochs * steps_per_epoch
    return [LRFactor(cfg, total, steps_per_epoch, group["depth"]) for group in optimizer.param_groups]


def _rebuild_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR, factors: list[LRFactor], epochs: int, log: bool
) -> None:
    """After ``--resume``: the restored scheduler brings back the saved run's factors (``LambdaLR`` saves a
    callable's attributes), whose total of steps is the saved run's. When this run's ``factors`` differ (more or
    fewer epochs), they replace them, and each group's learning rate becomes its factor at the step reached: from
    there on the rate follows the schedule of a run of the new length (warm-up included, a share of the new total)."""
    restored = scheduler.lr_lambdas
    if all(vars(old) == vars(new) for old, new in zip(restored, factors, strict=True)):
        return
    step = scheduler.last_epoch  # optimizer steps done
    was = scheduler.base_lrs[0] * restored[0](step)
    scheduler.lr_lambdas = factors
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, factors, strict=True):
        if torch.is_tensor(group["lr"]):  # CUDA graphs read the rate from this tensor
            group["lr"].fill_(base * factor(step))
        else:
            group["lr"] = base * factor(step)
    if log:
        logger.info(
            "lr schedule rebuilt for %d epochs: %d steps in all (was %d); from step %d the lr is %.4g (was %.4g)",
            epochs, factors[0].total, restored[0].total, step, scheduler.base_lrs[0] * factors[0](step), was,
        )  # fmt: skip


def _resume_early_stop(state: dict[str, Any], cfg: TrainConfig, log: bool) -> None:
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


def _setup_wandb(cfg: TrainConfig, output_dir: Path, run_id: str | None) -> dict[str, Any]:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            "report_to: wandb needs the wandb package (pip install wandb); or pass --report_to=none"
        ) from None
    if "WANDB_MODE" not in os.environ and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
        logger.info("wandb: not logged in, writing an offline run (upload it later with `wandb sync`)")
    kwargs: dict[str, Any] = {"dir": str(output_dir)}
    if "WANDB_SWEEP_ID" not in os.environ:
        kwargs["name"] = cfg.run_name or output_dir.name
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    return kwargs


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    accelerator: Accelerator,
    keep_logits: bool = False,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Loss and accuracy over every example of ``loader`` on all processes, each example counted once. With
    ``keep_logits`` also ``logits``: every example's logit in the split's order, gathered from all processes.
    ``max_tokens``: a batch of more tokens (rows x length) is run in groups of rows of at most that many (the
    same logits, in less memory)."""
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    kept = []
    for batch in loader:
        labels = batch["labels"].to(accelerator.device)
        input_ids = batch["input_ids"].to(accelerator.device)
        rows, steps = input_ids.shape
        chunk = rows if not max_tokens else max(1, min(rows, max_tokens // steps))
        logits = torch.cat(
            [model(input_ids[start : start + chunk], batch["lengths"][start : start + chunk]).float()
             for start in range(0, rows, chunk)]
        )  # fmt: skip
        stats[0] += F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        stats[1] += ((logits > 0).float() == labels).sum()
        stats[2] += len(labels)
        if keep_logits:
            kept.append(logits.cpu())
    stats = accelerator.reduce(stats, reduction="sum")
    count = stats[2].item()
    figures: dict[str, Any] = {"loss": stats[0].item() / count, "acc": stats[1].item() / count, "count": int(count)}
    if keep_logits:  # the batch sampler's indices say where each logit belongs (it deals batches to processes)
        indices = [index for batch in loader.batch_sampler for index in batch]
        local = (indices, torch.cat(kept).tolist() if kept else [])
        in_order = np.zeros(int(count), dtype=np.float32)
        for process_indices, process_logits in gather_object([local]):
            in_order[process_indices] = process_logits
        figures["logits"] = in_order
    return figures


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    accelerator: Accelerator,
    epoch: int,
    cfg: TrainConfig,
    start_step: int = 0,
    partial_totals: list[float] | None = None,
    after_step: Callable[[int, torch.Tensor], None] | None = None,
    graph_step: GraphedTrainStep | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    chunk_tokens: int | None = None,
) -> dict[str, float]:
    """One pass over this process's batches of ``epoch``; loss and accuracy over all processes' examples.

    Figures accumulate on the device (no host sync per step); the bar shows the loss every 50 steps. An epoch
    interrupted after ``start_step`` steps continues from there, with the figures summed so far
    (``partial_totals``, over all processes). ``after_step(steps_done, totals)`` runs after every step.
    Each step is :func:`sentiment.graphs.train_step`: replayed from a CUDA graph with ``graph_step`` (batches of
    fixed shapes, see :mod:`sentiment.graphs`), else run eagerly, batches of more than ``chunk_tokens`` tokens in
    groups of rows (:mod:`sentiment.memory`); ``scheduler`` steps after every optimizer step. A step whose
    gradients are not finite (an overflow) has them set to zero instead of turning the weights into NaN;
    ``nonfinite_steps`` counts such steps.
    """
    model.train()
    loader.batch_sampler.set_epoch(epoch, skip_batches=start_step)
    device = accelerator.device
    totals = torch.zeros(3, dtype=torch.float64, device=device) if graph_step is None else graph_step.totals.zero_()
    nonfinite_steps = (
        torch.zeros((), dtype=torch.int64, device=device) if graph_step is None else graph_step.nonfinite_steps.zero_()
    )
    if partial_totals is not None and accelerator.is_main_process:  # summed over processes: counted once
        totals += torch.tensor(partial_totals, dtype=torch.float64, device=device)
    # fp16: true gradients before clipping; the scaler then skips overflowed steps
    unscale = accelerator.unscale_gradients if accelerator.scaler is not None else None
    # Several processes: each step's loss is divided by the reviews of all its batches over the process count, so
    # that DDP's average weighs every review the same, also in a step whose batches differ in size.
    processes = accelerator.num_processes
    step_sizes = loader.batch_sampler.step_sizes() if processes > 1 else None
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not accelerator.is_main_process, leave=False)
    for step, batch in enumerate(bar, start=start_step):
        if graph_step is not None:
            graph_step.step(batch)
        else:
            on_device = {key: value.to(device, non_blocking=True) for key, value in batch.items() if key != "lengths"}
            denominator = step_sizes[step - start_step] / processes if step_sizes else None
            train_step(
                model, optimizer, {**on_device, "lengths": batch["lengths"]}, totals, cfg.max_grad_norm,
                nonfinite_steps, chunk_tokens=chunk_tokens, backward=accelerator.backward, unscale=unscale,
                denominator=denominator,
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{(totals[0] / totals[2].clamp(min=1)).item():.4f}")
        if after_step is not None:
            after_step(step + 1, totals)
    totals = accelerator.reduce(totals, reduction="sum")
    return {
        "loss": totals[0].item() / totals[2].item(),
        "acc": totals[1].item() / totals[2].item(),
        "nonfinite_steps": int(nonfinite_steps.item()),  # the same on every process (gradients all-reduced)
    }


def plot_curves(
    history: list[dict[str, float]],
    path: Path,
    panels: tuple[tuple[str, str], ...] = (("loss", "Loss (BCE)"), ("acc", "Accuracy")),
) -> None:
    """Per epoch, train against validation, one panel per ``(metric, title)`` (``train_<metric>`` and
    ``valid_<metric>`` of each record; loss and accuracy by default), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels, strict=True):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"valid_{metric}"] for h in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingStopped(RuntimeError):
    """SIGINT or SIGTERM arrived: the state was saved after the current step and the run stopped."""

    def __init__(self, output_dir: Path, epoch: int, step: int) -> None:
        super().__init__(
            f"stopped in epoch {epoch + 1} after step {step}; state saved in {output_dir}/state. Continue with "
            f"the same command and --resume --output_dir {output_dir}"
        )


class StopSignal:
    """While entered, SIGINT and SIGTERM set ``requested`` (the loop saves state and stops after the current
    step) instead of killing the process mid-write. Outside the main thread it installs nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("received %s: saving state after this step, then stopping", signal.Signals(signum).name)
        self.requested = True

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def parameter_groups(model: torch.nn.Module, lr: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """The classifier's trainable parameters by depth from the output: the head (depth 0), the LSTM layers from
    the top down (1 .. n_layers, both directions together), the embedding (n_layers + 1). Each group's learning
    rate is ``lr * layer_decay ** depth`` (discriminative learning rates, as in ULMFiT)."""
    lstm = model.lstm
    layer_of = {name: int(re.search(r"_l(\d+)(_reverse)?$", name).group(1)) for name, _ in lstm.named_parameters()}
    by_depth = [list(model.classifier.parameters())]
    for layer in reversed(range(lstm.num_layers)):
        by_depth.append([param for name, param in lstm.named_parameters() if layer_of[name] == layer])
    by_depth.append(list(model.embedding.parameters()))
    if sum(len(params) for params in by_depth) != len(list(model.parameters())):
        raise RuntimeError("parameter_groups: the model has parameters outside the head, the LSTM and the embedding")
    return [
        {"params": trainable, "lr": lr * layer_decay**depth, "depth": depth}
        for depth, params in enumerate(by_depth)
        if (trainable := [p for p in params if p.requires_grad])
    ]


def build_optimizer(
    cfg: TrainConfig, model: torch.nn.Module, capturable: bool, device: torch.device
) -> torch.optim.Optimizer:
    """Adam or AdamW (``optimizer``, ``weight_decay``) over ``parameter_groups`` (``lr_layer_decay``). For CUDA
    graphs the optimizer is ``capturable`` and a scheduled learning rate is a tensor on the device, which the
    scheduler updates in place (a graph reads it)."""
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    groups = parameter_groups(model, cfg.lr, cfg.lr_layer_decay)
    if not capturable:
        return kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule != "constant" or cfg.gradual_unfreezing:
        for group in groups:
            group["lr"] = torch.tensor(group["lr"], device=device)
    return kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=True)


class LRFactor:
    """The learning rate's factor at each optimizer step (``LambdaLR``): ``cosine`` rises linearly over the first
    ``warmup_ratio`` of the steps, then falls to 0 along a cosine; ``onecycle`` rises from 1/25 over the first
    ``warmup_ratio`` (0.3 when 0) of the steps, then falls along a cosine to 1/10,000 (one-cycle without the
    momentum cycle, which CUDA graphs would not see); ``constant``: 1.

    With ``gradual_unfreezing`` a parameter group of ``depth`` d (``parameter_groups``) gets factor 0 during the
    first d epochs of ``steps_per_epoch`` steps: the head trains alone in the first epoch, and each epoch after
    it lets the next layer down move. (The frozen groups' weights stay exactly as they are; their gradients
    are still computed, which keeps the step the same for CUDA graphs, and feed Adam's moments.) With
    ``unfreeze_warmup`` u > 0 a group that unfreezes does not jump to the schedule's factor: it rises to it
    linearly over its first u epochs (as fastai's ULMFiT, which restarts a one-cycle at each unfreezing stage,
    starts each newly trained layer at a low rate); the head, trained from the start, follows the schedule."""

    def __init__(self, cfg: TrainConfig, total_steps: int, steps_per_epoch: int = 1, depth: int = 0) -> None:
        self.kind = cfg.lr_schedule
        ratio = cfg.warmup_ratio if cfg.warmup_ratio > 0 or self.kind != "onecycle" else 0.3
        self.total = max(total_steps, 1)
        self.warmup = int(ratio * self.total)
        self.frozen_steps = depth * steps_per_epoch if cfg.gradual_unfreezing else 0
        self.unfreeze_steps = int(cfg.unfreeze_warmup * steps_per_epoch) if self.frozen_steps else 0

    def __call__(self, step: int) -> float:
        if step < self.frozen_steps:
            return 0.0
        ramp = min((step - self.frozen_steps + 1) / self.unfreeze_steps, 1.0) if self.unfreeze_steps else 1.0
        return ramp * self._schedule(step)

    def _schedule(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        start, end = (0.0, 0.0) if self.kind == "cosine" else (1 / 25, 1e-4)
        if step < self.warmup:
            return start + (1 - start) * (step + 1) / self.warmup
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _use_cuda_graphs(cfg: TrainConfig, accelerator: Accelerator) -> bool:
    """Whether training steps replay from CUDA graphs: ``cuda_graphs`` on, one CUDA process, a padded path."""
    if not cfg.cuda_graphs or accelerator.device.type != "cuda":
        return False
    reasons = []
    if accelerator.num_processes > 1:
        reasons.append("several processes (DDP)")
    if cfg.rnn_input == "packed":
        reasons.append("rnn_input packed (packed batches change shape every step; use auto, fused or padded)")
    if cfg.mixed_precision == "fp16":
        reasons.append("fp16 (its gradient scaler syncs with the host; use bf16)")
    if reasons and accelerator.is_main_process:
        logger.info("CUDA graphs off: %s", "; ".join(reasons))
    return not reasons


def _plan_memory(
    cfg: TrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: DataLoader,
    data: PreparedData,
    use_graphs: bool,
    first_epoch: int,
) -> StepPlan:
    """Choose, before training, how this run's steps fit on the GPU (:func:`sentiment.memory.plan_steps`): every
    training batch shape of the epochs still to run, the largest evaluation batch; logged on the main process.
    Trials run on the unwrapped model (no collective, so several processes need not agree on them)."""
    sampler = train_loader.batch_sampler
    fixed_rows = train_loader.collate_fn.fixed_rows
    shapes = set()
    for epoch in range(first_epoch, cfg.epochs):
        for batch in sampler.global_batches(epoch):
            longest = int(sampler.lengths[batch].max())
            shapes.add((fixed_rows, bucket_length(longest)) if fixed_rows else (len(batch), longest))
    evaluated = [data.splits[name] for name in ("validation", "test") if len(data.splits[name])]
    eval_shape = max(
        ((min(cfg.eval_batch_size, len(split)), int(split.lengths.max())) for split in evaluated), key=tokens
    )
    started = time.perf_counter()
    plan = plan_steps(
        accelerator.unwrap_model(model), optimizer.optimizer, shapes, eval_shape, graphs=use_graphs,
        max_grad_norm=cfg.max_grad_norm, pad_id=data.info["pad_id"],
    )  # fmt: skip
    plan.seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        logger.info("%s (%.1f s)", plan.describe(), plan.seconds)
    return plan


def train(cfg: TrainConfig, on_epoch_end: EpochCallback | None = None) -> dict[str, Any]:
    """Train ``cfg`` end to end and return the final metrics (also written to ``output_dir/metrics.json``).

    ``on_epoch_end(epoch, record)`` is called on every process after each epoch's validation (a sweep's pruner
    reads ``record["valid_acc"]`` there); an exception it raises stops the run, after the trackers are closed.
    ``mixed_precision`` null takes the launcher's choice (``accelerate launch --mixed_precision``), and the run's
    config.yaml records the one that ran.
    """
    cfg = cfg.resolve_mixed_precision()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with="wandb" if cfg.report_to == "wandb" else None,
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)],  # CUDA graphs must not keep autocast's weight copies
    )
    try:
        return _train(accelerator, cfg, on_epoch_end)
    finally:
        finish(accelerator)


def finish(accelerator: Accelerator) -> None:
    """Close the trackers and the process group, free the prepared model and optimizer, forget the settings.

    Under several processes the model and optimizer go now, not in the interpreter's final garbage collection: the
    process group a DDP-wrapped model holds keeps worker threads that, still alive at exit, abort the process when
    they release a finished collective's tensors after Python has begun to shut down (1 two-process CPU run in 10
    did). Accelerate keeps its settings (mixed precision, ...) in a process-wide singleton; they are forgotten so
    the next run in this process (a notebook, a test, a sweep worker) can choose its own.
    """
    accelerator.end_training()
    if accelerator.num_processes > 1:
        accelerator.free_memory()  # drops Accelerate's references (its own collection runs before that)
        gc.collect()
    if torch.cuda.is_available():  # a sweep worker's next trial, or another process, gets the memory
        torch.cuda.empty_cache()
    AcceleratorState._reset_state()


def _train(accelerator: Accelerator, cfg: TrainConfig, on_epoch_end: EpochCallback | None) -> dict[str, Any]:
    if cfg.push_to_hub:
        require_push_access(str(cfg.hub_model_id))  # fail now (every process: no request made), not after training
    names = [cfg.output_dir or str(Path("runs") / (cfg.run_name or _default_run_name(cfg)))]
    broadcast_object_list(names)
    output_dir = Path(names[0])
    _check_output_dir(cfg, output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cfg.overwrite and output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)

    with accelerator.main_process_first():
        data = PreparedData.load(cfg.prepared) if cfg.prepared else prepare_data(cfg)
    resolved, embeddings = data.resolve(dataclasses.replace(cfg, output_dir=str(output_dir)))
    if cfg.resume:  # before anything is written: config.yaml then records what this run does
        _check_resume(accelerator, resolved, output_dir)
    if accelerator.is_main_process:
        with _saving(output_dir, output_dir / "config.yaml"):
            resolved.save(output_dir / "config.yaml")
        logger.info(
            "data: %s; vocabulary %d; GloVe coverage %s",
            data.info["sizes"],
            data.info["vocab_size"],
            f"{100 * data.info['vectors_coverage']:.1f}%"
            if embeddings is not None and "vectors_coverage" in data.info
            else "n/a (random embedding)",
        )

    set_seed(cfg.seed)
    model = LSTMClassifier(
        vocab_size=data.tokenizer.get_vocab_size(),
        embedding_dim=resolved.embedding_dim,
        hidden_dim=cfg.hidden_dim,
        n_layers=cfg.n_layers,
        bidirectional=cfg.bidirectional,
        dropout=cfg.dropout,
        pad_id=data.info["pad_id"],
        freeze_embeddings=cfg.freeze_embeddings,
        lowercase=resolved.lowercase,
        max_length=resolved.max_length,
        rnn_input=cfg.rnn_input,
        pooling=cfg.pooling,
        embedding_dropout=cfg.embedding_dropout,
        weight_dropout=cfg.weight_dropout,
        truncate_bptt=cfg.truncate_bptt,
        reverse=cfg.reverse,
    )
    if embeddings is not None:
        model.load_embeddings(torch.from_numpy(embeddings))
    if cfg.init_from:
        from sentiment.pretrain import init_from_language_model

        init_from_language_model(model, cfg.init_from, data)
        if accelerator.is_main_process:
            logger.info("embedding and LSTM weights from the language model %s", cfg.init_from)
    use_graphs = _use_cuda_graphs(cfg, accelerator)
    optimizer = build_optimizer(cfg, model, use_graphs, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)

    shard = {"num_replicas": accelerator.num_processes, "rank": accelerator.process_index}
    pad_id = data.info["pad_id"]
    fixed_shapes = accelerator.device.type == "cuda" and cfg.rnn_input != "packed"  # a few shapes, reused memory
    train_loader = make_dataloader(
        data.splits["train"], cfg.batch_size, pad_id, train=True, seed=cfg.seed, fixed_shapes=fixed_shapes, **shard
    )
    valid_loader = make_dataloader(data.splits["validation"], cfg.eval_batch_size, pad_id, train=False, **shard)
    test_loader = make_dataloader(data.splits["test"], cfg.eval_batch_size, pad_id, train=False, **shard)
    scheduler = None
    if cfg.lr_schedule != "constant" or cfg.gradual_unfreezing:
        steps_per_epoch = len(train_loader.batch_sampler.global_batches()) // accelerator.num_processes
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer.optimizer, lr_factors(cfg, optimizer.optimizer, steps_per_epoch)
        )
        accelerator.register_for_checkpointing(scheduler)  # saved with the state, restored by --resume

    stop = StopSignal()
    state: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "partial_totals": None,
        "history": [],
        "best_valid_acc": -1.0,
        "best_epoch": None,
        "wandb_run_id": None,
    }
    if cfg.resume:
        state_dir = _existing_dir(output_dir / "state")
        state = _load_saved_state(accelerator, state_dir)
        logger.info("resumed from %s after epoch %d", state_dir, state["epoch"])
        for group in optimizer.param_groups:  # a scheduled lr for graphs is a tensor: keep it on the device
            if torch.is_tensor(group["lr"]):
                group["lr"] = group["lr"].to(accelerator.device)
        if scheduler is not None:  # restored with the saved run's total of steps: follow this run's epochs
            factors = lr_factors(cfg, optimizer.optimizer, steps_per_epoch)
            _rebuild_schedule(scheduler, factors, cfg.epochs, log=accelerator.is_main_process)
        _resume_early_stop(state, cfg, log=accelerator.is_main_process)
    plan = None  # on a GPU, chosen after a resume has loaded the optimizer's state: graphs hold its tensors
    if accelerator.device.type == "cuda":
        plan = _plan_memory(cfg, accelerator, model, optimizer, train_loader, data, use_graphs, state["epoch"])
    graph_step = plan.graph_step if plan is not None else None
    if cfg.report_to == "wandb":
        if accelerator.is_main_process and state["wandb_run_id"] is None:
            alphabet = string.ascii_lowercase + string.digits
            state["wandb_run_id"] = os.environ.get("WANDB_RUN_ID") or "".join(
                secrets.choice(alphabet) for _ in range(8)
            )
        init_kwargs = _setup_wandb(cfg, output_dir, state["wandb_run_id"]) if accelerator.is_main_process else {}
        accelerator.init_trackers(cfg.project, config=resolved.to_dict(), init_kwargs={"wandb": init_kwargs})

    def after_step(steps_done: int, totals: torch.Tensor) -> None:
        """Save state every ``save_steps`` steps, and on SIGINT/SIGTERM save it and stop."""
        stopping = stop.requested
        if accelerator.num_processes > 1:  # every process must agree to save (a collective) and stop
            stopping = bool(accelerator.reduce(torch.tensor(float(stopping), device=accelerator.device), "sum").item())
        if stopping or (cfg.save_steps and steps_done % cfg.save_steps == 0):
            summed = accelerator.reduce(totals.clone(), reduction="sum")
            state.update(step=steps_done, partial_totals=summed.tolist())
            _save_state(accelerator, state, output_dir)
        if stopping:
            raise TrainingStopped(output_dir, state["epoch"], steps_done)

    eval_tokens = plan.eval_tokens if plan is not None else None
    with stop:  # SIGINT/SIGTERM: save after the current step and stop (checked after each step)
        last_epoch = state["epoch"] if state.get("stopped_early") else cfg.epochs  # stopped early: nothing left
        for epoch in range(state["epoch"], last_epoch):
            started = time.perf_counter()
            train_figures = train_epoch(
                model, optimizer, train_loader, accelerator, epoch, cfg,
                start_step=state.get("step", 0), partial_totals=state.get("partial_totals"), after_step=after_step,
                graph_step=graph_step, scheduler=scheduler, chunk_tokens=plan.chunk_tokens if plan else None,
            )  # fmt: skip
            state.update(step=0, partial_totals=None)
            train_seconds = time.perf_counter() - started
            if train_figures["nonfinite_steps"]:
                state["nonfinite_steps"] = state.get("nonfinite_steps", 0) + train_figures["nonfinite_steps"]
                if accelerator.is_main_process:
                    logger.warning(
                        "epoch %d: %d steps had non-finite gradients (overflow); they were set to zero",
                        epoch + 1,
                        train_figures["nonfinite_steps"],
                    )
            valid = evaluate(accelerator.unwrap_model(model), valid_loader, accelerator, max_tokens=eval_tokens)
            if graph_step is not None:  # training replays graphs from their own pool: the eager cache is idle
                torch.cuda.empty_cache()  # until the next validation, and other processes on the GPU may need it
            record = {
                "epoch": epoch + 1,
                "train_loss": train_figures["loss"],
                "train_acc": train_figures["acc"],
                "valid_loss": valid["loss"],
                "valid_acc": valid["acc"],
                "epoch_seconds": train_seconds,
                "eval_seconds": time.perf_counter() - started - train_seconds,
            }
            state["history"].append(record)
            accelerator.log(record, step=epoch + 1)
            if accelerator.is_main_process:
                logger.info(
                    "epoch %d: %s",
                    epoch + 1,
                    ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"),
                )
            if record["valid_acc"] > state["best_valid_acc"]:
                state.update(best_valid_acc=record["valid_acc"], best_epoch=epoch + 1)
                if accelerator.is_main_process:
                    save_best(accelerator.unwrap_model(model), data, output_dir)
            state["epoch"] = epoch + 1
            patience = cfg.early_stopping_patience
            if patience is not None and epoch + 1 - state["best_epoch"] >= patience and epoch + 1 < cfg.epochs:
                state["stopped_early"] = True
                if accelerator.is_main_process:
                    logger.info("early stop: no better validation accuracy for %d epochs", patience)
            _save_state(accelerator, state, output_dir)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            if state.get("stopped_early"):
                break

    accelerator.wait_for_everyone()
    graph_figures = None
    if graph_step is not None:  # training is over: give the graphs' memory back before testing
        graph_figures = {"shapes": len(graph_step.graphs), "capture_seconds": graph_step.capture_seconds}
        graph_step.close()
    unwrapped = accelerator.unwrap_model(model)
    # Only the main process wrote best/ (other hosts may have their own disks): it reads and sends the weights.
    best_dir = _existing_dir(output_dir / "best") if accelerator.is_main_process else None
    load_best_weights(unwrapped, best_dir / "model.safetensors" if best_dir is not None else None)
    test = evaluate(unwrapped, test_loader, accelerator, keep_logits=True, max_tokens=eval_tokens)
    valid_logits = evaluate(unwrapped, valid_loader, accelerator, keep_logits=True, max_tokens=eval_tokens)["logits"]
    best = state["history"][state["best_epoch"] - 1]
    metrics = {
        "best_epoch": state["best_epoch"],
        "train_loss": best["train_loss"],
        "train_acc": best["train_acc"],
        "valid_loss": best["valid_loss"],
        "valid_acc": best["valid_acc"],
        "test_loss": test["loss"],
        "test_acc": test["acc"],
        "sizes": {
            "train": len(data.splits["train"]),
            "validation": len(data.splits["validation"]),
            "test": test["count"],
        },
        "epoch_seconds_mean": sum(h["epoch_seconds"] for h in state["history"]) / len(state["history"]),
        "num_processes": accelerator.num_processes,
        "nonfinite_steps": state.get("nonfinite_steps", 0),
        "cuda_graphs": graph_figures,
        "memory": None
        if plan is None
        else {
            "plan": plan.mode,
            "chunk_tokens": plan.chunk_tokens,
            "eval_tokens": plan.eval_tokens,
            "plan_seconds": plan.seconds,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(accelerator.device) / GiB,
            "device": torch.cuda.get_device_name(accelerator.device),
        },
        "history": state["history"],
    }
    accelerator.log({"test_loss": test["loss"], "test_acc": test["acc"], "best_valid_acc": best["valid_acc"]})
    if accelerator.is_main_process:
        if cfg.report_to == "wandb":
            # The run's summary (what a W&B sweep ranks runs by) holds the selected epoch's figures, not the last's.
            summary = {key: metrics[key] for key in ("train_loss", "train_acc", "valid_loss", "valid_acc")}
            accelerator.get_tracker("wandb", unwrap=True).summary.update(
                {**summary, "best_epoch": state["best_epoch"], "test_loss": test["loss"], "test_acc": test["acc"]}
            )
        with _saving(output_dir, output_dir):
            # The selected model's logit for every review, for scripts/ensemble.py (several seeds or directions).
            for split, logits in (("validation", valid_logits), ("test", test["logits"])):
                write_logits(output_dir / f"{split}-logits.npz", logits, data.splits[split].labels)
            write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2))
            plot_curves(state["history"], output_dir / "curves.png")
            write_model_card(output_dir / "best", output_dir, repo_id=cfg.hub_model_id)
        logger.info(
            "best epoch %d: valid_acc %.4f; test_loss %.4f, test_acc %.4f -> %s",
            state["best_epoch"],
            best["valid_acc"],
            test["loss"],
            test["acc"],
            output_dir,
        )
        if cfg.push_to_hub:
            push_checkpoint(output_dir / "best", str(cfg.hub_model_id), private=cfg.hub_private)
    return metrics


def save_best(model: torch.nn.Module, data: PreparedData, output_dir: Path, model_card: bool = True) -> None:
    """Write ``output_dir/best`` (weights, config.json, tokenizer.json and, with ``model_card``, README.md) through
    a temporary folder; a full disk leaves the previous ``best/`` in place (``SaveError``)."""
    tmp = output_dir / ".best.tmp"
    with _saving(output_dir, output_dir / "best"):
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        data.tokenizer.save(str(tmp / "tokenizer.json"))
        replace_dir(tmp, output_dir / "best")
        if model_card:
            write_model_card(output_dir / "best", output_dir, results=False)


def _save_state(accelerator: Accelerator, state: dict[str, Any], output_dir: Path) -> None:
    tmp = output_dir / ".state.tmp"
    # A process that fails raises without reaching the next wait_for_everyone: the launcher then ends the others.
    with _saving(output_dir, output_dir / "state", clean_up=accelerator.is_main_process):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            replace_dir(tmp, output_dir / "state")
        accelerator.wait_for_everyone()


def _load_saved_state(accelerator: Accelerator, state_dir: Path) -> dict[str, Any]:
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
