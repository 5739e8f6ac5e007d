"""The model: embedding -> (Bi)LSTM -> final hidden state (or pooled outputs) -> dropout -> linear -> one logit."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sentiment import persistent
from sentiment.persistent import persistent_layer, preferred, runs_here

RNN_INPUTS = ("auto", "packed", "padded", "fused", "persistent")
POOLINGS = ("last", "max", "mean", "concat")
# Added to the input gate's pre-activation at padding by the fused BiLSTM path: sigmoid(-1e4) is exactly 0 in
# float16/32/64 (no weight a trained LSTM reaches can lift it back), and -1e4 is representable in float16.
CLOSED_GATE = 1e4


def bf16_autocast(device_type: str) -> bool:
    """Whether a bfloat16 autocast is on for ``device_type``."""
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


def lstm_layers(
    inputs: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    weights: list[torch.Tensor],
    *,
    train: bool,
    num_layers: int = 1,
    dropout: float = 0.0,
    bidirectional: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.lstm`` (batch first, with biases; ``weights`` in its order) returning (outputs, h, c), in bfloat16
    under a bfloat16 autocast. PyTorch's autocast runs cuDNN's LSTM in float16 whatever the autocast dtype (its
    AutocastRNN wrapper), which overflows without a gradient scaler: a large LSTM fine-tuned under ``bf16`` had
    infinite gradients in most steps. Here the LSTM gets the range the user asked for. ``train`` has no default:
    cuDNN keeps what its backward pass needs only in training mode (``train=False`` then fails in backward)."""
    with warnings.catch_warnings():
        # The fused path's weights carry an extra input column, DropConnect's are dropped copies: not nn.LSTM's
        # flat buffer, so cuDNN packs them into one at each call. That copies the weights (a few MB), not
        # activations; cuDNN's warning that it may "greatly increase memory usage" does not apply.
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk")
        if bf16_autocast(inputs.device.type):
            with torch.autocast(inputs.device.type, enabled=False):
                bf16 = torch.bfloat16
                return torch.lstm(
                    inputs.to(bf16), tuple(s.to(bf16) for s in state), [w.to(bf16) for w in weights],
                    True, num_layers, dropout, train, bidirectional, True,
                )  # fmt: skip
        return torch.lstm(inputs, state, weights, True, num_layers, dropout, train, bidirectional, True)


def reverse_within_lengths(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """Gather indices (B x ``steps``) that reverse each row within its length and leave the padding after it in
    place (their own inverse)."""
    positions = torch.arange(steps, device=lengths.device).unsqueeze(0)
    last = (lengths - 1).unsqueeze(1)
    return torch.where(positions <= last, last - positions, positions)


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the problem and the fix."""


def unshare_storage(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Give every tensor of the state dict its own storage (a ``register_state_dict_post_hook`` hook).

    On GPU, cuDNN packs all LSTM weights into one flat buffer, so the parameters are views of one storage;
    safetensors then refuses to save them (``save_pretrained``) and Accelerate's ``save_state`` would drop all but
    one as "shared". Copies of a few MB make both save every weight.
    """
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() > tensor.nbytes:
            state_dict[name] = tensor.detach().clone()


def load_checkpoint(cls: type, what: str, path: str | Path, hint: str, **kwargs: Any) -> Any:
    """``PyTorchModelHubMixin.from_pretrained`` for ``cls`` (a folder or hub id), with stdout kept for results;
    any failure becomes a ``CheckpointError`` naming ``what`` could not be loaded, why, and ``hint``."""
    try:
        # huggingface_hub prints "Loading weights from local directory" to stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            return PyTorchModelHubMixin.from_pretrained.__func__(cls, path, **kwargs)
    except Exception as err:
        raise CheckpointError(
            f"could not load {what} from {path} ({type(err).__name__}: {str(err)[:300]}). {hint}"
        ) from err


class LSTMClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="sentiment-lstm",
    tags=["text-classification", "sentiment-analysis", "lstm", "imdb"],
    license="apache-2.0",
):
    """An LSTM (or BiLSTM) binary sentiment classifier over word ids.

    ``save_pretrained`` writes ``model.safetensors`` and ``config.json`` (these constructor arguments);
    ``from_pretrained`` rebuilds the model from them, from a folder or a hub id. ``lowercase`` and
    ``max_length`` are not used by the network: they record the preprocessing the checkpoint expects
    (``tokenizer.json`` beside it applies them).

    ``rnn_input`` picks how the LSTM sees a padded batch; all give the same result:
    ``packed`` runs ``nn.LSTM`` on ``pack_padded_sequence`` (cuDNN's packed kernels on GPU); ``padded`` runs each
    layer and direction on the padded tensor, the backward direction on a copy reversed within each review's
    length, and reads each review's state at its true last token (PyTorch's CPU backward through packed
    sequences of unequal lengths grows quadratically with the length; this path does not). ``fused`` runs one
    cuDNN call per layer, both directions at once, on the padded tensor (no packing, so no per-step host work, and
    the whole batch shape is fixed, which CUDA graphs need); for a BiLSTM an extra input column marks the padding
    and closes the input gate there, so the backward direction, which meets the padding first, keeps a zero
    state until the review's last token. ``persistent`` (NVIDIA GPUs, :mod:`sentiment.persistent`): the input
    projections as one matrix product per layer, then a kernel that runs each review's whole recurrence in one
    thread block, ``W_hh`` in shared memory (in bfloat16 above ~110 hidden units); where it cannot run (CPU,
    large ``hidden_dim``) the model warns once and takes ``auto``'s path. ``auto``: on a GPU, persistent where
    :func:`sentiment.persistent.preferred` says it is the faster path (Hopper GPUs, ``hidden_dim`` above 128: the
    BiLSTM config trains 3x faster there), else fused; padded on CPU.
    A checkpoint whose config.json says ``triton`` (the Triton LSTM, now in experiments/triton_lstm) loads with
    ``auto`` and a warning: every path gives the same result.

    ``truncate_bptt`` N > 0 (ULMFiT's truncated backpropagation; padded and fused paths): in training, each LSTM
    call runs over the review in chunks of N steps, each chunk starting from the previous one's final state
    detached, so gradients flow back through at most N steps of the recurrence; the logits are unchanged. The
    backward direction of the padded path is chunked on its copy reversed within each review, so its chunks count
    from each review's own last token. One fused call cannot chunk two directions in opposite orders, so a BiLSTM
    trains on the padded path then. In evaluation nothing is chunked.

    ``reverse``: each review is read backwards (its tokens reversed within its length before the embedding), the
    backward model of ULMFiT's forward + backward pair.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 50,
        hidden_dim: int = 100,
        n_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.5,
        pad_id: int = 1,
        freeze_embeddings: bool = False,
        lowercase: bool = False,
        max_length: int | None = None,
        rnn_input: str = "auto",
        pooling: str = "last",
        embedding_dropout: float = 0.0,
        weight_dropout: float = 0.0,
        truncate_bptt: int = 0,
        reverse: bool = False,
    ) -> None:
        super().__init__()
        if rnn_input == "triton":
            warnings.warn(
                "rnn_input 'triton' is no longer a path of the package (the Triton LSTM is in "
                "experiments/triton_lstm); this model runs with rnn_input 'auto', which computes the same function",
                stacklevel=2,
            )
            rnn_input = "auto"
            if isinstance(self._hub_mixin_config, dict):  # what save_pretrained writes to config.json
                self._hub_mixin_config["rnn_input"] = rnn_input
        if rnn_input not in RNN_INPUTS:
            raise ValueError(f"rnn_input must be one of {RNN_INPUTS} (got {rnn_input!r})")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS} (got {pooling!r})")
        if truncate_bptt != 0 and truncate_bptt < 2:
            raise ValueError(f"truncate_bptt must be 0 (off) or >= 2 steps (got {truncate_bptt})")
        self.truncate_bptt = truncate_bptt
        self.reverse = reverse
        self.rnn_input = rnn_input
        self.pooling = pooling
        self.embedding_dropout = embedding_dropout
        self.weight_dropout = weight_dropout
        self.pad_id = pad_id
        self.lowercase = lowercase
        self.max_length = max_length
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.embedding.weight.requires_grad_(not freeze_embeddings)
        self.lstm = nn.LSTM(
            embedding_dim,
            hidden_dim,
            num_layers=n_layers,
            bidirectional=bidirectional,
            dropout=dropout if n_layers > 1 else 0.0,
            batch_first=True,
        )
        self.dropout = nn.Dropout(dropout)
        features = hidden_dim * (2 if bidirectional else 1) * (3 if pooling == "concat" else 1)
        self.classifier = nn.Linear(features, 1)
        self.register_state_dict_post_hook(unshare_storage)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> LSTMClassifier:
        """Load a checkpoint folder (``model.safetensors`` + ``config.json``) or hub id; a clear error if it
        cannot be read."""
        hint = (
            "Point at a folder written by training (runs/NAME/best, holding model.safetensors and config.json) or "
            "at a hub id you can reach; re-create a damaged checkpoint by training again"
        )
        return load_checkpoint(cls, "an LSTMClassifier", pretrained_model_name_or_path, hint, **kwargs)

    def load_embeddings(self, weight: torch.Tensor) -> None:
        """Copy pretrained vectors (vocab_size x embedding_dim) into the embedding."""
        if weight.shape != self.embedding.weight.shape:
            raise ValueError(
                f"embedding matrix has shape {tuple(weight.shape)}, the model expects "
                f"{tuple(self.embedding.weight.shape)}"
            )
        with torch.no_grad():
            self.embedding.weight.copy_(weight)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B,) for right-padded ``input_ids`` (B x T) whose true lengths are ``lengths`` (B, any device)."""
        if self.reverse:  # each review backwards, still right-padded
            input_ids = input_ids.gather(1, reverse_within_lengths(lengths.to(input_ids.device), input_ids.shape[1]))
        embedded = self.embedding(input_ids)
        if self.embedding_dropout > 0 and self.training:  # drop whole words (the same word vector in all places)
            keep = F.dropout(embedded.new_ones(*input_ids.shape, 1), self.embedding_dropout, True)
            embedded = embedded * keep
        embedded = self.dropout(embedded)
        path = self.rnn_input
        truncating = self.truncate_bptt > 0 and self.training
        if path == "auto":  # measured on an H100, an H200 and on 2 CPU cores (docs/benchmarks.md)
            path = "fused" if embedded.is_cuda else "padded"
            if path == "fused" and not truncating and preferred(self.lstm.hidden_size, embedded.device):
                path = "persistent"
        if truncating and path == "packed":
            raise ValueError(
                f"truncate_bptt needs rnn_input auto, padded or fused (rnn_input {path} runs each review in one call)"
            )
        if path == "persistent":
            why_not = "truncate_bptt chunks the recurrence, which the kernel runs whole" if truncating else None
            if not runs_here(self, self.lstm.hidden_size, embedded.device, why_not):
                path = "fused" if embedded.is_cuda else "padded"
        if truncating and path == "fused" and self.lstm.bidirectional:
            path = "padded"  # one fused call cannot chunk both directions (they run in opposite orders)
        if path == "packed":
            if self.weight_dropout > 0 and self.training:
                raise ValueError("weight_dropout needs rnn_input padded or fused (nn.LSTM keeps its own weights)")
            outputs, final = self._packed_final(embedded, lengths)
        elif path == "fused":
            outputs, final = self._fused_final(embedded, lengths)
        elif path == "persistent":
            outputs, final = self._persistent_final(embedded, lengths)
        else:
            outputs, final = self._padded_final(embedded, lengths)
        return self.classifier(self.dropout(self._pool(outputs, final, lengths))).squeeze(-1)

    def _pool(self, outputs: torch.Tensor, final: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The review's features: the final states (``last``), or the maximum or mean of the top layer's outputs
        over the review's real tokens, or all three (``concat``)."""
        if self.pooling == "last":
            return final
        lengths = lengths.to(outputs.device)
        real = (torch.arange(outputs.shape[1], device=outputs.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
        pooled = []
        if self.pooling in ("max", "concat"):
            pooled.append(outputs.masked_fill(~real, float("-inf")).amax(dim=1))
        if self.pooling in ("mean", "concat"):
            pooled.append((outputs * real).sum(dim=1) / lengths.unsqueeze(1).to(outputs.dtype))
        return torch.cat([final, *pooled], dim=-1) if self.pooling == "concat" else pooled[0]

    def _packed_final(self, embedded: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bf16_autocast(embedded.device.type):
            embedded = embedded.float()  # not float16 (see lstm_layers): the packed path runs in float32 then
            autocast = torch.autocast(embedded.device.type, enabled=False)
        else:
            autocast = contextlib.nullcontext()
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        with autocast:
            output, (hidden, _) = self.lstm(packed)
        outputs = pad_packed_sequence(output, batch_first=True, total_length=embedded.shape[1])[0]
        if self.lstm.bidirectional:
            return outputs, torch.cat([hidden[-2], hidden[-1]], dim=-1)
        return outputs, hidden[-1]

    def _layer_weights(self, layer: int, directions: tuple[str, ...] | None = None) -> list[torch.Tensor]:
        """The weights of one layer, both directions (or ``directions``: "" and/or "_reverse"), in ``torch.lstm``'s
        order; in training, the hidden-to-hidden matrices with ``weight_dropout`` applied (DropConnect: one mask
        per batch, the same at every time step)."""
        if directions is None:
            directions = ("", "_reverse") if self.lstm.bidirectional else ("",)
        weights = []
        for suffix in directions:
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                weight = getattr(self.lstm, f"{name}_l{layer}{suffix}")
                if name == "weight_hh" and self.weight_dropout > 0:
                    weight = F.dropout(weight, self.weight_dropout, self.training)
                weights.append(weight)
        return weights

    def _lstm_outputs(
        self,
        sequence: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        weights: list[torch.Tensor],
        bidirectional: bool = False,
    ) -> torch.Tensor:
        """The outputs of ``lstm_layers`` over ``sequence`` (B x T x features) from ``state``. In training with
        ``truncate_bptt`` N, chunk by chunk along time (N steps, the last chunk shorter), each chunk starting from
        the previous one's final (h, c) detached: the same outputs, but gradients flow back through at most N steps
        of the recurrence. The chunks come from the tensor's shape alone (no host synchronisation: CUDA graphs
        capture this). Both directions of one call run in opposite orders and cannot be chunked together."""
        chunk = self.truncate_bptt if self.training else 0
        steps = sequence.shape[1]
        if chunk == 0 or steps <= chunk:
            return lstm_layers(sequence, state, weights, train=self.training, bidirectional=bidirectional)[0]
        if bidirectional:
            raise ValueError("truncate_bptt cannot chunk both directions of one LSTM call; run them one by one")
        outputs = []
        for start in range(0, steps, chunk):
            output, hidden, cell = lstm_layers(sequence[:, start : start + chunk], state, weights, train=self.training)
            outputs.append(output)
            state = (hidden.detach(), cell.detach())
        return torch.cat(outputs, dim=1)

    def _fused_final(self, embedded: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, steps, _ = embedded.shape
        lengths = lengths.to(embedded.device)
        hidden_size = self.lstm.hidden_size
        bidirectional = self.lstm.bidirectional
        if bidirectional:
            # One more input column, 1 at padding, whose fixed weight (-CLOSED_GATE on the input gate, 0 elsewhere)
            # shuts the input gate there: a direction that starts on padding keeps state (h, c) = (0, 0), exactly,
            # until the review's last token, as if the padding were not there; the padding steps also pass back no
            # gradient (every gate derivative there is multiplied by i = 0 or c = 0).
            positions = torch.arange(steps, device=embedded.device).unsqueeze(0)
            padding = (positions >= lengths.unsqueeze(1)).unsqueeze(-1).to(embedded.dtype)
            gate_column = embedded.new_zeros(4 * hidden_size, 1)
            gate_column[:hidden_size] = -CLOSED_GATE
        zeros = embedded.new_zeros(2 if bidirectional else 1, batch, hidden_size)
        layer_input = embedded
        for layer in range(self.lstm.num_layers):
            if layer > 0 and self.lstm.dropout > 0:
                layer_input = F.dropout(layer_input, self.lstm.dropout, self.training)
            weights = self._layer_weights(layer)
            if bidirectional:
                layer_input = torch.cat([layer_input, padding], dim=-1)
                for index in (0, 4):  # weight_ih of each direction
                    weights[index] = torch.cat([weights[index], gate_column.to(weights[index].dtype)], dim=1)
            layer_input = self._lstm_outputs(layer_input, (zeros, zeros), weights, bidirectional)
        return layer_input, self._final_states(layer_input, lengths)

    def _final_states(self, outputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The top layer's state after each review (B x T x D*H outputs, right-padded): the forward direction's at
        the review's last token, the backward direction's at its first."""
        hidden_size = self.lstm.hidden_size
        rows = torch.arange(outputs.shape[0], device=outputs.device)
        final = outputs[rows, lengths - 1, :hidden_size]
        if self.lstm.bidirectional:
            final = torch.cat([final, outputs[:, 0, hidden_size:]], dim=-1)
        return final

    def _persistent_final(self, embedded: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = lengths.to(embedded.device)
        layers = self.lstm.num_layers
        stack = persistent.STACK_LAYERS and layers > 1 and not self.lstm.bidirectional
        if stack and persistent.stack_plan_exists(layers, self.lstm.hidden_size, embedded.device):
            # every layer in one launch, side by side (sentiment/kernels/lstm_stacked.cu)
            weights = [self._layer_weights(layer) for layer in range(layers)]
            dropout = self.lstm.dropout if self.training else 0.0
            outputs, _ = persistent.persistent_stack(embedded, weights, lengths, dropout)
            return outputs, self._final_states(outputs, lengths)
        layer_input = embedded
        for layer in range(self.lstm.num_layers):
            if layer > 0 and self.lstm.dropout > 0:
                layer_input = F.dropout(layer_input, self.lstm.dropout, self.training)
            layer_input, _ = persistent_layer(layer_input, self._layer_weights(layer), lengths)
        return layer_input, self._final_states(layer_input, lengths)

    def _padded_final(self, embedded: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, steps, _ = embedded.shape
        lengths = lengths.to(embedded.device)
        reverse_index = reverse_within_lengths(lengths, steps).unsqueeze(-1)
        directions = 2 if self.lstm.bidirectional else 1
        hidden_size = self.lstm.hidden_size
        zeros = embedded.new_zeros(1, batch, hidden_size)
        layer_input = embedded
        for layer in range(self.lstm.num_layers):
            outputs = []
            for direction in range(directions):
                weights = self._layer_weights(layer, ("_reverse" if direction else "",))
                if direction:
                    sequence = layer_input.gather(1, reverse_index.expand(-1, -1, layer_input.shape[-1]))
                else:
                    sequence = layer_input
                output = self._lstm_outputs(sequence, (zeros, zeros), weights)
                if direction:
                    output = output.gather(1, reverse_index.expand(-1, -1, hidden_size))
                outputs.append(output)
            layer_input = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
            if layer < self.lstm.num_layers - 1 and self.lstm.dropout > 0:
                layer_input = F.dropout(layer_input, self.lstm.dropout, self.training)
        return layer_input, self._final_states(layer_input, lengths)
