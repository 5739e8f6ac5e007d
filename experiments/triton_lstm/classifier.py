"""The sentiment classifier on the Triton LSTM: ``sentiment.model.LSTMClassifier`` with its LSTM run by
:func:`triton_lstm.triton_lstm_layers` on the model's own weights. The package's classifier has no Triton path;
this wrapper gives the experiment one without changing the package.

    with triton_path(model):
        logits = model(input_ids, lengths)  # embedding, dropout, pooling and head as usual; the LSTM in Triton
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from triton_lstm import TritonLSTMConfig, triton_lstm_layers

from sentiment.model import LSTMClassifier


def triton_final(
    model: LSTMClassifier, embedded: torch.Tensor, lengths: torch.Tensor, config: TritonLSTMConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the classifier's LSTM paths return for the embedded batch (B x T x E): the top layer's outputs
    (B x T x D*H, zeros past each review's length) and each review's final state (B x D*H: the forward
    direction's at its last real token, the backward direction's at its first). DropConnect and the dropout
    between layers apply in training, as on the package's paths. ``truncate_bptt`` cannot: a Triton layer runs
    each review in one call."""
    if model.training and model.truncate_bptt > 0:
        raise ValueError(
            "truncate_bptt needs the package's padded or fused path (a Triton layer runs each review in one call)"
        )
    lstm = model.lstm
    weights = [weight for layer in range(lstm.num_layers) for weight in model._layer_weights(layer)]
    outputs, hidden, _ = triton_lstm_layers(
        embedded, lengths, weights, lstm.num_layers, lstm.bidirectional,
        dropout=lstm.dropout, train=model.training, config=config, validate=False,
    )  # fmt: skip
    if lstm.bidirectional:
        return outputs, torch.cat([hidden[-2], hidden[-1]], dim=-1)
    return outputs, hidden[-1]


@contextlib.contextmanager
def triton_path(model: LSTMClassifier, config: TritonLSTMConfig | None = None) -> Iterator[LSTMClassifier]:
    """Within the block, ``model(input_ids, lengths)`` runs its LSTM on the Triton layers: the model takes its
    ``padded`` path, whose LSTM step is replaced by :func:`triton_final` (everything else in ``forward`` runs as
    it is). Afterwards the model is as it was."""
    saved = model.rnn_input
    model.rnn_input = "padded"
    model._padded_final = functools.partial(triton_final, model, config=config)
    try:
        yield model
    finally:
        del model._padded_final
        model.rnn_input = saved
