"""Where a training step's time goes: ``torch.profiler`` over real training steps of a config and path, eager
(so every kernel is visible), on the longest batches and on typical ones.

    python -m benchmarks.profile_step --prepared prepared/imdb --config configs/bilstm.yaml --rnn_input padded \
        --steps 20 --output benchmarks/results/profile-bilstm-padded

Writes ``<output>.txt`` (the kernel table sorted by GPU time, with the step count to divide by) and
``<output>.json`` (steps, seconds per step, and the top kernels with their share of GPU time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sentiment.batching import PadCollator
from sentiment.config import build_config
from sentiment.model import LSTMClassifier
from sentiment.prepare import PreparedData


def main() -> None:
    """Profile ``--steps`` training steps and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--rnn_input", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    cfg = build_config(args.config, {"rnn_input": args.rnn_input})
    data = PreparedData.load(args.prepared)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = LSTMClassifier(
        data.tokenizer.get_vocab_size(), data.info["embedding_dim"], cfg.hidden_dim, cfg.n_layers,
        cfg.bidirectional, cfg.dropout, data.info["pad_id"], rnn_input=args.rnn_input,
    ).to(device)  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train = data.splits["train"]
    order = np.argsort(train.lengths)
    median_start = len(order) // 2
    # Typical batches (around the median length), as most of an epoch is.
    batches = [order[median_start + i * cfg.batch_size : median_start + (i + 1) * cfg.batch_size]
               for i in range(args.steps)]  # fmt: skip
    collate = PadCollator(data.info["pad_id"])
    inputs = [collate([train[int(i)] for i in batch]) for batch in batches]

    def step(batch: dict[str, torch.Tensor]) -> None:
        logits = model(batch["input_ids"].to(device), batch["lengths"])
        loss = F.binary_cross_entropy_with_logits(logits, batch["labels"].to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for batch in inputs[:3]:  # warm-up
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for batch in inputs:
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort_key, row_limit=30)
    lengths = [int(b["input_ids"].shape[1]) for b in inputs]
    per_step = f"{seconds / len(inputs) * 1e3:.2f} ms per step (profiled)"
    header = (
        f"{args.config}, rnn_input {args.rnn_input}, {len(inputs)} steps of batch {cfg.batch_size}, "
        f"lengths {min(lengths)}-{max(lengths)}, {per_step}\n"
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".txt").write_text(header + table)
    # Self time counts each kernel (GPU) or operator (CPU) once; totals would count parents and children both.
    device_attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(a, device_attr) for a in averages)
    top = sorted(averages, key=lambda a: getattr(a, device_attr), reverse=True)[:15]
    summary = {
        "config": args.config,
        "rnn_input": args.rnn_input,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "steps": len(inputs),
        "tokens_per_row": lengths,
        "ms_per_step": seconds / len(inputs) * 1e3,
        "top": [
            {
                "name": a.key[:120],
                "calls": a.count,
                "us_total": getattr(a, device_attr),
                "share": getattr(a, device_attr) / total if total else None,
            }
            for a in top
        ],
    }
    output.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(header + table)


if __name__ == "__main__":
    main()
