"""GPU micro-benchmark: one bidirectional LSTM layer, cuDNN (``nn.LSTM`` weights through ``torch.lstm`` on the
padded batch) against the Triton layer (``triton_lstm.py`` beside this file), forward and forward+backward.

    python experiments/triton_lstm/bench.py --output triton-lstm-h200.json

For each hidden size (150, 192), length T (256, 894) and dtype (float32; bfloat16 autocast), batch 128, input
50 (GloVe 50d, the first layer): milliseconds per call (median of ``--iters`` after ``--warmup``, CUDA events),
microseconds per time step (forward; backward = forward+backward minus forward), peak memory. Every review has
the full length T by default (``--lengths full``; cuDNN on padded input always runs T steps); ``--lengths random``
adds Triton rows with lengths uniform in [T/4, T] (its blocks stop at their longest row).

Before timing, a check per hidden size and Triton config: max |difference| of outputs, final states and every
gradient against cuDNN in float32 with TF32 off (full lengths: cuDNN on the padded batch; random lengths: cuDNN
on the packed batch), also relative to each quantity's max |cuDNN value|; the worst relative one is held to the
config's precision (``CHECK_TOLERANCE``: float32 dots near rounding, tf32 and bf16 looser) and the row says
whether it passed. cuDNN is timed with the process's own TF32 setting (recorded; PyTorch's default lets
cuDNN use TF32). bfloat16 for cuDNN is the trainer's path (``sentiment.model.lstm_layers``: inputs, state and
weights cast to bfloat16); for Triton, the input projection runs in bfloat16 and the recurrence in float32 (the
``dtype``), apart from the recurrent dots of a ``bf16`` config (bfloat16 W_hh and operands, float32 sums; the
config's precision, independent of the dtype).

Writes the JSON (environment, settings, check and timing rows; rewritten after every row, so a run cut short
keeps what it measured) and prints a table. ``--device cpu`` (with ``TRITON_INTERPRET=1``, tiny shapes) only
smoke-tests this script without a GPU: its figures mean nothing, and a bf16 config's check fails there (Triton's
interpreter multiplies the bit patterns of bfloat16 ``tl.dot`` operands; the tests patch that, this script not).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from triton_lstm import TritonLSTMConfig, compile_report, triton_lstm

from sentiment.model import lstm_layers

INPUT_SIZE = 50
DEFAULT_CONFIGS = "16:32:32:8:ieee,16:16:16:4:ieee,32:32:32:8:ieee,16:32:32:8:tf32,16:32:32:8:bf16"
# The largest max|Triton - cuDNN| / max|cuDNN| (per quantity: outputs, states, each gradient) that a check row
# accepts, by the config's precision: float32 dots agree to rounding; tf32 rounds the dot operands to 10 mantissa
# bits, bf16 to 7 (W_hh, h and the gate gradients), over T steps of recurrence.
CHECK_TOLERANCE = {"ieee": 1e-4, "tf32x3": 1e-4, "tf32": 1e-2, "bf16": 3e-2}


def parse_configs(text: str) -> list[TritonLSTMConfig]:
    """``block_b:block_h:block_k:num_warps:precision[:num_stages]``, comma-separated."""
    configs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (5, 6):
            raise argparse.ArgumentTypeError(f"bad config {item!r}: block_b:block_h:block_k:num_warps:precision")
        block_b, block_h, block_k, warps = (int(p) for p in parts[:4])
        stages = int(parts[5]) if len(parts) == 6 else None
        try:
            configs.append(TritonLSTMConfig(block_b, block_h, block_k, warps, parts[4], stages))
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"bad config {item!r}: {err}") from err
    return configs


def environment(device: torch.device) -> dict[str, Any]:
    """GPU, versions and the TF32 settings in force."""
    import triton

    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def make_lengths(kind: str, batch: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "full":
        return torch.full((batch,), steps, dtype=torch.int64)
    return torch.randint(max(1, steps // 4), steps + 1, (batch,), generator=generator)


class Case:
    """One layer's weights, inputs and output gradients, shared by cuDNN and Triton."""

    def __init__(
        self, hidden: int, batch: int, steps: int, lengths: torch.Tensor, device: torch.device, seed: int = 0
    ) -> None:
        torch.manual_seed(seed)
        self.device = device
        self.lstm = nn.LSTM(INPUT_SIZE, hidden, bidirectional=True, batch_first=True).to(device)
        self.hidden, self.batch, self.steps = hidden, batch, steps
        self.lengths = lengths
        self.x = torch.randn(batch, steps, INPUT_SIZE, device=device)
        self.grad_out = torch.randn(batch, steps, 2 * hidden, device=device)
        self.real = (torch.arange(steps, device=device).unsqueeze(0) < lengths.to(device).unsqueeze(1)).unsqueeze(-1)
        self.grad_out *= self.real  # no gradient at padding (both paths then agree on what matters)
        self.grad_h = torch.randn(2, batch, hidden, device=device)
        self.grad_c = torch.randn(2, batch, hidden, device=device)

    def leaves(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.x.clone().requires_grad_()
        weights = [w.detach().clone().requires_grad_() for w in self.lstm._flat_weights]
        return x, weights

    def loss(self, outputs: torch.Tensor, h_n: torch.Tensor, c_n: torch.Tensor) -> torch.Tensor:
        return (
            (outputs.float() * self.grad_out).sum()
            + (h_n.float() * self.grad_h).sum()
            + (c_n.float() * self.grad_c).sum()
        )


def run_cudnn(case: Case, x: torch.Tensor, weights: list[torch.Tensor], packed: bool) -> tuple:
    zeros = x.new_zeros(2, case.batch, case.hidden)
    if not packed:
        return lstm_layers(x, (zeros, zeros), weights, train=True, bidirectional=True)
    sequence = pack_padded_sequence(x, case.lengths, batch_first=True, enforce_sorted=False)
    outputs, h_n, c_n = _packed_lstm(sequence, weights, zeros)
    outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=case.steps)
    return outputs, h_n, c_n


def _packed_lstm(sequence: Any, weights: list[torch.Tensor], zeros: torch.Tensor) -> tuple:
    from torch.nn.utils.rnn import PackedSequence

    # torch.lstm's packed overload; hx in sorted order (zeros here, so no permutation is needed for the input).
    data, h_n, c_n = torch.lstm(
        sequence.data, sequence.batch_sizes, (zeros, zeros), weights, True, 1, 0.0, True, True
    )  # fmt: skip
    unsorted = sequence.unsorted_indices
    return (
        PackedSequence(data, sequence.batch_sizes, sequence.sorted_indices, unsorted),
        h_n.index_select(1, unsorted),
        c_n.index_select(1, unsorted),
    )


def run_triton(case: Case, x: torch.Tensor, weights: list[torch.Tensor], config: TritonLSTMConfig) -> tuple:
    return triton_lstm(x, case.lengths, weights, True, None, config)


def gradients(case: Case, runner: Callable[[torch.Tensor, list[torch.Tensor]], tuple]) -> list[torch.Tensor]:
    x, weights = case.leaves()
    outputs, h_n, c_n = runner(x, weights)
    grads = torch.autograd.grad(case.loss(outputs, h_n, c_n), [x, *weights])
    return [outputs.float(), h_n.float(), c_n.float(), *grads]


CHECK_NAMES = ["outputs", "h_n", "c_n", "grad_x"]


def check(case: Case, config: TritonLSTMConfig, packed: bool) -> dict[str, Any]:
    """Max |Triton - cuDNN| per quantity, float32, cuDNN with TF32 off; also divided by max |cuDNN| per
    quantity, and whether the worst of those is within the config precision's ``CHECK_TOLERANCE``."""
    names = CHECK_NAMES + [f"grad_{n}" for n in case.lstm._flat_weights_names]
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        want = gradients(case, lambda x, w: run_cudnn(case, x, w, packed))
        got = gradients(case, lambda x, w: run_triton(case, x, w, config))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    want[0] = want[0] * case.real  # cuDNN on padded input has outputs at padding; Triton writes zeros
    got[0] = got[0] * case.real
    absolute = {n: (a - b).abs().max().item() for n, a, b in zip(names, want, got, strict=True)}
    relative = {n: absolute[n] / max(a.abs().max().item(), 1e-30) for n, a in zip(names, want, strict=True)}
    tolerance = CHECK_TOLERANCE[config.precision]
    return {
        "max_abs_diff": absolute,
        "max_rel_diff": relative,
        "tolerance": tolerance,
        # not ``<=`` on the max alone: a NaN anywhere fails
        "within_tolerance": all(value <= tolerance for value in relative.values()),
    }


def time_calls(step: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of ``step`` (CUDA events around each call on a GPU)."""
    for _ in range(warmup):
        step()
    times = []
    if device.type != "cuda":
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(
    case: Case, runner: Callable[[torch.Tensor, list[torch.Tensor]], tuple], dtype: str, warmup: int, iters: int
) -> dict[str, float]:
    """Forward and forward+backward milliseconds per call, microseconds per step, peak memory."""
    x, weights = case.leaves()
    device = case.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def forward() -> None:
        with torch.no_grad(), autocast:
            runner(x, weights)

    def forward_backward() -> None:
        with autocast:
            outputs, h_n, c_n = runner(x, weights)
            loss = case.loss(outputs, h_n, c_n)
        loss.backward()
        x.grad = None
        for w in weights:
            w.grad = None

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    fwd_ms = time_calls(forward, warmup, iters, device)
    both_ms = time_calls(forward_backward, warmup, iters, device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": both_ms,
        "fwd_us_per_step": fwd_ms * 1e3 / case.steps,
        "bwd_us_per_step": (both_ms - fwd_ms) * 1e3 / case.steps,
        "peak_mib": peak,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'H':>4} {'T':>4} {'dtype':>5} {'lengths':>7} {'impl':>6} {'config':<22} {'fwd ms':>8} {'f+b ms':>8} "
        f"{'fwd us/t':>8} {'bwd us/t':>8} {'peak MiB':>9} {'vs cudnn':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["kind"] != "time":
            continue
        print(
            f"{row['hidden']:>4} {row['steps']:>4} {row['dtype']:>5} {row['lengths']:>7} {row['impl']:>6} "
            f"{row.get('config_name', ''):<22} {row['fwd_ms']:>8.2f} {row['fwd_bwd_ms']:>8.2f} "
            f"{row['fwd_us_per_step']:>8.2f} {row['bwd_us_per_step']:>8.2f} {row['peak_mib']:>9.0f} "
            f"{row.get('speedup_vs_cudnn', float('nan')):>7.2f}"
        )
    checks = [r for r in rows if r["kind"] == "check"]
    if checks:
        print("\nmax |Triton - cuDNN| (float32, TF32 off; rel: / max |cuDNN|, against the precision's tolerance):")
        for row in checks:
            if "max_abs_diff" not in row:
                print(f"  H={row['hidden']} {row['lengths']:>6} {row['config_name']:<22} {row.get('error', '')[:200]}")
                continue
            worst = max(row["max_abs_diff"].items(), key=lambda kv: kv[1])
            worst_rel = max(row["max_rel_diff"].items(), key=lambda kv: kv[1])
            verdict = "ok" if row["within_tolerance"] else "OVER"
            print(
                f"  H={row['hidden']} T={row['steps']} {row['lengths']:>6} {row['config_name']:<22} "
                f"outputs {row['max_abs_diff']['outputs']:.2e}, worst {worst[0]} {worst[1]:.2e}; "
                f"worst rel {worst_rel[0]} {worst_rel[1]:.2e} ({verdict}, tolerance {row['tolerance']:.0e})"
            )
            ptxas = row.get("ptxas", {})
            if "forward" in ptxas:
                print(
                    "    ptxas: "
                    + ", ".join(
                        f"{k} {v['registers']} registers, {v['spill_stores']} B spilled" for k, v in ptxas.items()
                    )
                )
                # The W_hh tile loads in each kernel's PTX by width (static counts; see ptx_global_loads).
                print(
                    "    weight loads: "
                    + ", ".join(
                        f"{k} " + " ".join(f"{n}x {form}" for form, n in v["global_loads"]["weights"].items())
                        for k, v in ptxas.items()
                    )
                )


def config_name(config: TritonLSTMConfig) -> str:
    stages = f":s{config.num_stages}" if config.num_stages is not None else ""
    return f"{config.block_b}:{config.block_h}:{config.block_k}:w{config.num_warps}:{config.precision}{stages}"


def main() -> None:
    """Check, time, print and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--hidden", default="150,192")
    parser.add_argument("--steps", default="256,894")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--lengths", default="full", help="full and/or random (Triton only), comma-separated")
    parser.add_argument("--configs", type=parse_configs, default=parse_configs(DEFAULT_CONFIGS),
                        help=f"Triton configs block_b:block_h:block_k:num_warps:precision[:num_stages] "
                             f"(default {DEFAULT_CONFIGS})")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--check_steps", type=int, default=64, help="T of the correctness checks")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (--device cpu with TRITON_INTERPRET=1 only smoke-tests it)")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    hiddens = [int(h) for h in args.hidden.split(",")]
    steps_list = [int(t) for t in args.steps.split(",")]
    dtypes = args.dtypes.split(",")
    length_kinds = args.lengths.split(",")
    settings = vars(args) | {"configs": [c.as_dict() for c in args.configs]}
    report: dict[str, Any] = {"environment": environment(device), "settings": settings, "rows": []}
    rows: list[dict[str, Any]] = report["rows"]

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        output.write_text(json.dumps(report, indent=2))
        if row["kind"] == "time":
            print(
                f"  {row['impl']:>6} H={row['hidden']} T={row['steps']} {row['dtype']} {row['lengths']} "
                f"{row.get('config_name', '')}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms",
                flush=True,
            )

    generator = torch.Generator().manual_seed(0)
    for hidden in hiddens:  # correctness first (short sequences; also compiles every kernel variant)
        for kind in ("full", "random"):
            lengths = make_lengths(kind, args.batch, args.check_steps, generator)
            case = Case(hidden, args.batch, args.check_steps, lengths, device)
            for config in args.configs:
                row = {"kind": "check", "hidden": hidden, "steps": args.check_steps, "lengths": kind,
                       "config": config.as_dict(), "config_name": config_name(config)}  # fmt: skip
                if kind == "full" and device.type == "cuda":
                    try:  # registers, spills and load widths of the kernels, as ptxas and the PTX show them
                        major, minor = torch.cuda.get_device_capability()
                        row["ptxas"] = compile_report(hidden, config, arch=major * 10 + minor)
                    except Exception as err:
                        row["ptxas"] = {"error": f"{type(err).__name__}: {err}"[:500]}
                try:
                    row |= check(case, config, packed=kind == "random")
                except Exception as err:  # keep going: a config that fails to compile is a result too
                    row["error"] = f"{type(err).__name__}: {err}"[:2000]
                    print(f"check failed for {config_name(config)}: {row['error']}", flush=True)
                add(row)
    for hidden in hiddens:
        for steps in steps_list:
            for dtype in dtypes:
                for kind in length_kinds:
                    case = Case(hidden, args.batch, steps, make_lengths(kind, args.batch, steps, generator), device)
                    base = {"kind": "time", "hidden": hidden, "steps": steps, "batch": args.batch, "dtype": dtype,
                            "lengths": kind, "mean_length": case.lengths.float().mean().item()}  # fmt: skip
                    cudnn_ms = None
                    if kind == "full":
                        timing = measure(case, lambda x, w, c=case: run_cudnn(c, x, w, False), dtype, args.warmup,
                                         args.iters)  # fmt: skip
                        cudnn_ms = timing["fwd_bwd_ms"]
                        add(base | {"impl": "cudnn"} | timing)
                    for config in args.configs:
                        row = base | {"impl": "triton", "config": config.as_dict(), "config_name": config_name(config)}
                        try:
                            timing = measure(case, lambda x, w, c=case, k=config: run_triton(c, x, w, k), dtype,
                                             args.warmup, args.iters)  # fmt: skip
                        except Exception as err:
                            print(f"timing failed for {config_name(config)}: {err}", flush=True)
                            add(row | {"kind": "error", "error": f"{type(err).__name__}: {err}"[:2000]})
                            continue
                        if cudnn_ms is not None:
                            timing["speedup_vs_cudnn"] = cudnn_ms / timing["fwd_bwd_ms"]
                        add(row | timing)
                    del case
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    print()
    print_table(rows)
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
