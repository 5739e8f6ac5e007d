"""One LSTM layer, forward and backward, on the persistent kernels against cuDNN, at the configs' shapes: time per
sequential step and peak memory, with the matrix products around the kernels in TF32 (cuDNN's default) and in
float32, with each weights' format that fits (float32 or bfloat16 on the CUDA cores, bfloat16 on the tensor
cores, and a forward of one with the backward of another, ``persistent.FORMATS``), and each kernel alone; and the
LSTM config's stack of three layers a layer at a time against the stacked kernels (every layer in one launch) in
each plan that fits. Needs a CUDA GPU.

    python -m benchmarks.persistent_kernel --output benchmarks/results/h100/persistent-kernel.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from sentiment import persistent
from sentiment.model import lstm_layers
from sentiment.persistent import persistent_layer

SHAPES = {  # name: (reviews, steps, directions, hidden, input features)
    "bilstm layer (128 x 256, hidden 150, both directions)": (128, 256, 2, 150, 300),
    "lstm layer (64 x 256, hidden 75)": (64, 256, 1, 75, 75),
}


def timed(run: callable, repeats: int = 20) -> float:
    """Median milliseconds of ``run()`` on the GPU (CUDA events), after two warm-up runs."""
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(batch: int, steps: int, directions: int, hidden: int, features: int) -> dict[str, float]:
    """Milliseconds of forward and of forward + backward for both implementations, with peak reserved memory."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    x = torch.randn(batch, steps, features, device=device, requires_grad=True)
    lengths = torch.full((batch,), steps, device=device)
    w_ih = (0.1 * torch.randn(directions * 4 * hidden, features, device=device)).requires_grad_()
    w_hh = (0.1 * torch.randn(directions, 4 * hidden, hidden, device=device)).requires_grad_()
    bias = torch.zeros(directions * 4 * hidden, device=device, requires_grad=True)

    weights = []  # torch.lstm's order, per direction: w_ih, w_hh, b_ih, b_hh
    for d in range(directions):
        weights += [w_ih[d * 4 * hidden : (d + 1) * 4 * hidden], w_hh[d], bias[d * 4 * hidden : (d + 1) * 4 * hidden]]
        weights.append(torch.zeros_like(weights[-1]))
    zeros = torch.zeros(directions, batch, hidden, device=device)

    def cudnn() -> torch.Tensor:
        return lstm_layers(x, (zeros, zeros), weights, train=True, bidirectional=directions == 2)[0]

    def persistent_run() -> torch.Tensor:
        return persistent_layer(x, weights, lengths)[0]

    row: dict[str, float] = {}
    # The persistent path's products (input projection, weight gradients) at cuDNN's default precision (TF32), then
    # in full float32 (cuDNN's RNNs told not to use TF32), to show what that precision costs; then the kernels of
    # each other weights' format that fits.
    planned = persistent._plan(batch, directions, hidden, device)[1]
    runs = [
        ("cuDNN", cudnn, True, planned),
        ("persistent", persistent_run, True, planned),
        ("persistent, float32 products", persistent_run, False, planned),
    ]
    runs += [(f"persistent, {w} weights", persistent_run, True, w) for w in fitting(hidden, device) if w != planned]
    for name, run, tf32, weights_format_name in runs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32), weights_format(weights_format_name):
            with torch.no_grad():
                row[f"{name} forward ms"] = timed(run)
            row[f"{name} forward+backward ms"] = timed(lambda run=run: run().sum().backward())
        row[f"{name} peak reserved GiB"] = torch.cuda.max_memory_reserved() / 2**30
        row[f"{name} us/step (fwd+bwd)"] = 1000 * row[f"{name} forward+backward ms"] / steps
    row["speed-up (fwd+bwd)"] = row["cuDNN forward+backward ms"] / row["persistent forward+backward ms"]
    row.update(kernels_alone(batch, steps, directions, hidden))
    return row


def fitting(hidden: int, device: torch.device, pairs: bool = True) -> list[str]:
    """The weights' formats whose kernels fit one block's shared memory at ``hidden`` (one review per block);
    without ``pairs``, only the formats that run both kernels."""
    formats = [w for w in persistent.FORMATS if pairs or "+" not in w]
    return [w for w in formats if persistent._fits(hidden, w, 1, device)]


@contextlib.contextmanager
def weights_format(weights: str) -> Iterator[None]:
    """The persistent path's plan takes ``weights`` (if it fits) for the block."""
    before = persistent.WEIGHT_FORMATS
    persistent.WEIGHT_FORMATS = (weights,)
    try:
        yield
    finally:
        persistent.WEIGHT_FORMATS = before


def kernels_alone(batch: int, steps: int, directions: int, hidden: int) -> dict[str, float]:
    """Microseconds per step of the forward and the backward kernel by themselves, on buffers made beforehand
    (what the recurrence costs without PyTorch's matrix products, allocations and launch overhead around it), for
    each weights' format that fits, with 1, 2 and 4 reviews per block and the plan's. A time per step that grows
    with the reviews per block says the block's arithmetic bounds a step; a flat one, its latency."""
    device = torch.device("cuda")
    planned, planned_weights = persistent._plan(batch, directions, hidden, device)
    gx = torch.randn(batch, steps, directions, 4 * hidden, device=device)
    w_hh = 0.1 * torch.randn(directions, 4 * hidden, hidden, device=device)
    lengths = torch.full((batch,), steps, device=device, dtype=torch.int32)
    zeros = torch.zeros(directions, batch, hidden, device=device)
    out = torch.zeros(batch, steps, directions, hidden, device=device)
    gates, grad_gates = torch.empty_like(gx), torch.zeros_like(gx)
    cells, grad_out = torch.empty_like(out), torch.randn_like(out)
    h_n, c_n, grad_h0, grad_c0 = (torch.empty_like(zeros) for _ in range(4))
    bias, grad_bias = (
        torch.zeros(directions, 4 * hidden, device=device),
        torch.empty(directions, batch, 4 * hidden, device=device),
    )
    row: dict[str, float | str] = {"planned reviews per block": planned, "planned weights": planned_weights}
    for weights in fitting(hidden, device, pairs=False):  # a pair's kernels are timed under each of its formats
        words = persistent._weight_words(w_hh, weights)
        backward_words = persistent._weight_words(w_hh, weights, backward=True)
        forward_args = [gx, words, bias, lengths, zeros, zeros, out, gates, cells, h_n, c_n, batch, steps,
                        directions, 1]  # fmt: skip
        backward_args = [grad_out, zeros, zeros, backward_words, lengths, gates, cells, zeros, grad_gates, grad_bias,
                         grad_h0, grad_c0, batch, steps, directions]  # fmt: skip
        for reviews in sorted({planned, 1, 2, 4}):
            if not persistent._fits(hidden, weights, reviews, device):
                continue
            forward, backward, layout = persistent._kernels(hidden, reviews, weights, torch.cuda.current_device())
            grid = (-(-batch // reviews), directions, 1)
            kernels = (
                ("forward", forward, forward_args, layout.forward_threads, layout.forward_shared),
                ("backward", backward, backward_args, layout.backward_threads, layout.backward_shared),
            )
            for name, kernel, args, threads, shared in kernels:
                launch = {"grid": grid, "block": (threads, 1, 1), "shared_mem": shared, "args": args}
                milliseconds = timed(lambda kernel=kernel, launch=launch: kernel(**launch))
                row[f"{name} kernel us/step, {weights}, {reviews} per block"] = 1000 * milliseconds / steps
    return row


STACKS = {  # name: (reviews, steps, layers, hidden, input features)
    "lstm.yaml's 3 layers (64 x 256, hidden 75)": (64, 256, 3, 75, 50),
}


def measure_stack(batch: int, steps: int, layers: int, hidden: int, features: int) -> dict[str, float | str]:
    """A stack of unidirectional layers, forward and forward + backward: cuDNN (all layers in one call), the
    persistent kernels a layer at a time, and the stacked kernels (every layer in one launch) in each plan that
    fits (reviews per block, weights), with peak reserved memory."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    x = torch.randn(batch, steps, features, device=device, requires_grad=True)
    lengths = torch.full((batch,), steps, device=device)
    weights = []  # per layer: w_ih, w_hh, b_ih, b_hh
    for layer in range(layers):
        shapes = ((4 * hidden, features if layer == 0 else hidden), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,))
        weights.append([(0.1 * torch.randn(*shape, device=device)).requires_grad_() for shape in shapes])
    zeros = torch.zeros(layers, batch, hidden, device=device)

    def cudnn() -> torch.Tensor:
        flat = [w for layer in weights for w in layer]
        return lstm_layers(x, (zeros, zeros), flat, train=True, num_layers=layers)[0]

    def layer_by_layer() -> torch.Tensor:
        out = x
        for layer in weights:
            out = persistent_layer(out, layer, lengths)[0]
        return out

    def stacked() -> torch.Tensor:
        return persistent.persistent_stack(x, weights, lengths)[0]

    planned = persistent._stack_plan(batch, layers, hidden, device)
    row: dict[str, float | str] = {"planned stack": f"{planned[0]} per block, {planned[1]}" if planned else "none"}
    runs = [("cuDNN", cudnn, None), ("persistent, a launch per layer", layer_by_layer, None)]
    for reviews in range(1, persistent.MAX_REVIEWS_PER_BLOCK + 1):
        for weights_format in persistent.STACK_FORMATS:
            layout = persistent._stack_layout(hidden, reviews, weights_format, layers)
            if max(layout.forward_shared, layout.backward_shared) <= persistent._shared_limit(device):
                runs.append((f"stacked, {reviews} per block, {weights_format}", stacked, (reviews, weights_format)))
    before = persistent._stack_plan
    for name, run, plan in runs:
        if plan is not None:
            persistent._stack_kernels(hidden, *plan, layers, torch.cuda.current_device())
            persistent._stack_plan = lambda *args, plan=plan: plan
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                row[f"{name} forward ms"] = timed(run)
            row[f"{name} forward+backward ms"] = timed(lambda run=run: run().sum().backward())
        finally:
            persistent._stack_plan = before
        row[f"{name} peak reserved GiB"] = torch.cuda.max_memory_reserved() / 2**30
        row[f"{name} us/step (fwd+bwd)"] = 1000 * row[f"{name} forward+backward ms"] / steps
    for plan in [run[2] for run in runs if run[2] is not None]:
        row.update(stack_kernels_alone(batch, steps, layers, hidden, plan))
    return row


def stack_kernels_alone(
    batch: int, steps: int, layers: int, hidden: int, plan: tuple[int, str], device: torch.device | None = None
) -> dict[str, float]:
    """Microseconds per step of the stacked forward and backward kernels by themselves, every layer in the launch,
    on buffers made beforehand; each launch includes the refill of its handoff tensor and ticket counter (a few
    MB set, some microseconds), without which the layers would not wait for each other."""
    device = device or torch.device("cuda")
    reviews, weights_format = plan
    forward, backward, layout = persistent._stack_kernels(
        hidden, reviews, weights_format, layers, persistent._index(device)
    )
    gates_shape, states_shape = (layers, batch, steps, 4 * hidden), (layers, batch, hidden)
    gx = torch.randn(batch, steps, 4 * hidden, device=device)
    w_ih = 0.1 * torch.randn(layers - 1, 4 * hidden, hidden, device=device)
    words = persistent._stack_words(w_ih, 0.1 * torch.randn(layers, 4 * hidden, hidden, device=device), weights_format)
    bias, masks = torch.zeros(layers, 4 * hidden, device=device), torch.empty(0, device=device)
    lengths = torch.full((batch,), steps, device=device, dtype=torch.int32)
    zeros = torch.zeros(states_shape, device=device)
    outs = torch.empty(layers, batch, steps, hidden, device=device)
    gates, grad_gates = torch.empty(gates_shape, device=device), torch.empty(gates_shape, device=device)
    cells = torch.empty_like(outs)
    h_n, c_n, grad_h0, grad_c0 = (torch.empty_like(zeros) for _ in range(4))
    grad_out, grad_inputs = torch.randn(batch, steps, hidden, device=device), torch.empty_like(outs[1:])
    grad_bias = torch.empty(layers, batch, 4 * hidden, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    grid = (-(-batch // reviews) * layers, 1, 1)

    def run_forward() -> None:
        outs.view(torch.int32).fill_(-1)
        counter.zero_()
        forward(grid=grid, block=(layout.forward_threads, 1, 1), shared_mem=layout.forward_shared,
                args=[gx, words, bias, lengths, zeros, zeros, masks, outs, gates, cells, h_n, c_n, counter, batch,
                      steps, 0, 1])  # fmt: skip

    def run_backward() -> None:
        grad_inputs.view(torch.int32).fill_(-1)
        counter.zero_()
        backward(grid=grid, block=(layout.backward_threads, 1, 1), shared_mem=layout.backward_shared,
                 args=[grad_out, zeros, zeros, words, lengths, gates, cells, zeros, masks, grad_inputs, grad_gates,
                       grad_bias, grad_h0, grad_c0, counter, batch, steps, 0])  # fmt: skip

    name = f"stacked {reviews} per block, {weights_format}"
    return {
        f"{name}: forward kernel us/step (all layers)": 1000 * timed(run_forward) / steps,
        f"{name}: backward kernel us/step (all layers)": 1000 * timed(run_backward) / steps,
    }


def write_report(rows: dict[str, dict], output: Path) -> None:
    """Markdown (a table per shape: measure, value) and JSON of the rows measured so far."""
    device = torch.cuda.get_device_name()
    lines = [f"# Persistent LSTM kernels against cuDNN: {device}, torch {torch.__version__}"]
    for name, row in rows.items():
        lines += ["", f"## {name}", "", "| measure | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in row.items()]  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    output.with_suffix(".json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))


def main() -> None:
    """Measure every shape and write Markdown + JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="Markdown report (JSON beside it)")
    args = parser.parse_args()
    rows: dict[str, dict] = {}
    for name, shape in SHAPES.items():  # the report is written after each shape: a later failure keeps the others
        rows[name] = measure(*shape)
        write_report(rows, args.output)
    for name, shape in STACKS.items():
        rows[name] = measure_stack(*shape)
        write_report(rows, args.output)
    print(args.output.read_text())


if __name__ == "__main__":
    main()
