"""The optimizer and its learning-rate schedule: parameter groups by depth, Adam/AdamW (capturable for
CUDA graphs), and warm-up + cosine, one-cycle and gradual unfreezing from ``torch.optim.lr_scheduler``."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from sentiment.config import TrainConfig

logger = logging.getLogger(__name__)


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


def build_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRSchedule | None:
    """The learning-rate schedule of a run of ``cfg.epochs`` epochs of ``steps_per_epoch`` optimizer steps, to step
    after every optimizer step; None when no rate ever changes (``constant`` without ``gradual_unfreezing``).

    Each parameter group's rate is its starting rate (``lr`` x ``lr_layer_decay ** depth``) times one factor per step.
    ``cosine``: the factor rises linearly over the first ``warmup_ratio`` of the steps (w steps: 1/w at the first,
    1 at the last), then falls along a cosine to 0 at the end. ``onecycle``: one-cycle without the momentum cycle
    (which CUDA graphs would not see): it rises linearly from 1/25 over the first ``warmup_ratio`` of the steps (0.3
    when 0), 1 at the last of them, then falls along a cosine to 1/10,000 at the end. ``constant``: 1.
    ``gradual_unfreezing``: a group of ``depth`` d (``parameter_groups``) has rate 0 for its first d epochs."""
    if cfg.lr_schedule == "constant" and not cfg.gradual_unfreezing:
        return None
    depths = [group.get("depth", 0) if cfg.gradual_unfreezing else 0 for group in optimizer.param_groups]
    return LRSchedule(optimizer, cfg, max(cfg.epochs * steps_per_epoch, 1), [d * steps_per_epoch for d in depths])


def resume_schedule(scheduler: LRSchedule, cfg: TrainConfig, steps_per_epoch: int, log: bool) -> None:
    """After ``--resume``: the restored ``scheduler`` follows the saved run, whose total of steps (``total_steps``)
    was that of its epochs. When this run's ``cfg.epochs`` make another total, the schedule is rebuilt for it at the
    step reached, and each group's rate becomes the one a run of the new length has there (its warm-up a share of the
    new total): from there on the rate follows the new schedule."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    if scheduler.total_steps == total:
        return
    step, was_total, was = scheduler.last_epoch, scheduler.total_steps, scheduler.get_lr()[0]
    fresh = build_schedule(cfg, scheduler.optimizer, steps_per_epoch)
    for _ in range(step if fresh.factor_schedule is not None else 0):
        fresh.factor_schedule.step()
    fresh.last_epoch = step
    scheduler.load_state_dict(fresh.state_dict())
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr(), strict=True):
        if torch.is_tensor(group["lr"]):  # CUDA graphs read the rate from this tensor
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    if log:
        logger.info(
            "lr schedule rebuilt for %d epochs: %d steps in all (was %d); from step %d the lr is %.4g (was %.4g)",
            cfg.epochs, total, was_total, step, scheduler.get_lr()[0], was,
        )  # fmt: skip


class LRSchedule(LRScheduler):
    """Sets each parameter group's rate, after every optimizer step, to its starting rate times the factor of
    ``factor_schedule``, or to 0 while the group is frozen (its first ``frozen_steps``): see ``build_schedule``.

    The factor comes from torch's schedulers (``LinearLR`` then ``CosineAnnealingLR``, in a ``SequentialLR``), run
    on a stand-in optimizer whose one rate is the factor (``factor``). This class is written by hand because torch
    has no scheduler that holds some groups at 0 for a while, and its chainable schedulers compute each rate from
    the group's last one, which a 0 would keep at 0; and because a CUDA-graphed optimizer's rates are device tensors
    that must be updated in place, which ``LRScheduler`` does (``fill_``) but ``SequentialLR`` did not before torch
    2.10 (it replaced them with ``initial_lr``, pytorch#162359). One factor for all groups also makes one-cycle's end
    1/10,000 of each group's own rate (``CosineAnnealingLR``'s floor is one rate for all groups)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, frozen_steps: list[int]):
        self.total_steps = total_steps
        self.frozen_steps = frozen_steps
        # the starting rates as floats (a resumed run's optimizer holds the rates reached, and these in initial_lr)
        self.start_lrs = [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
        self.factor = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self.factor_schedule = _factor_schedule(cfg, total_steps, self.factor)
        self.factor.step()  # no gradients, no change: torch warns when a scheduler steps before its optimizer has
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        """Each group's rate at step ``last_epoch``."""
        factor = self.factor.param_groups[0]["lr"]
        return [
            0.0 if self.last_epoch < frozen else start * factor
            for start, frozen in zip(self.start_lrs, self.frozen_steps, strict=True)
        ]

    def step(self) -> None:  # type: ignore[override]
        """One optimizer step done: the factor's schedule steps (not in ``__init__``'s first call), then each group's
        rate is set, in place when it is a tensor (``LRScheduler.step``)."""
        if self._step_count > 0 and self.factor_schedule is not None:
            self.factor_schedule.step()
        super().step()

    def state_dict(self) -> dict[str, Any]:
        """The step reached and the factor's schedule: plain numbers (no optimizer, no function)."""
        state = {key: value for key, value in vars(self).items() if key not in ("optimizer", "factor_schedule")}
        state["factor"] = self.factor.param_groups[0]["lr"]
        state["factor_schedule"] = self.factor_schedule.state_dict() if self.factor_schedule is not None else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict``."""
        state = dict(state_dict)
        self.factor.param_groups[0]["lr"] = state.pop("factor")
        schedule = state.pop("factor_schedule")
        self.__dict__.update(state)
        if self.factor_schedule is not None:
            self.factor_schedule.load_state_dict(schedule)


def _factor_schedule(cfg: TrainConfig, total: int, factor: torch.optim.Optimizer) -> LRScheduler | None:
    """``cfg.lr_schedule``'s factor over ``total`` steps from torch's schedulers, on ``factor`` (rate 1)."""
    if cfg.lr_schedule == "constant":
        return None
    onecycle = cfg.lr_schedule == "onecycle"
    warmup = int((cfg.warmup_ratio or (0.3 if onecycle else 0.0)) * total)
    start, end = (1 / 25, 1e-4) if onecycle else (0.0, 0.0)
    fall = CosineAnnealingLR(factor, T_max=total - warmup, eta_min=end)
    if warmup == 0:
        return fall
    # from start (before the first step) to 1 at the warm-up's last step, then the fall from 1 at the next
    rise = LinearLR(factor, start_factor=min(start + (1 - start) / warmup, 1.0), total_iters=max(warmup - 1, 1))
    return SequentialLR(factor, [rise, fall], milestones=[warmup])
