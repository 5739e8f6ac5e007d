"""Where a training epoch's GPU time goes: one eager epoch of a config on its prepared data, every step timed with
CUDA events (time against batch length and tokens), then ``torch.profiler`` over a dozen steps spread across the
lengths, its CUDA kernels summed by name and by kind (the recurrence, run once per time step; the rest).

    python -m benchmarks.profile_step --config configs/bilstm.yaml --prepared prepared/imdb \\
        --output benchmarks/results/h100-2026-12-07/bilstm-profile.md

Steps run eagerly, the trainer's ``train_step`` on the trainer's fixed-shape batches (``max_step_tokens`` as the
config says): the same kernels a CUDA graph replays, without the launch overhead graphs remove. Hand-written
because the profiler gives kernels, not what share of an epoch the recurrence takes at each batch length.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.kernel_flags import add_kernel_flags, apply_kernel_flags
from sentiment.batching import make_dataloader
from sentiment.config import build_config
from sentiment.files import write_atomic
from sentiment.graphs import train_step
from sentiment.optim import build_optimizer
from sentiment.prepare import PreparedData
from sentiment.training import build_model


def kind_of(kernel: str, calls_per_step: float) -> str:
    """The kind of a CUDA kernel, from its name and how often one training step launches it: cuDNN's own RNN
    kernels, the persistent path's (``lstm_forward``, ``lstm_backward``) and anything launched hundreds of times a
    step (once per time step: cuDNN's backward recurrent matrix products) are the recurrence."""
    name = kernel.lower()
    if calls_per_step >= 100 or any(sign in name for sign in ("rnn", "lstm")):
        return "recurrence"
    if any(sign in name for sign in ("gemm", "cutlass", "xmma")):
        return "other matrix products"
    return "other"


def profile_epoch(config: str, prepared: str, profiled_steps: int = 12, **overrides: Any) -> str:
    """One eager epoch of ``config`` (with ``overrides``) on ``prepared`` timed per step, then ``profiled_steps``
    steps profiled; the report as Markdown."""
    device = torch.device("cuda", 0)
    cfg = build_config(config, {"prepared": prepared, "cuda_graphs": False, **overrides})
    data = PreparedData.load(prepared)
    resolved, embeddings = data.resolve(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, resolved, data, embeddings).to(device).train()
    optimizer = build_optimizer(cfg, model, False, device)
    loader = make_dataloader(data.splits["train"], cfg.batch_size, data.info["pad_id"], train=True, seed=cfg.seed,
                             fixed_shapes=True)  # fmt: skip
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in loader]

    def step(batch: dict[str, torch.Tensor]) -> None:
        train_step(model, optimizer, batch, totals, cfg.max_grad_norm, chunk_tokens=cfg.max_step_tokens)
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:3]:  # cuDNN plans, allocator warm-up
        step(batch)
    timings = []  # (length, tokens, ms)
    for batch in batches:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(batch)
        end.record()
        end.synchronize()
        rows, length = batch["input_ids"].shape
        timings.append((length, rows * length, start.elapsed_time(end)))
    by_length = sorted(range(len(batches)), key=lambda i: batches[i]["input_ids"].shape[1])
    chosen = [by_length[round(q * (len(by_length) - 1) / (profiled_steps - 1))] for q in range(profiled_steps)]
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for index in chosen:
            step(batches[index])
        torch.cuda.synchronize(device)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name -> [ms, calls]
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            kernels[event.key][0] += event.device_time_total / 1000
            kernels[event.key][1] += event.count
    return _report(config, timings, kernels, len(chosen), torch.cuda.get_device_name(device))


def _report(config: str, timings: list[tuple[int, int, float]], kernels: dict[str, list[float]], profiled: int,
            device: str) -> str:  # fmt: skip
    epoch_ms = sum(ms for _, _, ms in timings)
    lines = [f"# Eager training epoch of `{config}`: {device}, torch {torch.__version__}", "",
             f"{len(timings)} steps, {epoch_ms / 1000:.2f} s of GPU time (eager; CUDA graphs remove launch gaps, "
             "not kernel time).", "", "## Step time by batch length", "",
             "| length (bucketed) | steps | tokens per step | ms per step (median) | ms per 1k tokens | share |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    groups: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for length, tokens, ms in timings:
        groups[length].append((tokens, ms))
    for length in sorted(groups):
        steps = groups[length]
        median = statistics.median(ms for _, ms in steps)
        share = sum(ms for _, ms in steps) / epoch_ms
        lines.append(f"| {length} | {len(steps)} | {steps[0][0]:,} | {median:.1f} | "
                     f"{1000 * median / steps[0][0]:.3f} | {100 * share:.1f}% |")  # fmt: skip
    kernel_ms = sum(ms for ms, _ in kernels.values())
    kinds = {name: kind_of(name, calls / profiled) for name, (_, calls) in kernels.items()}
    by_kind: dict[str, float] = defaultdict(float)
    for name, (ms, _) in kernels.items():
        by_kind[kinds[name]] += ms
    lines += ["", f"## CUDA kernels over {profiled} steps spread across the lengths ({kernel_ms:.0f} ms)", "",
              "| kind | ms | share |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {kind} | {ms:.1f} | {100 * ms / kernel_ms:.1f}% |" for kind, ms in sorted(by_kind.items(),
              key=lambda item: -item[1])]  # fmt: skip
    lines += ["", "| kernel | kind | ms | share | calls per step | µs per call |", "|---|---|---|---|---|---|"]
    for name, (ms, calls) in sorted(kernels.items(), key=lambda item: -item[1][0])[:15]:
        lines.append(f"| `{name[:90]}` | {kinds[name]} | {ms:.1f} | {100 * ms / kernel_ms:.1f}% | "
                     f"{calls / profiled:.0f} | {1000 * ms / calls:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    """Profile a config's epoch and write the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bilstm.yaml")
    parser.add_argument("--prepared", required=True, help="prepared data folder of the config")
    parser.add_argument("--steps", type=int, default=12, help="steps profiled, spread across the batch lengths")
    parser.add_argument("--rnn_input", default="auto", help="the config's rnn_input (auto: fused on a GPU)")
    parser.add_argument("--max_step_tokens", type=int, default=131072, help="0: batches never split")
    add_kernel_flags(parser)
    parser.add_argument("--output", type=Path, required=True, help="Markdown report")
    args = parser.parse_args()
    apply_kernel_flags(parser, args)
    overrides = {"rnn_input": args.rnn_input, "max_step_tokens": args.max_step_tokens or None}
    report = profile_epoch(args.config, args.prepared, args.steps, **overrides)
    write_atomic(args.output, report)
    print(report)


if __name__ == "__main__":
    main()
