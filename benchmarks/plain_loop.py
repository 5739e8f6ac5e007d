"""The baseline the trainer is measured against: a plain PyTorch loop of the report's recipe.

fp32, ``cudnn.deterministic = True``, ``nn.LSTM`` on packed batches (packed on the CPU, as torchtext's
BucketIterator + ``pack_padded_sequence`` did), ``loss.item()`` and accuracy ``.item()`` after every batch. Same
prepared data, model, length-grouped batches, optimizer and hyperparameters as the trainer, so the ratio of the
two measures only how the steps are run.

    python -m benchmarks.plain_loop --prepared prepared/imdb --config configs/bilstm.yaml --epochs 1
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F

from sentiment.batching import make_dataloader
from sentiment.config import build_config
from sentiment.model import LSTMClassifier
from sentiment.prepare import PreparedData


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(
    data: PreparedData, config_path: str, epochs: int = 1, device: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """Train ``config_path``'s model on ``data`` for ``epochs`` with the plain loop; seconds and figures per
    epoch (training and validation timed separately)."""
    cfg = build_config(config_path, overrides)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(cfg.seed)
    model = LSTMClassifier(
        vocab_size=data.tokenizer.get_vocab_size(),
        embedding_dim=data.info["embedding_dim"],
        hidden_dim=cfg.hidden_dim,
        n_layers=cfg.n_layers,
        bidirectional=cfg.bidirectional,
        dropout=cfg.dropout,
        pad_id=data.info["pad_id"],
        rnn_input="packed",
    )
    if data.embeddings is not None:
        model.load_embeddings(torch.from_numpy(data.embeddings))
    model.to(torch_device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    pad_id = data.info["pad_id"]
    train_loader = make_dataloader(data.splits["train"], cfg.batch_size, pad_id, train=True, seed=cfg.seed)
    valid_loader = make_dataloader(data.splits["validation"], cfg.eval_batch_size, pad_id, train=False)
    history = []
    try:
        for epoch in range(epochs):
            train_loader.batch_sampler.set_epoch(epoch)
            model.train()
            _sync(torch_device)
            start = time.perf_counter()
            loss_sum = correct = count = 0.0
            for batch in train_loader:
                labels = batch["labels"].to(torch_device)
                logits = model(batch["input_ids"].to(torch_device), batch["lengths"])
                loss = F.binary_cross_entropy_with_logits(logits, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(labels)
                correct += ((logits > 0).float() == labels).float().sum().item()
                count += len(labels)
            _sync(torch_device)
            train_seconds = time.perf_counter() - start
            model.eval()
            valid_correct = valid_count = 0.0
            with torch.no_grad():
                for batch in valid_loader:
                    labels = batch["labels"].to(torch_device)
                    logits = model(batch["input_ids"].to(torch_device), batch["lengths"])
                    valid_correct += ((logits > 0).float() == labels).float().sum().item()
                    valid_count += len(labels)
            _sync(torch_device)
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": loss_sum / count,
                    "train_acc": correct / count,
                    "valid_acc": valid_correct / valid_count,
                    "epoch_seconds": train_seconds,
                    "eval_seconds": time.perf_counter() - start - train_seconds,
                }
            )
    finally:
        torch.backends.cudnn.deterministic = False
    return {"device": str(torch_device), "history": history}


def main() -> None:
    """Run the plain loop and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", required=True, help="folder written by `sentiment prepare`")
    parser.add_argument("--config", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    result = plain_loop(PreparedData.load(args.prepared), args.config, args.epochs, args.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
