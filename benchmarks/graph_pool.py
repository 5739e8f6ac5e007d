"""How much GPU memory CUDA graphs of many batch shapes hold in one shared pool: one eager training step of the
longest batch, then ``GraphedTrainStep.capture`` of ten shapes, one at a time, largest first, with the reserved
memory after each (the BiLSTM of ``configs/bilstm.yaml``, synthetic token ids, every row full length).

    python -m benchmarks.graph_pool                                        # the default allocator
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python -m benchmarks.graph_pool

Results: ``benchmarks/results/h100-2026-12-07/graph-pool.txt``.
"""

from __future__ import annotations

import torch

from sentiment.batching import bucket_length
from sentiment.graphs import GraphedTrainStep, dummy_batch, train_step, unchanged
from sentiment.model import LSTMClassifier

GiB = 2**30
LONGEST = 2137  # the longest training review of IMDB's train split (spaCy tokens)


def main() -> None:
    """Print the eager step's peak, then the pool after each capture."""
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = LSTMClassifier(20002, 50, 150, 2, True, dropout=0.5, rnn_input="fused").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    largest = (128, bucket_length(LONGEST))
    torch.cuda.reset_peak_memory_stats()
    with unchanged(model, optimizer):
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        train_step(model, optimizer, dummy_batch(largest, 1, device), totals, 1.0)
    print(f"eager step {largest[0]}x{largest[1]}: peak alloc {torch.cuda.max_memory_allocated() / GiB:.2f} "
          f"reserved {torch.cuda.max_memory_reserved() / GiB:.2f}")  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step = GraphedTrainStep(model, optimizer, 1.0)
    for length in (LONGEST, 1500, 1000, 700, 500, 350, 250, 180, 120, 60):
        shape = (128, bucket_length(length))
        step.capture([shape])
        reserved, peak = torch.cuda.memory_reserved() / GiB, torch.cuda.max_memory_reserved() / GiB
        allocated = torch.cuda.memory_allocated() / GiB
        print(f"after {shape} reserved now {reserved:.2f} peak {peak:.2f} alloc {allocated:.2f}")


if __name__ == "__main__":
    main()
