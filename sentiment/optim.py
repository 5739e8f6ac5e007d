"""The optimizer and its learning-rate schedule: parameter groups by depth, Adam/AdamW (capturable for
CUDA graphs), the per-step factor of warm-up + cosine, one-cycle and gradual unfreezing."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch

from sentiment.config import TrainConfig

logger = logging.getLogger(__name__)


def lr_factors(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> list[LRFactor]:
    """One ``LRFactor`` per parameter group of ``optimizer`` (by its ``depth``), over ``cfg.epochs`` epochs of
    ``steps_per_epoch`` optimizer steps: the ``LambdaLR`` of a run."""
    total = cfg.epochs * steps_per_epoch
    return [LRFactor(cfg, total, steps_per_epoch, group["depth"]) for group in optimizer.param_groups]


def rebuild_schedule(
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
