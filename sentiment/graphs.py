"""The training step, and its replay from CUDA graphs: one graph per bucketed batch shape, all in one memory pool.

cuDNN's LSTM is host-bound at this model size: each training step is thousands of small kernels whose launch
costs more than their work. A CUDA graph launches all of them (forward, loss, backward, gradient clipping and
the optimizer step) in one call. A graph replays fixed shapes, so batches are padded to a bounded ladder of
lengths (:func:`sentiment.batching.bucket_length`) and to a fixed number of rows, the extra rows carrying
weight 0; with the model's ``fused`` or ``padded`` path (both exact under extra padding) every step computes
what the eager step computes on the unpadded batch.

Memory: every graph allocates from one pool, and the shapes are captured largest first (before training, when
the trainer knows them), so the later, smaller graphs fit in the memory the largest one left free: the pool holds
about one step of the longest batch, whatever the number of shapes. Between two replays that memory holds nothing
a replay reads before writing it, so evaluation allocates from the pool too (:meth:`GraphedTrainStep.sharing_pool`)
instead of beside it. Captures leave the weights, the optimizer's state and the random number generators exactly
as they were.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Iterator

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


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    totals: torch.Tensor,
    max_grad_norm: float | None = None,
    nonfinite_steps: torch.Tensor | None = None,
    *,
    chunk_tokens: int | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    unscale: Callable[[], None] | None = None,
    denominator: float | None = None,
) -> None:
    """One training step, the same for CUDA graphs and for eager runs: loss = mean over the batch's real reviews,
    backward, optional gradient clipping, optimizer step, and ``totals += (loss sum, correct, count)``, all on
    the device with no host sync (so that it can be captured in a CUDA graph).

    ``batch`` holds ``input_ids``, ``lengths``, ``labels`` and optionally ``weights`` (1 for a real review, 0 for
    a filler row of a fixed-shape batch; all 1 when absent), ``labels`` and ``weights`` on the model's device.
    ``chunk_tokens`` splits a batch of more than that many tokens (rows x length) into as few groups of rows as
    keep within it, of even size, run one after another, their gradients summed before the one optimizer step (the
    same step, in less memory; a wrapped ``DistributedDataParallel`` model synchronises once, on the last group).
    ``backward`` replaces ``loss.backward()`` (Accelerate's, with its gradient scaler) and ``unscale`` runs before
    clipping (the scaler's unscaling). ``denominator`` replaces the batch's review count in the mean: under several
    processes, whose gradients ``DistributedDataParallel`` averages, the step's reviews on all processes over their
    number, so that every review of the step weighs the same whatever the size of its process's batch. A step whose
    gradients are not finite changes them to zero (``zero_nonfinite_gradients``) and adds 1 to
    ``nonfinite_steps``."""
    input_ids, lengths, labels = batch["input_ids"], batch["lengths"], batch["labels"]
    weights = batch.get("weights")
    if weights is None:
        weights = torch.ones_like(labels)
    count = weights.sum()
    rows, steps = input_ids.shape
    chunk = rows
    if chunk_tokens:  # as few groups as chunk_tokens allows, of even size: the same work in the least memory
        groups = -(-rows // max(1, min(rows, chunk_tokens // max(steps, 1))))
        chunk = -(-rows // groups)
    starts = range(0, rows, chunk)
    loss_sum = correct = None
    for index, start in enumerate(starts):
        part = slice(start, start + chunk)
        last = index == len(starts) - 1
        no_sync = getattr(model, "no_sync", None)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            logits = model(input_ids[part], lengths[part]).float()
            per_review = F.binary_cross_entropy_with_logits(logits, labels[part], reduction="none") * weights[part]
            loss = per_review.sum() / (count if denominator is None else denominator)
            (backward or torch.Tensor.backward)(loss)
        with torch.no_grad():
            part_correct = (((logits > 0).float() == labels[part]).float() * weights[part]).sum()
            part_sum = per_review.detach().sum()
            loss_sum = part_sum if loss_sum is None else loss_sum + part_sum
            correct = part_correct if correct is None else correct + part_correct
    if unscale is not None:
        unscale()
    params = [param for param in model.parameters() if param.requires_grad]
    nonfinite = zero_nonfinite_gradients(params, max_grad_norm)
    if nonfinite_steps is not None:
        nonfinite_steps += nonfinite
    optimizer.step()
    with torch.no_grad():
        totals += torch.stack([loss_sum.double(), correct.double(), count.double()])


@contextlib.contextmanager
def unchanged(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Run trial steps with no lasting effect: the weights, the optimizer's state, the gradients (dropped) and the
    CPU and CUDA random number generators are as before when the block ends, also when it raises (out of
    memory, say)."""
    device = next(model.parameters()).device
    params = [param.detach().clone() for param in model.parameters()]
    state = {
        key: {name: value.clone() if torch.is_tensor(value) else value for name, value in entry.items()}
        for key, entry in optimizer.state.items()
    }
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for param, value in zip(model.parameters(), params, strict=True):
                    param.copy_(value)
                for key in list(optimizer.state):  # state the block created (a first step) goes again
                    if key not in state:
                        del optimizer.state[key]
                for key, entry in state.items():
                    for name in list(optimizer.state[key]):
                        if name not in entry:
                            del optimizer.state[key][name]
                    for name, value in entry.items():
                        if torch.is_tensor(value):
                            optimizer.state[key][name].copy_(value)
                        else:
                            optimizer.state[key][name] = value


def dummy_batch(shape: tuple[int, int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed-shape batch of ``shape`` (rows, length) for warm-ups and trials: every row a full-length review
    of padding ids with weight 1 (the most work and memory any batch of this shape can take)."""
    rows, steps = shape
    return {
        "input_ids": torch.full((rows, steps), pad_id, dtype=torch.int64, device=device),
        "lengths": torch.full((rows,), steps, dtype=torch.int64, device=device),
        "labels": torch.zeros(rows, dtype=torch.float32, device=device),
        "weights": torch.ones(rows, dtype=torch.float32, device=device),
    }


def tokens(shape: tuple[int, int]) -> int:
    """Rows x length: what a batch's memory grows with."""
    return shape[0] * shape[1]


@functools.cache
def _work_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(torch.device("cuda", device_index))


def work_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per GPU on which graphs are warmed up and captured, and evaluation shares their pool, for
    the life of the process. cuBLAS keeps a workspace for each stream it has run on until the process ends: a new
    stream for each run (each sweep trial in a worker) would leave one more behind every time."""
    return _work_stream(device.index if device.index is not None else torch.cuda.current_device())


class GraphedTrainStep:
    """``step(batch)`` runs one training step of ``model`` + ``optimizer`` from a CUDA graph.

    ``batch`` holds ``input_ids`` (rows x bucketed length), ``lengths``, ``labels`` and ``weights`` (1 for real
    reviews, 0 for filler rows), as :class:`sentiment.batching.PadCollator` makes them with ``fixed_rows``. The
    loss is the mean over real reviews; ``totals`` (on the GPU) accumulates loss sum, correct count and review
    count without a host sync, and ``nonfinite_steps`` the steps whose gradients were not finite (set to zero).
    ``optimizer`` must be an ``Adam``/``AdamW`` with ``capturable=True``. Mixed precision is the model's own
    (Accelerate wraps ``forward`` in autocast; build the autocast with ``cache_enabled=False``, as graphs need).

    ``capture(shapes)`` captures the given shapes before training, largest first, so that the one memory pool
    they share is sized by the largest; a shape met later is captured on first use. ``chunk_tokens``: batches of
    more tokens run as groups of rows within the graph (see ``train_step``).
    """

    def __init__(
        self,
        model: LSTMClassifier,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("CUDA graphs need an optimizer built with capturable=True")
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.chunk_tokens = chunk_tokens
        self.device = device
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        # Warm-up, captures and the eager work that shares their pool run on one stream of their own: the allocator
        # hands a free block only to allocations on the stream it was freed on.
        self.stream = work_stream(device)
        self.pool = torch.cuda.MemPool()
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

    def _warm_up(self, inputs: dict[str, torch.Tensor]) -> None:
        """Before the first capture only: one step on the capture stream, so that cuDNN, cuBLAS (its workspace for
        that stream) and the allocator set themselves up outside the capture, its effects undone. Later shapes need
        no warm-up, whose memory (a whole step, in the ordinary cache) would otherwise add to the pool's."""
        with unchanged(self.model, self.optimizer):
            saved_totals = (self.totals.clone(), self.nonfinite_steps.clone())
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.optimizer.zero_grad(set_to_none=True)
                train_step(
                    self.model, self.optimizer, inputs, self.totals, self.max_grad_norm, chunk_tokens=self.chunk_tokens
                )  # fmt: skip
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            torch.cuda.synchronize(self.device)
            self.totals.copy_(saved_totals[0])
            self.nonfinite_steps.copy_(saved_totals[1])
        torch.cuda.empty_cache()

    def _capture(self, shape: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        start = time.perf_counter()
        if not self._optimizer_ready:
            self._init_optimizer_state()
        inputs = dummy_batch(shape, self.model.pad_id, self.device)
        if not self.graphs:
            self._warm_up(inputs)
        graph = torch.cuda.CUDAGraph()
        # A capture records work and runs none of it: the weights, the optimizer's state and the totals stay as they
        # are, and need no copy to restore them from (a copy per shape, and the allocations it makes between
        # captures, which empty the cache). It does draw the random numbers its replays will use, and leaves the
        # graph's gradients (in the pool) as the parameters' .grad: the generators are set back, and the gradients
        # dropped so that the next capture reuses that memory (each replay writes its gradients before it reads them).
        with torch.random.fork_rng(devices=[self.device], device_type="cuda"):
            try:
                with torch.cuda.graph(graph, pool=self.pool.id, stream=self.stream):
                    train_step(
                        self.model, self.optimizer, inputs, self.totals, self.max_grad_norm, self.nonfinite_steps,
                        chunk_tokens=self.chunk_tokens,
                    )  # fmt: skip
            finally:
                self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - start
        return graph, inputs

    def capture(self, shapes: Iterable[tuple[int, int]]) -> None:
        """Capture a graph for every shape of ``shapes`` not captured yet, the largest (rows x length) first."""
        for shape in sorted(set(shapes) - set(self.graphs), key=lambda s: (tokens(s), s), reverse=True):
            self.graphs[shape] = self._capture(shape)

    @contextlib.contextmanager
    def sharing_pool(self) -> Iterator[None]:
        """Run eager work between training steps (evaluation) in the graphs' memory pool, on their stream: it
        reuses the memory the graphs' intermediate tensors take during a replay, which lies idle between replays.

        Safe because a replay reads nothing from that memory before writing it (its inputs, the weights, the
        optimizer's state and the totals live outside it or stay allocated), and the work is done, its tensors
        freed, before the next replay: the block must not return tensors that outlive it on the device."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream), torch.cuda.use_mem_pool(self.pool, self.device):
                yield
        finally:
            current.wait_stream(self.stream)

    def close(self) -> None:
        """Free the graphs and their memory pool (the next ``step`` captures again)."""
        self.graphs.clear()
        self.pool = torch.cuda.MemPool()
        self.optimizer.zero_grad(set_to_none=True)
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
