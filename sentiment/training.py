"""The Accelerate training loop: train, evaluate, gather metrics, log to trackers, keep the best checkpoint,
save state each epoch for ``--resume``, evaluate the best model on test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import AutocastKwargs, broadcast_object_list, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sentiment.batching import bucket_length, make_dataloader
from sentiment.checkpoint import (
    check_output_dir,
    check_resume,
    default_run_name,
    existing_dir,
    load_best_weights,
    load_state,
    resume_early_stop,
    save_best,
    save_state,
    saving,
)
from sentiment.config import TrainConfig
from sentiment.files import write_atomic
from sentiment.graphs import GraphedTrainStep, tokens, train_step
from sentiment.hub import push_checkpoint, require_push_access, write_model_card
from sentiment.lm import init_from_language_model
from sentiment.memory import GiB, StepPlan, plan_steps, use_expandable_segments
from sentiment.model import LSTMClassifier
from sentiment.optim import build_optimizer, build_schedule, resume_schedule
from sentiment.predict import write_logits
from sentiment.prepare import PreparedData, prepare_data
from sentiment.tracking import plot_curves, start_wandb

logger = logging.getLogger(__name__)


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
        max_grad_norm=cfg.max_grad_norm, pad_id=data.info["pad_id"], max_step_tokens=cfg.max_step_tokens,
        max_eval_tokens=cfg.max_eval_tokens,
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
    use_expandable_segments()  # before the first CUDA allocation
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
    output_dir, data, resolved, embeddings = _open_run(accelerator, cfg)
    set_seed(cfg.seed)
    model = build_model(cfg, resolved, data, embeddings, log=accelerator.is_main_process)
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
    steps_per_epoch = len(train_loader.batch_sampler.global_batches()) // accelerator.num_processes
    scheduler = build_schedule(cfg, optimizer.optimizer, steps_per_epoch)
    if scheduler is not None:
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
        state_dir = existing_dir(output_dir / "state")
        state = load_state(accelerator, state_dir)
        logger.info("resumed from %s after epoch %d", state_dir, state["epoch"])
        for group in optimizer.param_groups:  # a scheduled lr for graphs is a tensor: keep it on the device
            if torch.is_tensor(group["lr"]):
                group["lr"] = group["lr"].to(accelerator.device)
        if scheduler is not None:  # restored with the saved run's total of steps: follow this run's epochs
            resume_schedule(scheduler, cfg, steps_per_epoch, log=accelerator.is_main_process)
        resume_early_stop(state, cfg, log=accelerator.is_main_process)
    plan = None  # on a GPU, chosen after a resume has loaded the optimizer's state: graphs hold its tensors
    if accelerator.device.type == "cuda":
        plan = _plan_memory(cfg, accelerator, model, optimizer, train_loader, data, use_graphs, state["epoch"])
    graph_step = plan.graph_step if plan is not None else None
    if cfg.report_to == "wandb":
        start_wandb(accelerator, cfg, resolved.to_dict(), output_dir, state)

    def after_step(steps_done: int, totals: torch.Tensor) -> None:
        """Save state every ``save_steps`` steps, and on SIGINT/SIGTERM save it and stop."""
        if stop.requested:
            accelerator.set_trigger()
        # Any process's signal stops all (they save together: a collective). One process asks no other (and does
        # not wait for the GPU each step, which check_trigger's all-reduce would).
        stopping = accelerator.check_trigger() if accelerator.num_processes > 1 else stop.requested
        if stopping or (cfg.save_steps and steps_done % cfg.save_steps == 0):
            summed = accelerator.reduce(totals.clone(), reduction="sum")
            state.update(step=steps_done, partial_totals=summed.tolist())
            save_state(accelerator, state, output_dir)
        if stopping:
            raise TrainingStopped(output_dir, state["epoch"], steps_done)

    eval_tokens = plan.eval_tokens if plan is not None else cfg.max_eval_tokens
    chunk_tokens = plan.chunk_tokens if plan is not None else cfg.max_step_tokens
    with stop:  # SIGINT/SIGTERM: save after the current step and stop (checked after each step)
        last_epoch = state["epoch"] if state.get("stopped_early") else cfg.epochs  # stopped early: nothing left
        for epoch in range(state["epoch"], last_epoch):
            started = time.perf_counter()
            train_figures = train_epoch(
                model, optimizer, train_loader, accelerator, epoch, cfg,
                start_step=state.get("step", 0), partial_totals=state.get("partial_totals"), after_step=after_step,
                graph_step=graph_step, scheduler=scheduler, chunk_tokens=chunk_tokens,
            )  # fmt: skip
            state.update(step=0, partial_totals=None)
            train_seconds = time.perf_counter() - started
            # Under graphs, validation allocates from the graphs' pool, whose memory is idle between replays.
            with graph_step.sharing_pool() if graph_step is not None else contextlib.nullcontext():
                valid = evaluate(accelerator.unwrap_model(model), valid_loader, accelerator, max_tokens=eval_tokens)
            record = {
                "epoch": epoch + 1,
                "train_loss": train_figures["loss"],
                "train_acc": train_figures["acc"],
                "valid_loss": valid["loss"],
                "valid_acc": valid["acc"],
                "epoch_seconds": train_seconds,
                "eval_seconds": time.perf_counter() - started - train_seconds,
            }
            _end_epoch(accelerator, cfg, state, record, train_figures["nonfinite_steps"], model, data, output_dir)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            if state.get("stopped_early"):
                break

    accelerator.wait_for_everyone()
    graph_figures = None
    if graph_step is not None:  # training is over: give the graphs' memory back before testing
        graph_figures = {"shapes": len(graph_step.graphs), "capture_seconds": graph_step.capture_seconds}
        graph_step.close()
        graph_figures["reserved_after_close_gib"] = torch.cuda.memory_reserved(accelerator.device) / GiB
    unwrapped = accelerator.unwrap_model(model)
    # Only the main process wrote best/ (other hosts may have their own disks): it reads and sends the weights.
    best_dir = existing_dir(output_dir / "best") if accelerator.is_main_process else None
    load_best_weights(unwrapped, best_dir / "model.safetensors" if best_dir is not None else None)
    test = evaluate(unwrapped, test_loader, accelerator, keep_logits=True, max_tokens=eval_tokens)
    valid_logits = evaluate(unwrapped, valid_loader, accelerator, keep_logits=True, max_tokens=eval_tokens)["logits"]
    metrics = _metrics(accelerator, state, test, data, graph_figures, plan)
    _report(accelerator, cfg, metrics, state, data, output_dir, {"validation": valid_logits, "test": test["logits"]})
    return metrics


def _open_run(accelerator: Accelerator, cfg: TrainConfig) -> tuple[Path, PreparedData, TrainConfig, np.ndarray | None]:
    """The run folder (named, checked, created; a resume checked against it), the data, the resolved config (saved
    as config.yaml) and the embedding matrix to start from."""
    if cfg.push_to_hub:
        require_push_access(str(cfg.hub_model_id))  # fail now (every process: no request made), not after training
    names = [cfg.output_dir or str(Path("runs") / (cfg.run_name or default_run_name(cfg)))]
    broadcast_object_list(names)
    output_dir = Path(names[0])
    check_output_dir(cfg, output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cfg.overwrite and output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)

    with accelerator.main_process_first():
        data = PreparedData.load(cfg.prepared) if cfg.prepared else prepare_data(cfg)
    resolved, embeddings = data.resolve(dataclasses.replace(cfg, output_dir=str(output_dir)))
    if cfg.resume:  # before anything is written: config.yaml then records what this run does
        check_resume(accelerator, resolved, output_dir)
    if accelerator.is_main_process:
        with saving(output_dir, output_dir / "config.yaml"):
            resolved.save(output_dir / "config.yaml")
        logger.info(
            "data: %s; vocabulary %d; GloVe coverage %s",
            data.info["sizes"],
            data.info["vocab_size"],
            f"{100 * data.info['vectors_coverage']:.1f}%"
            if embeddings is not None and "vectors_coverage" in data.info
            else "n/a (random embedding)",
        )
    return output_dir, data, resolved, embeddings


def build_model(
    cfg: TrainConfig, resolved: TrainConfig, data: PreparedData, embeddings: np.ndarray | None, log: bool = False
) -> LSTMClassifier:
    """The classifier of ``cfg`` for ``data`` (``resolved``: the config with the data's settings), its embedding
    started from ``embeddings`` or, with ``init_from``, from a language model."""
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
        init_from_language_model(model, cfg.init_from, data)
        if log:
            logger.info("embedding and LSTM weights from the language model %s", cfg.init_from)
    return model


def _end_epoch(
    accelerator: Accelerator,
    cfg: TrainConfig,
    state: dict[str, Any],
    record: dict[str, float],
    nonfinite_steps: int,
    model: torch.nn.Module,
    data: PreparedData,
    output_dir: Path,
) -> None:
    """After an epoch's validation: count its overflowed steps, log and track ``record``, keep the best model,
    decide an early stop, save the state."""
    epoch = record["epoch"]
    if nonfinite_steps:
        state["nonfinite_steps"] = state.get("nonfinite_steps", 0) + nonfinite_steps
        if accelerator.is_main_process:
            logger.warning(
                "epoch %d: %d steps had non-finite gradients (overflow); they were set to zero", epoch, nonfinite_steps
            )
    state["history"].append(record)
    accelerator.log(record, step=epoch)
    if accelerator.is_main_process:
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"))
    if record["valid_acc"] > state["best_valid_acc"]:
        state.update(best_valid_acc=record["valid_acc"], best_epoch=epoch)
        if accelerator.is_main_process:
            save_best(accelerator.unwrap_model(model), data, output_dir)
    state["epoch"] = epoch
    patience = cfg.early_stopping_patience
    if patience is not None and epoch - state["best_epoch"] >= patience and epoch < cfg.epochs:
        state["stopped_early"] = True
        if accelerator.is_main_process:
            logger.info("early stop: no better validation accuracy for %d epochs", patience)
    save_state(accelerator, state, output_dir)


def _metrics(
    accelerator: Accelerator,
    state: dict[str, Any],
    test: dict[str, Any],
    data: PreparedData,
    graph_figures: dict[str, Any] | None,
    plan: StepPlan | None,
) -> dict[str, Any]:
    """The run's metrics.json: the selected epoch's figures, the test figures, sizes, timing, memory, history."""
    best = state["history"][state["best_epoch"] - 1]
    # every process's own GPU, in process order (a collective: every process builds these metrics)
    peaks = None if plan is None else gather_object([torch.cuda.max_memory_reserved(accelerator.device) / GiB])
    return {
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
            "plan_reserved_gib": plan.reserved_gib,
            "peak_reserved_gib": peaks[accelerator.process_index],
            "peak_reserved_gib_per_process": peaks,
            "device": torch.cuda.get_device_name(accelerator.device),
        },
        "history": state["history"],
    }


def _report(
    accelerator: Accelerator,
    cfg: TrainConfig,
    metrics: dict[str, Any],
    state: dict[str, Any],
    data: PreparedData,
    output_dir: Path,
    logits: dict[str, np.ndarray],
) -> None:
    """Track the test figures; on the main process write the logits, metrics.json, curves and model card, log the
    result and push the checkpoint when asked."""
    accelerator.log(
        {"test_loss": metrics["test_loss"], "test_acc": metrics["test_acc"], "best_valid_acc": metrics["valid_acc"]}
    )
    if not accelerator.is_main_process:
        return
    if cfg.report_to == "wandb":
        # The run's summary (what a W&B sweep ranks runs by) holds the selected epoch's figures, not the last's.
        keys = ("train_loss", "train_acc", "valid_loss", "valid_acc", "best_epoch", "test_loss", "test_acc")
        accelerator.get_tracker("wandb", unwrap=True).summary.update({key: metrics[key] for key in keys})
    with saving(output_dir, output_dir):
        # The selected model's logit for every review, for scripts/ensemble.py (several seeds or directions).
        for split, split_logits in logits.items():
            write_logits(output_dir / f"{split}-logits.npz", split_logits, data.splits[split].labels)
        write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2))
        plot_curves(state["history"], output_dir / "curves.png")
        write_model_card(output_dir / "best", output_dir, repo_id=cfg.hub_model_id)
    logger.info(
        "best epoch %d: valid_acc %.4f; test_loss %.4f, test_acc %.4f -> %s",
        metrics["best_epoch"],
        metrics["valid_acc"],
        metrics["test_loss"],
        metrics["test_acc"],
        output_dir,
    )
    if cfg.push_to_hub:
        push_checkpoint(output_dir / "best", str(cfg.hub_model_id), private=cfg.hub_private)
