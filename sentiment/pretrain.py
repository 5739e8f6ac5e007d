"""Language-model pretraining: the classifier's embedding + LSTM encoder trained to predict the next word on the
training and unlabelled reviews, to start the classifier from (``init_from``).

The reviews (train + ``unsupervised``, encoded with the classifier's vocabulary) are laid end to end and cut
into ``batch_size`` parallel streams; each step reads ``bptt`` tokens of every stream, carrying the LSTM state
from one window to the next (truncated backpropagation through time). The output layer is the embedding
matrix itself (tied weights) after a projection to the embedding size. Validation perplexity is measured on the
classifier's validation reviews; the best epoch is saved to ``output_dir/best`` with ``tokenizer.json``.
``lr_schedule`` (cosine, onecycle; constant by default) runs over all windows of all epochs, as the classifier's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from sentiment.checkpoint import save_best
from sentiment.config import ConfigError, TrainConfig
from sentiment.files import write_atomic
from sentiment.lm import LSTMLanguageModel
from sentiment.optim import build_schedule
from sentiment.prepare import PreparedData, prepare_data
from sentiment.tracking import plot_curves
from sentiment.training import finish

logger = logging.getLogger(__name__)


def token_streams(splits: list[Any], streams: int, reverse: bool = False) -> torch.Tensor:
    """The reviews of ``splits`` (EncodedSplit) end to end, cut into ``streams`` rows of equal length; with
    ``reverse`` the whole text backwards (each review read last token first, the reviews in reverse order)."""
    ids = np.concatenate([split.token_ids for split in splits])
    if reverse:
        ids = ids[::-1]
    length = len(ids) // streams
    if length < 2:
        raise ConfigError(f"{len(ids)} tokens cannot fill {streams} streams of 2 or more; lower batch_size")
    return torch.from_numpy(ids[: length * streams].reshape(streams, length).astype(np.int64))


def window_starts(stream: torch.Tensor, bptt: int) -> range:
    """Where each ``bptt``-token window of ``stream`` (rows x length) starts: one optimizer step each in training."""
    return range(0, stream.shape[1] - 1, bptt)


def run_stream(
    model: nn.Module,
    stream: torch.Tensor,
    bptt: int,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer | None = None,
    max_grad_norm: float | None = None,
    desc: str = "",
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[float, int]:
    """One pass over ``stream`` (rows x length) in windows of ``bptt``: training when ``optimizer`` is given (and
    ``scheduler`` steps after each optimizer step), else evaluation. Returns the mean next-word loss over all
    processes and the number of predicted tokens."""
    training = optimizer is not None
    model.train(training)
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    state = None
    starts = window_starts(stream, bptt)
    bar = tqdm(starts, desc=desc, disable=not accelerator.is_main_process, leave=False)
    with torch.set_grad_enabled(training):
        for start in bar:
            window = stream[:, start : start + bptt + 1].to(accelerator.device, non_blocking=True)
            inputs, targets = window[:, :-1], window[:, 1:]
            logits, state = model(inputs, state)
            state = tuple(s.detach() for s in state)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            if training:
                accelerator.backward(loss)
                if max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
            totals += torch.stack([loss.detach().double() * targets.numel(), totals.new_tensor(targets.numel())])
    totals = accelerator.reduce(totals, reduction="sum")
    return totals[0].item() / totals[1].item(), int(totals[1].item())


def pretrain(cfg: TrainConfig) -> dict[str, Any]:
    """Pretrain the language model of ``cfg`` (embedding and LSTM sizes, ``bptt``, epochs, lr, ...) and return
    its metrics (also in ``output_dir/metrics.json``): per-epoch train and validation loss and perplexity, and
    tokens per second."""
    cfg = cfg.resolve_mixed_precision()  # null: the launcher's choice; config.yaml records the one that ran
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    try:
        return _pretrain(accelerator, cfg)
    finally:
        finish(accelerator)


def _pretrain(accelerator: Accelerator, cfg: TrainConfig) -> dict[str, Any]:
    output_dir = Path(cfg.output_dir or Path("runs") / (cfg.run_name or "pretrain-lm"))
    if output_dir.exists() and any(output_dir.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"output_dir {output_dir} already holds files; pass --overwrite or another --output_dir")
    if accelerator.is_main_process:
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True)
    with accelerator.main_process_first():
        data = PreparedData.load(cfg.prepared) if cfg.prepared else prepare_data(cfg)
    if "unsupervised" not in data.splits:
        logger.warning("no unsupervised split in the data (with_unsupervised: false): pretraining on train only")
    resolved, embeddings = data.resolve(dataclasses.replace(cfg, output_dir=str(output_dir)))
    if accelerator.is_main_process:
        resolved.save(output_dir / "config.yaml")

    set_seed(cfg.seed)
    model = LSTMLanguageModel(
        vocab_size=data.tokenizer.get_vocab_size(),
        embedding_dim=resolved.embedding_dim,
        hidden_dim=cfg.hidden_dim,
        n_layers=cfg.n_layers,
        dropout=cfg.dropout,
        pad_id=data.info["pad_id"],
        weight_dropout=cfg.weight_dropout,
        reverse=cfg.reverse,
        rnn_input="persistent" if cfg.rnn_input == "persistent" else "auto",  # the others are review paths
    )
    if embeddings is not None:
        with torch.no_grad():
            model.embedding.weight.copy_(torch.from_numpy(embeddings))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)

    corpus = [data.splits["train"], *([data.splits["unsupervised"]] if "unsupervised" in data.splits else [])]
    streams = token_streams(corpus, cfg.batch_size * accelerator.num_processes, cfg.reverse)
    streams = streams[accelerator.process_index :: accelerator.num_processes]  # each process its own rows
    valid = token_streams([data.splits["validation"]], cfg.eval_batch_size * accelerator.num_processes, cfg.reverse)
    valid = valid[accelerator.process_index :: accelerator.num_processes]

    # the classifier's schedules, over all windows of all epochs (one parameter group, depth 0: none is frozen)
    scheduler = build_schedule(cfg, optimizer.optimizer, steps_per_epoch=len(window_starts(streams, cfg.bptt)))
    history: list[dict[str, float]] = []
    best_loss = math.inf
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        train_loss, tokens = run_stream(
            model, streams, cfg.bptt, accelerator, optimizer, cfg.max_grad_norm, f"epoch {epoch + 1}/{cfg.epochs}",
            scheduler,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        valid_loss, _ = run_stream(model, valid, cfg.bptt, accelerator, desc="validation")
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_perplexity": math.exp(train_loss),
            "valid_loss": valid_loss,
            "valid_perplexity": math.exp(valid_loss),
            "epoch_seconds": seconds,
            "tokens_per_second": tokens / seconds,
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(record)
        best = min(history, key=lambda h: h["valid_loss"])
        metrics = {
            "best_epoch": best["epoch"],
            "valid_loss": best["valid_loss"],
            "valid_perplexity": best["valid_perplexity"],
            "tokens_per_second": sum(h["tokens_per_second"] for h in history) / len(history),
            "train_tokens": int(sum(len(split.token_ids) for split in corpus)),
            "num_processes": accelerator.num_processes,
            "history": history,
        }
        if accelerator.is_main_process:
            logger.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"))
            if valid_loss < best_loss:
                best_loss = valid_loss
                save_best(accelerator.unwrap_model(model), data, output_dir, model_card=False)
            # Rewritten every epoch: a stopped run still says what it reached (best/ holds the best epoch).
            write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    if accelerator.is_main_process:
        panels = (("loss", "Loss (cross-entropy)"), ("perplexity", "Perplexity"))
        plot_curves(history, output_dir / "curves.png", panels)
    accelerator.wait_for_everyone()
    return metrics
