"""The language model of ULMFiT-style pretraining (embedding -> LSTM -> tied decoder), and ``init_from``: a
classifier started from a pretrained language model's embedding and LSTM weights. The pretraining loop is
:mod:`sentiment.pretrain`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from sentiment import persistent
from sentiment.model import CheckpointError, LSTMClassifier, load_checkpoint, lstm_layers, unshare_storage
from sentiment.persistent import persistent_layer, runs_here
from sentiment.prepare import PreparedData


class LSTMLanguageModel(
    nn.Module, PyTorchModelHubMixin, library_name="sentiment-lstm", tags=["language-model", "lstm", "imdb"]
):
    """Embedding -> LSTM -> projection to the embedding size -> logits through the (tied) embedding matrix.

    ``rnn_input``: ``auto`` runs the LSTM as one ``torch.lstm`` call (cuDNN on GPU); ``persistent`` on the
    persistent kernels of :mod:`sentiment.persistent` where they can run (else ``auto``, with a warning)."""

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 50,
        hidden_dim: int = 100,
        n_layers: int = 1,
        dropout: float = 0.3,
        pad_id: int = 1,
        weight_dropout: float = 0.0,
        reverse: bool = False,
        rnn_input: str = "auto",
    ) -> None:
        super().__init__()
        if rnn_input not in ("auto", "persistent"):
            raise ValueError(f"a language model's rnn_input is auto or persistent (got {rnn_input!r})")
        self.rnn_input = rnn_input
        self.pad_id = pad_id
        self.reverse = reverse  # trained on the text read backwards (token_streams); init_from checks it
        self.weight_dropout = weight_dropout
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(
            embedding_dim, hidden_dim, num_layers=n_layers, dropout=dropout if n_layers > 1 else 0.0, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(hidden_dim, embedding_dim)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))
        self.register_state_dict_post_hook(unshare_storage)  # cuDNN's flat weight buffer: see unshare_storage

    def forward(
        self, input_ids: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Next-word logits (B x T x vocab) for ``input_ids`` (B x T), and the LSTM state after the last step."""
        embedded = self.dropout(self.embedding(input_ids))
        lstm = self.lstm
        if state is None:
            zeros = embedded.new_zeros(lstm.num_layers, embedded.shape[0], lstm.hidden_size)
            state = (zeros, zeros)
        drop = self.weight_dropout if self.training else 0.0  # DropConnect on hidden-to-hidden matrices (AWD-LSTM)
        weights = [  # nn.LSTM's parameter order is torch.lstm's: per layer w_ih, w_hh, b_ih, b_hh
            F.dropout(weight, drop, True) if drop > 0 and name.startswith("weight_hh") else weight
            for name, weight in lstm.named_parameters()
        ]
        if self.rnn_input == "persistent" and runs_here(self, lstm.hidden_size, embedded.device):
            outputs, state = self._persistent_layers(embedded, state, weights)
        else:
            outputs, *new_state = lstm_layers(
                embedded, state, weights, train=self.training, num_layers=lstm.num_layers, dropout=lstm.dropout
            )
            state = tuple(new_state)
        features = self.dropout(self.projection(outputs))
        return F.linear(features, self.embedding.weight, self.decoder_bias), state

    def _persistent_layers(
        self, embedded: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], weights: list[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """What ``lstm_layers`` returns, layer by layer on the persistent kernels (every row runs all steps)."""
        batch, steps, _ = embedded.shape
        lengths = torch.full((batch,), steps, device=embedded.device, dtype=torch.int32)
        layers = self.lstm.num_layers
        stack = persistent.STACK_LAYERS and layers > 1
        if stack and persistent.stack_plan_exists(layers, self.lstm.hidden_size, embedded.device):
            layer_weights = [weights[4 * layer : 4 * layer + 4] for layer in range(layers)]
            dropout = self.lstm.dropout if self.training else 0.0
            return persistent.persistent_stack(embedded, layer_weights, lengths, dropout, state)
        layer_input, finals = embedded, []
        for layer in range(self.lstm.num_layers):
            if layer > 0 and self.lstm.dropout > 0:
                layer_input = F.dropout(layer_input, self.lstm.dropout, self.training)
            layer_state = (state[0][layer : layer + 1], state[1][layer : layer + 1])
            layer_input, final = persistent_layer(layer_input, weights[4 * layer : 4 * layer + 4], lengths, layer_state)
            finals.append(final)
        return layer_input, (torch.cat([h for h, _ in finals]), torch.cat([c for _, c in finals]))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> LSTMLanguageModel:
        """Load a folder written by ``pretrain`` (or a hub id); a clear error if it cannot be read."""
        hint = "Point init_from at the best/ folder of a `sentiment pretrain` run"
        return load_checkpoint(cls, "a language model", pretrained_model_name_or_path, hint, **kwargs)


def init_from_language_model(classifier: LSTMClassifier, checkpoint: str | Path, data: PreparedData) -> None:
    """Copy a pretrained language model's embedding and LSTM weights into ``classifier``. A BiLSTM gets them in
    its forward direction; its upper layers' inputs from the backward direction start at zero, so at first the
    forward direction computes exactly the language model's features. The vocabulary and the sizes must match;
    the error says which does not."""
    language_model = LSTMLanguageModel.from_pretrained(checkpoint)
    tokenizer_file = Path(checkpoint) / "tokenizer.json"
    if (
        tokenizer_file.is_file()
        and json.loads(tokenizer_file.read_text())["model"]["vocab"]
        != json.loads(data.tokenizer.to_str())["model"]["vocab"]
    ):
        raise CheckpointError(
            f"init_from {checkpoint}: its vocabulary differs from this run's. Pretrain on the same prepared data "
            "(--prepared) or with the same data settings"
        )
    if language_model.reverse != classifier.reverse:
        direction = {True: "backwards (reverse: true)", False: "forwards (reverse: false)"}
        raise CheckpointError(
            f"init_from {checkpoint}: the language model reads reviews {direction[language_model.reverse]} and this "
            f"classifier {direction[classifier.reverse]}; set reverse: {str(language_model.reverse).lower()} or "
            "start from a language model pretrained in this direction"
        )
    lm, cl = language_model.lstm, classifier.lstm
    for name, lm_size, cl_size in (
        ("embedding size", language_model.embedding.weight.shape, classifier.embedding.weight.shape),
        ("hidden_dim", lm.hidden_size, cl.hidden_size),
        ("n_layers", lm.num_layers, cl.num_layers),
    ):
        if lm_size != cl_size:
            raise CheckpointError(f"init_from {checkpoint}: {name} is {lm_size} there and {cl_size} here")
    with torch.no_grad():
        classifier.embedding.weight.copy_(language_model.embedding.weight)
        for layer in range(lm.num_layers):
            for kind in ("weight_hh", "bias_ih", "bias_hh"):
                getattr(cl, f"{kind}_l{layer}").copy_(getattr(lm, f"{kind}_l{layer}"))
            source, target = getattr(lm, f"weight_ih_l{layer}"), getattr(cl, f"weight_ih_l{layer}")
            if target.shape == source.shape:
                target.copy_(source)
            else:  # a BiLSTM's upper layer also reads the backward direction: start it from the forward one alone
                target[:, : source.shape[1]].copy_(source)
                target[:, source.shape[1] :].zero_()
