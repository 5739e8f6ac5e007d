"""What fits on this GPU: the trainer's choice, made before training, of how its steps run.

A training step's memory grows with the batch's tokens (rows x bucketed length), and the trainer knows every
batch of the run in advance (the sampler is seeded). So before the first step it tries, on the longest batch, the
fastest way that fits, and keeps it for the whole run:

1. ``graphs``: every batch shape captured as a CUDA graph, largest first, in one shared memory pool; if they do
   not fit, the same with batches split into groups of rows 2, 4 or 8 times smaller (``graphs, split``);
2. ``eager``: the same fixed-shape steps run one by one (no pool kept between steps);
3. ``eager, split``: as 2, with batches run as groups of fewer rows than that.

In every mode a batch of more than ``max_step_tokens`` tokens (rows x length) runs as several groups of rows whose
gradients add up before the one optimizer step: the same update, in the memory of a group. A BiLSTM step of the
report's config on its longest batch (128 x 2,304 tokens) needs 10 GiB of GPU memory whole (H100, 2026-12-07).

Evaluation's batches are cut into pieces of at most ``eval_tokens`` tokens, checked the same way. Under graphs it
allocates from the graphs' pool, whose memory lies idle between replays
(:meth:`sentiment.graphs.GraphedTrainStep.sharing_pool`), so that it adds little to the peak; in eager modes it runs
beside what training keeps. Trials
leave the weights, the optimizer and the random number generators as they were (:func:`sentiment.graphs.unchanged`);
if nothing fits, :class:`MemoryPlanError` stops the run before training with the memory a step needs and the
settings that lower it.

Hand-written because no library plans a recurrent model's memory from its batch shapes: the allocator's own
figures (``torch.cuda.max_memory_reserved``) and out-of-memory errors are the measurements.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sentiment.config import ConfigError
from sentiment.graphs import GraphedTrainStep, dummy_batch, tokens, train_step, unchanged

logger = logging.getLogger(__name__)

GiB = 2**30
# Graphs are tried with the groups max_step_tokens allows, then with groups this many times smaller, before eager
# steps: graph replay was 2.2x faster than eager steps on the BiLSTM (H100, 2026-12-07), so smaller graphed groups
# come first.
GRAPH_SPLITS = (1, 2, 4, 8)


class MemoryPlanError(ConfigError):
    """Not even one review of the longest batch trains in the GPU memory this process may use; the message says
    what a step needs and which settings lower it."""


@dataclass
class StepPlan:
    """How training steps and evaluation run: ``mode`` is ``graphs``, ``graphs, split``, ``eager`` or ``eager,
    split`` (``split``: groups of fewer rows than ``max_step_tokens`` allows); ``chunk_tokens`` the most tokens one
    forward/backward takes (None: any); ``eval_tokens`` the most tokens one evaluation forward takes;
    ``reserved_gib`` the GPU memory reserved once the plan was in place; ``graph_step`` the captured graphs (graph
    modes only); ``seconds`` the time the choice took (captures included)."""

    mode: str
    chunk_tokens: int | None
    eval_tokens: int | None
    reserved_gib: float
    graph_step: GraphedTrainStep | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        """One line for the log."""
        what = {
            "graphs": "CUDA graphs",
            "graphs, split": "CUDA graphs, more split than max_step_tokens asks (whole groups do not fit)",
            "eager": "eager steps (CUDA graphs do not fit)",
            "eager, split": "eager steps, more split than max_step_tokens asks (a whole group does not fit)",
        }[self.mode]
        if self.chunk_tokens:
            what += f"; batches of more than {self.chunk_tokens:,} tokens in groups of rows"
        shapes = f" ({len(self.graph_step.graphs)} batch shapes)" if self.graph_step is not None else ""
        evaluation = f"; evaluation in pieces of <= {self.eval_tokens:,} tokens" if self.eval_tokens else ""
        return f"memory plan: {what}{shapes}{evaluation}; {self.reserved_gib:.2f} GiB of GPU memory reserved"


def use_expandable_segments() -> None:
    """Let PyTorch's CUDA caching allocator grow its memory segments in place (``expandable_segments``), unless
    ``PYTORCH_CUDA_ALLOC_CONF`` already says how to allocate. Then the graphs of many batch shapes fit in the pool
    of the largest: on an H100, ten BiLSTM shapes sharing one pool held 13.5 GiB this way and 20.0 GiB without
    (``benchmarks/results/h100-2026-12-07/graph-pool.txt``); eager steps of changing shapes fragment less too."""
    if not torch.cuda.is_available() or "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return
    # No public setter once CUDA is up; torch 2.10 renamed the private one (the old name warns).
    settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(
        torch.cuda.memory, "_set_allocator_settings", None
    )
    if settings is not None:
        settings("expandable_segments:True")


def _available_gib(device: torch.device) -> float:
    """The memory this process may use: the card's free memory plus what it holds, under its memory fraction."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _device: 1.0)(device)
    return min(free + torch.cuda.memory_reserved(device), fraction * total) / GiB


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says the GPU ran out of memory: PyTorch's allocator raises ``torch.OutOfMemoryError``, but
    cuDNN and cuBLAS report their own allocations failing as status errors."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or any(sign in text for sign in ("out of memory", "ALLOC_FAILED"))


def _fits(trial: Callable[[], None], device: torch.device) -> bool:
    """Whether ``trial`` runs without running out of GPU memory (its cache is given back either way)."""
    try:
        trial()
        return True
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not out_of_memory(err):
            raise
        return False
    finally:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _eval_fits(
    model: nn.Module, shape: tuple[int, int], pad_id: int, device: torch.device, graph_step: GraphedTrainStep | None
) -> bool:
    def forward() -> None:  # where evaluation will run: in the graphs' pool, if there are graphs
        was_training = model.training
        model.eval()
        try:
            with graph_step.sharing_pool() if graph_step is not None else contextlib.nullcontext(), torch.no_grad():
                batch = dummy_batch(shape, pad_id, device)
                model(batch["input_ids"], batch["lengths"])
        finally:
            model.train(was_training)

    return _fits(forward, device)


def _step_fits(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    shape: tuple[int, int],
    pad_id: int,
    device: torch.device,
    max_grad_norm: float | None,
    chunk_tokens: int | None = None,
) -> bool:
    def step() -> None:
        with unchanged(model, optimizer):
            totals = torch.zeros(3, dtype=torch.float64, device=device)
            train_step(model, optimizer, dummy_batch(shape, pad_id, device), totals, max_grad_norm,
                       chunk_tokens=chunk_tokens)  # fmt: skip

    return _fits(step, device)


def _eval_tokens(
    model: nn.Module,
    eval_shape: tuple[int, int],
    budget: int,
    pad_id: int,
    device: torch.device,
    graph_step: GraphedTrainStep | None = None,
) -> int:
    """The most tokens per evaluation forward that fit now (in ``graph_step``'s pool, if given), starting from
    ``budget`` and halving; 0 if not even one review of the longest evaluation batch fits."""
    rows, steps = eval_shape
    budget = max(min(budget, tokens(eval_shape)), steps)
    while True:
        if _eval_fits(model, (max(1, min(rows, budget // steps)), steps), pad_id, device, graph_step):
            return budget
        if budget <= steps:
            return 0
        budget = max(budget // 2, steps)


def plan_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_shapes: set[tuple[int, int]],
    eval_shape: tuple[int, int],
    *,
    graphs: bool,
    max_grad_norm: float | None,
    pad_id: int,
    max_step_tokens: int | None = None,
    max_eval_tokens: int | None = None,
) -> StepPlan:
    """Choose how training steps run on the model's GPU (see the module's docstring): ``train_shapes`` are every
    (rows, length) of the run's training batches, ``eval_shape`` the largest evaluation batch; ``graphs`` whether
    CUDA graphs may be used (``optimizer`` then built ``capturable``); ``max_step_tokens`` the most tokens one
    forward/backward may take in any mode (larger batches run in groups of rows); ``max_eval_tokens`` the most an
    evaluation forward may take (None: as much as a training group). Raises
    :class:`MemoryPlanError` if not one review of the longest batch fits."""
    device = next(model.parameters()).device
    largest = max(train_shapes, key=lambda shape: (tokens(shape), shape))
    rows, steps = largest
    capped = max_step_tokens is not None and tokens(largest) > max_step_tokens
    chunk_tokens = max_step_tokens if capped else None
    torch.cuda.empty_cache()
    for split in GRAPH_SPLITS if graphs else ():
        graph_tokens = chunk_tokens if split == 1 else (chunk_tokens or tokens(largest)) // split
        graph_step = GraphedTrainStep(model, optimizer, max_grad_norm, graph_tokens)
        try:
            graph_step.capture(train_shapes)
            eval_budget = min(graph_tokens or tokens(largest), max_eval_tokens or tokens(eval_shape))
            eval_tokens = _eval_tokens(model, eval_shape, eval_budget, pad_id, device, graph_step)
        except RuntimeError as err:  # out of memory, or a capture that failed after it
            logger.info("CUDA graphs do not fit: %s", str(err).splitlines()[0][:200])
            eval_tokens = 0
        if eval_tokens:
            mode = "graphs" if split == 1 else "graphs, split"
            return StepPlan(mode, graph_tokens, eval_tokens, torch.cuda.memory_reserved(device) / GiB, graph_step)
        graph_step.close()
        del graph_step
    torch.cuda.empty_cache()
    allowed_rows = max(1, min(rows, chunk_tokens // steps)) if chunk_tokens else rows  # what max_step_tokens allows
    chunk_rows = allowed_rows
    while chunk_rows >= 1:
        chunk_tokens = None if chunk_rows == rows else chunk_rows * steps
        if _step_fits(model, optimizer, largest, pad_id, device, max_grad_norm, chunk_tokens):
            eval_budget = min(chunk_rows * steps, max_eval_tokens or tokens(eval_shape))
            eval_tokens = _eval_tokens(model, eval_shape, eval_budget, pad_id, device)
            if eval_tokens:
                mode = "eager" if chunk_rows == allowed_rows else "eager, split"
                return StepPlan(mode, chunk_tokens, eval_tokens, torch.cuda.memory_reserved(device) / GiB)
        chunk_rows //= 2
    raise MemoryPlanError(_nothing_fits(model, optimizer, largest, pad_id, device, max_grad_norm))


def _nothing_fits(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    largest: tuple[int, int],
    pad_id: int,
    device: torch.device,
    max_grad_norm: float | None,
) -> str:
    """The message when one review of the longest batch does not train: the memory a review of that length needs,
    measured on the longest shorter one that fits and scaled to the full length, and the settings that lower it."""
    rows, steps = largest
    needed = None
    length = steps // 2
    while length >= 1 and needed is None:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        if _step_fits(model, optimizer, (1, length), pad_id, device, max_grad_norm):
            per_token = (torch.cuda.max_memory_allocated(device) - before) / length
            needed = per_token * steps / GiB
        length //= 2
    available = _available_gib(device)
    if needed is None:
        what = f"not one review of the longest training batch ({steps} tokens) trains in the {available:.1f} GiB"
    else:
        what = (
            f"one review of the longest training batch ({steps} tokens after bucketing) needs about {needed:.1f} GiB "
            f"for a training step (a batch of {rows}: {rows * needed:.1f} GiB unsplit), more than the "
            f"{available:.1f} GiB"
        )
    return (
        f"GPU memory: {what} this process may use. Cut long reviews with max_length (e.g. --max_length=512 for "
        f"sentiment prepare or train), lower batch_size (now {rows}) or hidden_dim, or free the GPU"
    )
