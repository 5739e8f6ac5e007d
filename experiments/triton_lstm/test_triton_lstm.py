"""The Triton LSTM (triton_lstm.py beside this file) against nn.LSTM on packed sequences: outputs at real
positions, final states, and the gradients of the input, the weights, the biases and the initial state, in float32;
and the classifier on it (classifier.py) against the package's padded path.

No GPU here: the kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET=1 has to be set before
triton is first imported (triton.language's functions are wrapped then), so this file sets it at collection
when nothing has imported triton yet (it stays set for the rest of the pytest run; no other test uses
triton), and skips if triton came first without it. The interpreter runs a program's whole block at once with
numpy, so it checks the arithmetic, masks and indexing, not races between threads of a program on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

if "triton" not in sys.modules:  # triton.language is interpreted or compiled from its import on
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(triton.language.sigmoid, InterpretedFunction):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

import triton_lstm as tlstm  # noqa: E402
from classifier import triton_path  # noqa: E402
from triton_lstm import TritonLSTMConfig, triton_lstm, triton_lstm_layers  # noqa: E402

from sentiment.model import LSTMClassifier  # noqa: E402

LENGTHS = [7, 1, 4, 7, 3]
# Chunks of 16 so that H=20 takes two chunks (the second masked) and H=12 one masked chunk.
SMALL = TritonLSTMConfig(block_b=16, block_h=16, block_k=16)
SMALL_BF16 = dataclasses.replace(SMALL, precision="bf16")


@pytest.fixture(autouse=True)
def interpreter() -> Iterator[None]:
    """Triton's interpreter for every test here (CPU tensors)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


def reference(
    lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nn.LSTM on the packed batch, outputs padded back to x's length (zeros after each row's length)."""
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    outputs, (h_n, c_n) = lstm(packed, hx)
    outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=x.shape[1])
    return outputs, h_n, c_n


def loss_of(outputs: torch.Tensor, h_n: torch.Tensor, c_n: torch.Tensor) -> torch.Tensor:
    return (outputs**2).sum() + (h_n * c_n).sum()


def compare(
    input_size: int,
    hidden: int,
    lengths: list[int],
    bidirectional: bool,
    num_layers: int = 1,
    with_hx: bool = False,
    config: TritonLSTMConfig = SMALL,
    steps: int | None = None,
    tolerance: float | None = None,
) -> None:
    """Forward values and every gradient of the Triton LSTM match nn.LSTM's (float32, tight tolerances; or
    ``tolerance`` as rtol and atol of everything)."""
    torch.manual_seed(len(lengths) * 100 + hidden + num_layers + 7 * bidirectional)
    directions = 2 if bidirectional else 1
    batch, steps = len(lengths), steps or max(lengths)
    lstm = nn.LSTM(input_size, hidden, num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
    x = torch.randn(batch, steps, input_size, requires_grad=True)
    lengths_t = torch.tensor(lengths)
    hx = None
    if with_hx:
        hx = tuple(torch.randn(num_layers * directions, batch, hidden, requires_grad=True) for _ in range(2))
    expected = reference(lstm, x, lengths_t, hx)
    leaves = [x, *lstm._flat_weights, *(hx or ())]
    expected_grads = torch.autograd.grad(loss_of(*expected), leaves)

    weights = [w.detach().clone().requires_grad_() for w in lstm._flat_weights]
    if num_layers == 1:
        got = triton_lstm(x, lengths_t, weights, bidirectional, hx, config)
    else:
        got = triton_lstm_layers(x, lengths_t, weights, num_layers, bidirectional, hx, config=config)
    got_grads = torch.autograd.grad(loss_of(*got), [x, *weights, *(hx or ())])

    for name, want, have in zip(("outputs", "h_n", "c_n"), expected, got, strict=True):
        assert have.shape == want.shape, name
        rtol = atol = tolerance or 1e-5
        torch.testing.assert_close(have, want, rtol=rtol, atol=atol, msg=name)
    names = ["x", *lstm._flat_weights_names, *(["h0", "c0"] if with_hx else [])]
    for name, want, have in zip(names, expected_grads, got_grads, strict=True):
        rtol, atol = (tolerance, tolerance) if tolerance else (1e-4, 1e-5)
        torch.testing.assert_close(have, want, rtol=rtol, atol=atol, msg=f"gradient of {name}")


@pytest.mark.parametrize("hidden", [12, 20])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_matches_packed_nn_lstm(hidden: int, bidirectional: bool) -> None:
    compare(6, hidden, LENGTHS, bidirectional)


def test_initial_state_and_padding_beyond_the_longest_row() -> None:
    """A given (h0, c0) gets its gradient; x longer than every row (T=9 > 7) changes nothing."""
    compare(6, 20, LENGTHS, True, with_hx=True, steps=9)


def test_several_blocks_of_rows() -> None:
    """20 rows in blocks of 16: rows sorted by length across two programs, the last block partly empty."""
    lengths = [3, 11, 1, 8, 8, 2, 11, 5, 7, 4, 9, 10, 6, 1, 3, 2, 11, 5, 9, 7]
    compare(5, 20, lengths, True, config=TritonLSTMConfig(block_b=16, block_h=16, block_k=32))


def test_two_layers() -> None:
    compare(6, 12, LENGTHS, True, num_layers=2, with_hx=True)


@triton.jit
def _bf16_dot_probe(a_ptr, b_ptr, c_ptr):
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :]).to(tl.bfloat16)
    b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
    tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))


@pytest.fixture
def bf16_dots() -> Iterator[None]:
    """Makes Triton's interpreter compute ``tl.dot`` of bfloat16 operands, if it cannot already.

    The interpreter (triton 3.6) stores bfloat16 as uint16 and its ``create_dot`` converts only 8-bit float
    operands before ``np.matmul``, so a bfloat16 dot multiplies the raw bit patterns (results around 1e10;
    triton-lang/triton#11584, whose fix #11585 was declined: "we just don't support it yet"; Triton's debugging
    guide says the interpreter does not support operations on bfloat16). This fixture probes one small dot and,
    if it is wrong, wraps ``create_dot`` to widen bfloat16 operands to float32 first (exact: a bfloat16 is the
    top half of a float32), which is what the GPU's bf16 MMA computes, up to the order of the float32 sums. One
    other difference from a GPU stays: the interpreter rounds float32 -> bfloat16 casts toward zero, the GPU to
    nearest even (``cvt.rn``), so the kernel's own casts are up to 1 bfloat16 ulp worse here. Skips if the
    interpreter's internals are not what this expects.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-4, 5, (16, 16), generator=generator).float()  # exact in bfloat16: the dot is exact
    b = torch.randint(-4, 5, (16, 16), generator=generator).bfloat16()
    c = torch.empty(16, 16)
    want = a @ b.float()
    _bf16_dot_probe[(1,)](a, b, c)
    if torch.equal(c, want):
        yield  # this triton's interpreter does bfloat16 dots
        return
    from triton.runtime import interpreter as triton_interpreter

    builder = getattr(triton_interpreter, "InterpreterBuilder", None)
    handle = getattr(triton_interpreter, "TensorHandle", None)
    if builder is None or handle is None or not hasattr(builder, "create_dot"):
        pytest.skip("Triton's interpreter multiplies bfloat16 bit patterns in tl.dot and cannot be patched here")
    create_dot = builder.create_dot

    def widen(operand: Any) -> Any:
        if operand.dtype != tl.bfloat16:
            return operand
        return handle((operand.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot_bf16(self: Any, a: Any, b: Any, *args: Any) -> Any:
        return create_dot(self, widen(a), widen(b), *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builder, "create_dot", create_dot_bf16)
        _bf16_dot_probe[(1,)](a, b, c)
        if not torch.equal(c, want):
            pytest.skip("Triton's interpreter computes bfloat16 tl.dot wrongly, even with bfloat16 widened")
        yield


@pytest.mark.usefixtures("bf16_dots")
@pytest.mark.parametrize("bidirectional", [False, True])
def test_bf16_matches_packed_nn_lstm(bidirectional: bool) -> None:
    """precision="bf16" (W_hh in bfloat16, h and the gate gradients rounded to bfloat16 for the recurrent dots,
    float32 everywhere else) stays within bfloat16 tolerances of nn.LSTM: outputs, states and every gradient,
    including W_hh's (to the float32 parameter), with an initial state and padding past the longest row."""
    compare(6, 20, LENGTHS, bidirectional, with_hx=True, config=SMALL_BF16, steps=9, tolerance=2e-2)


@pytest.mark.usefixtures("bf16_dots")
def test_bf16_rounds_the_recurrent_dots() -> None:
    """bf16 is not float32 under another name: its outputs differ from ieee's, by about bfloat16's precision."""
    torch.manual_seed(1)
    lstm = nn.LSTM(4, 20, bidirectional=True, batch_first=True)
    x = torch.randn(5, 7, 4)
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        exact = triton_lstm(x, lengths, list(lstm._flat_weights), True, config=SMALL)[0]
        rounded = triton_lstm(x, lengths, list(lstm._flat_weights), True, config=SMALL_BF16)[0]
    difference = (rounded - exact).abs().max().item()
    assert 1e-6 < difference < 2e-2


def test_inference_without_grad_saves_nothing_and_matches() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 12, bidirectional=True, batch_first=True)
    x = torch.randn(5, 7, 4)
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        want = reference(lstm, x, lengths, None)
        got = triton_lstm(x, lengths, list(lstm._flat_weights), True, config=SMALL)
    for have, expected in zip(got, want, strict=True):
        torch.testing.assert_close(have, expected, rtol=1e-5, atol=1e-5)
    assert not got[0].requires_grad


def test_zero_length_row_keeps_its_initial_state() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 12, bidirectional=True, batch_first=True)
    x = torch.randn(3, 5, 4)
    h0, c0 = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    with torch.no_grad():
        outputs, h_n, c_n = triton_lstm(x, torch.tensor([5, 0, 2]), list(lstm._flat_weights), True, (h0, c0), SMALL)
    assert outputs[1].abs().max() == 0
    assert torch.equal(h_n[:, 1], h0[:, 1])
    assert torch.equal(c_n[:, 1], c0[:, 1])


def test_bad_arguments() -> None:
    lstm = nn.LSTM(4, 12, batch_first=True)
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="lengths must lie"):
        triton_lstm(x, torch.tensor([6, 2]), list(lstm._flat_weights))
    with pytest.raises(ValueError, match="weights"):
        triton_lstm(x, torch.tensor([5, 2]), list(lstm._flat_weights)[:3])
    with pytest.raises(ValueError, match="power of two"):
        TritonLSTMConfig(block_h=24)


def test_clear_errors_without_triton_or_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    lstm = nn.LSTM(4, 12, batch_first=True)
    x = torch.randn(2, 5, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_lstm(x, torch.tensor([5, 2]), list(lstm._flat_weights))
    monkeypatch.setattr(tlstm, "triton", None)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes ``import triton`` fail
    with pytest.raises(ImportError, match="pip install triton"):
        triton_lstm(x, torch.tensor([5, 2]), list(lstm._flat_weights))


@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_kernels_compile_for_h200_without_spills(precision: str) -> None:
    """Both kernels compile for sm_90 (H100/H200) with Triton's own ptxas, no GPU needed, at H=150 (the
    BiLSTM's size) with the default blocks, in exact float32 and in bf16 (bfloat16 W_hh), and ptxas reports no
    register spills. A subprocess, since this test process's triton is in interpreter mode."""
    report = compile_in_subprocess(150, precision)
    for kernel in ("forward", "backward"):
        assert report[kernel]["registers"] <= 255
        assert report[kernel]["spill_stores"] == 0, report


def compile_in_subprocess(hidden: int, precision: str) -> dict[str, Any]:
    """``compile_report`` for sm_90 in a subprocess without TRITON_INTERPRET (this test process's triton interprets);
    skips where this triton has no bundled ptxas."""
    script = (
        "import json; from triton_lstm import TritonLSTMConfig, compile_report; "
        f"print(json.dumps(compile_report({hidden}, TritonLSTMConfig(precision={precision!r}))))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=Path(__file__).parent
    )
    if result.returncode and "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip("this triton has no bundled ptxas")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_bytes(form: str) -> int:
    """Bytes per thread of one load instruction as ``ptx_global_loads`` names it."""
    if form.startswith("cp.async."):
        return int(form.removeprefix("cp.async.").removesuffix("B"))
    parts = form.split(".")
    lanes = int(parts[2][1:]) if parts[2].startswith("v") else 1
    return lanes * int(parts[-1][1:]) // 8


@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_weight_tiles_load_as_aligned_vectors(precision: str) -> None:
    """At H=150 (not a multiple of the blocks; gate offsets of 150 elements are not 16-byte aligned) the W_hh tile
    loads of both kernels compile, for sm_90, to vector loads only: 16 bytes per thread and instruction in float32,
    8 in bfloat16 (a 32x32 bfloat16 tile over 256 threads is 8 bytes each). Before the weights were padded they
    were 8 bytes (float32) and 4 bytes (bfloat16), twice the instructions."""
    report = compile_in_subprocess(150, precision)
    want = 16 if precision == "ieee" else 8
    for kernel in ("forward", "backward"):
        weights = report[kernel]["global_loads"]["weights"]
        assert weights, report[kernel]  # the weight loads were found in the PTX (by its line info)
        assert {load_bytes(form) for form in weights} == {want}, weights


def test_ptx_global_loads_counts_by_width_and_source_line() -> None:
    """The PTX scan behind ``compile_report``'s load counts, on a hand-written excerpt."""
    source = os.path.basename(tlstm.__file__)
    ptx = f"""
\t.loc\t1 10 5
\tld.global.v4.b32 {{ %r1, %r2, %r3, %r4 }}, [ %rd1 + 0 ];
\t@%p1 cp.async.cg.shared.global [ %r5 + 0 ], [ %rd2 + 0 ], 0x10, %r6;
\t.loc\t1 11 5
\t@%p2 ld.global.b16 {{ %rs1 }}, [ %rd3 + 0 ];
\t@%p3 ld.global.L1::evict_last.v2.b32 {{ %r7, %r8 }}, [ %rd4 + 0 ];
\tcp.async.ca.shared.global [ %r9 + 0 ], [ %rd5 + 0 ], 4, %r10;
\t.loc\t2 10 5
\tld.global.b32 {{ %r11 }}, [ %rd6 + 0 ];
\t.file\t1 "/somewhere/{source}"
\t.file\t2 "/triton/language/standard.py"
"""
    counts = tlstm.ptx_global_loads(ptx, {10})
    assert counts == {
        "weights": {"ld.global.v4.b32": 1, "cp.async.16B": 1},
        "other": {"ld.global.b16": 1, "ld.global.v2.b32": 1, "cp.async.4B": 1, "ld.global.b32": 1},
    }
    assert {load_bytes(form) for form in counts["weights"]} == {16}


def test_padded_weight_layout() -> None:
    """W_hh in the kernels' layout: HP a multiple of both blocks, every gate block at g*HP, zeros past H."""
    assert tlstm._padded_hidden(150, TritonLSTMConfig()) == 160
    assert tlstm._padded_hidden(192, TritonLSTMConfig()) == 192
    assert tlstm._padded_hidden(20, TritonLSTMConfig(block_h=16, block_k=32)) == 32
    torch.manual_seed(0)
    hidden, padded = 5, 8
    w_hh = torch.randn(2, 4 * hidden, hidden)
    forward = tlstm._padded_weights(w_hh, padded, transpose=True)
    backward = tlstm._padded_weights(w_hh, padded, transpose=False)
    assert forward.shape == (2, padded, 4 * padded) and backward.shape == (2, 4 * padded, padded)
    assert forward.is_contiguous() and backward.is_contiguous()
    for gate in range(4):
        block = w_hh[:, gate * hidden : (gate + 1) * hidden]  # (D, n, k)
        torch.testing.assert_close(forward[:, :hidden, gate * padded : gate * padded + hidden], block.transpose(1, 2))
        torch.testing.assert_close(backward[:, gate * padded : gate * padded + hidden, :hidden], block)
    nonzero = torch.count_nonzero(w_hh)  # randn: all of them
    assert torch.count_nonzero(forward) == torch.count_nonzero(backward) == nonzero  # the rest is zeros
    for transpose in (True, False):  # no padding: W_hh (transposed) as it is, contiguous (the kernels assume it)
        unpadded = tlstm._padded_weights(w_hh, hidden, transpose=transpose)
        assert unpadded.is_contiguous()
        assert torch.equal(unpadded, w_hh.transpose(1, 2) if transpose else w_hh)


def test_hidden_a_multiple_of_the_blocks() -> None:
    """H=16 with blocks of 16: no padding (HP == H), the weights go to the kernels as they are."""
    compare(6, 16, LENGTHS, True, with_hx=True)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_classifier_triton_path_matches_padded_path(bidirectional: bool) -> None:
    """``LSTMClassifier`` within ``triton_path`` gives the logits and every gradient of the exact ``padded`` path
    (2 layers, concat pooling, DropConnect off so both paths see the same weights), on reviews padded past their
    lengths as bucketed batches are; afterwards the model takes its own path again."""
    torch.manual_seed(0)
    model = LSTMClassifier(60, 8, 12, 2, bidirectional, dropout=0.0, pooling="concat").train()
    lengths = torch.tensor([9, 1, 4, 9, 6, 2])
    ids = torch.randint(2, 60, (len(lengths), 12))
    ids[torch.arange(12).unsqueeze(0) >= lengths.unsqueeze(1)] = model.pad_id
    model.rnn_input = "padded"
    results = []
    for path in (contextlib.nullcontext(), triton_path(model)):
        model.zero_grad()
        with path:
            logits = model(ids, lengths)
        (logits**2).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert model.rnn_input == "padded" and "_padded_final" not in vars(model)  # the model as it was
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert len(results[1][1]) == len(results[0][1])
    for padded_grad, triton_grad in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(triton_grad, padded_grad, rtol=1e-4, atol=1e-6)
