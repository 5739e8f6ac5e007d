"""Training steps replayed from CUDA graphs: one graph per bucketed batch shape, captured on first use.

cuDNN's LSTM is host-bound at this model size: each training step is thousands of small kernels whose launch
costs more than their work. A CUDA graph launches all of them (forward, loss, backward, gradient clipping and
the optimizer step) in one call. A graph replays fixed shapes, so batches are padded to a bounded ladder of
lengths (:func:`sentiment.batching.bucket_length`) and to a fixed number of rows, the extra rows carrying
weight 0; with the model's ``fused`` or ``padded`` path (both exact under extra padding) every step computes
what the eager step computes on the unpadded batch.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from sentiment.model import LSTMClassifier


def zero_nonfinite_gradients(parameters: list[nn.Parameter], max_grad_norm: float | None) -> torch.Tensor:
    """Clip the gradients of ``parameters`` to ``max_grad_norm`` (when given); if any of them is infinite or NaN
    (an overflow in this step), set them all to zero so that one bad step cannot turn the weights into NaN.
    Returns 1 for such a step, else 0, as a device tensor (no host sync: CUDA graphs can capture it).

    The norm is taken of the gradients divided by their largest magnitude: ``clip_grad_norm_`` squares them in
    their own dtype, so finite gradients above ~1.8e19 (an exploding LSTM under bfloat16 or float32) give an
    infinite norm and would be zeroed as an overflow; here they are clipped like any other."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.int64)
    largest = nn.utils.get_total_norm(grads, norm_type=float("inf"), foreach=True)  # inf or NaN if any is
    nonfinite = ~torch.isfinite(largest)
    if max_grad_norm is not None:
        scale = torch.where(nonfinite | (largest == 0), torch.ones_like(largest), largest)
        relative_norm = nn.utils.get_total_norm([grad / scale for grad in grads], foreach=True)  # <= sqrt(count)
        clip = torch.clamp((max_grad_norm / scale) / (relative_norm + 1e-6 / scale), max=1.0)
        for grad in grads:
            grad.mul_(clip)
    for grad in grads:
        grad.masked_fill_(nonfinite, 0.0)
    return nonfinite.to(torch.int64)


def weighted_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    totals: torch.Tensor,
    max_grad_norm: float | None = None,
    nonfinite_steps: torch.Tensor | None = None,
) -> None:
    """One training step on a fixed-shape ``batch`` whose filler rows have weight 0: loss = mean over the real
    reviews, backward, optional gradient clipping, optimizer step, and ``totals += (loss sum, correct, count)``,
    all on the device with no host sync (so that it can be captured in a CUDA graph). A step whose gradients
    are not finite changes them to zero (``zero_nonfinite_gradients``) and adds 1 to ``nonfinite_steps``."""
    logits = model(batch["input_ids"], batch["lengths"]).float()
    weights = batch["weights"]
    count = weights.sum()
    per_review = F.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="none")
    loss = (per_review * weights).sum() / count
    loss.backward()
    nonfinite = zero_nonfinite_gradients(list(model.parameters()), max_grad_norm)
    if nonfinite_steps is not None:
        nonfinite_steps += nonfinite
    optimizer.step()
    with torch.no_grad():
        correct = (((logits > 0).float() == batch["labels"]).float() * weights).sum()
        totals += torch.stack([loss.detach().double() * count, correct.double(), count.double()])


class GraphedTrainStep:
    """``step(batch)`` runs one training step of ``model`` + ``optimizer`` from a CUDA graph.

    ``batch`` holds ``input_ids`` (rows x bucketed length), ``lengths``, ``labels`` and ``weights`` (1 for real
    reviews, 0 for filler rows), as :class:`sentiment.batching.PadCollator` makes them with ``fixed_rows``. The
    loss is the mean over real reviews; ``totals`` (on the GPU) accumulates loss sum, correct count and review
    count without a host sync, and ``nonfinite_steps`` the steps whose gradients were not finite (set to zero).
    ``optimizer`` must be an ``Adam``/``AdamW`` with ``capturable=True``. Mixed precision is the model's own
    (Accelerate wraps ``forward`` in autocast; build the autocast with ``cache_enabled=False``, as graphs need).
    """

    def __init__(
        self,
        model: LSTMClassifier,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
    ) -> None:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("CUDA graphs need an optimizer built with capturable=True")
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.device = device
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.pool = None
        self.capture_seconds = 0.0
        self._optimizer_ready = False

    def _init_optimizer_state(self) -> None:
        """Create the optimizer's state (moments, step counters) without changing any weight: one step on zero
        gradients, then everything set back to 0. A graph must not capture the state's creation. A state loaded
        to resume a run is kept as it is."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if all(self.optimizer.state.get(param) for param in params):
            self._optimizer_ready = True
            return
        before = [param.detach().clone() for param in params]  # AdamW's decay would move them even at zero grad
        for param in params:
            param.grad = torch.zeros_like(param)
        self.optimizer.step()
        with torch.no_grad():
            for param, value in zip(params, before, strict=True):
                param.copy_(value)
        for param in params:
            param.grad = None
            for value in self.optimizer.state[param].values():
                if torch.is_tensor(value):
                    value.zero_()
        self._optimizer_ready = True

    def _capture(self, shape: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        start = time.perf_counter()
        if not self._optimizer_ready:
            self._init_optimizer_state()
        rows, steps = shape
        pad_id = self.model.pad_id
        inputs = {
            "input_ids": torch.full((rows, steps), pad_id, dtype=torch.int64, device=self.device),
            "lengths": torch.ones(rows, dtype=torch.int64, device=self.device),
            "labels": torch.zeros(rows, dtype=torch.float32, device=self.device),
            "weights": torch.zeros(rows, dtype=torch.float32, device=self.device),
        }
        inputs["weights"][0] = 1.0  # a dummy batch for the warm-up pass; its effect is undone below
        # Warm up on a side stream (cuDNN and the allocator settle), with the weights and state kept unchanged.
        saved = {
            "params": [p.detach().clone() for p in self.model.parameters()],
            "state": {
                k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                for k, s in self.optimizer.state.items()
            },
            "totals": self.totals.clone(),
            "nonfinite_steps": self.nonfinite_steps.clone(),
        }
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            weighted_train_step(
                self.model, self.optimizer, inputs, self.totals, self.max_grad_norm, self.nonfinite_steps
            )
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, pool=self.pool):
            weighted_train_step(
                self.model, self.optimizer, inputs, self.totals, self.max_grad_norm, self.nonfinite_steps
            )
        self.pool = graph.pool()
        with torch.no_grad():
            for param, value in zip(self.model.parameters(), saved["params"], strict=True):
                param.copy_(value)
            for key, state in saved["state"].items():
                for name, value in state.items():
                    if torch.is_tensor(value):
                        self.optimizer.state[key][name].copy_(value)
            self.totals.copy_(saved["totals"])
            self.nonfinite_steps.copy_(saved["nonfinite_steps"])
        del saved
        torch.cuda.synchronize(self.device)
        # The warm-up's eager allocations (cuDNN's reserve space for this shape, ...) stay cached otherwise: tens
        # of GiB for long batches, which other processes on the GPU (sweep workers) then cannot have.
        torch.cuda.empty_cache()
        self.capture_seconds += time.perf_counter() - start
        return graph, inputs

    def close(self) -> None:
        """Free the graphs and their memory pool (the next ``step`` captures again)."""
        self.graphs.clear()
        self.pool = None
        torch.cuda.empty_cache()

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        """One training step on ``batch`` (fixed rows, bucketed length), replayed from its shape's graph."""
        shape = tuple(batch["input_ids"].shape)
        if shape not in self.graphs:
            self.graphs[shape] = self._capture(shape)
        graph, inputs = self.graphs[shape]
        for name, static in inputs.items():
            static.copy_(batch[name], non_blocking=True)
        graph.replay()
