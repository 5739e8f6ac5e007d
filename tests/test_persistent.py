"""The persistent LSTM kernels (``rnn_input: persistent``).

On a GPU (skipped without one): outputs, final states and every gradient equal packed ``nn.LSTM`` in float64,
for float32 and bfloat16 recurrent weights, one and two directions, reviews of unequal lengths and given initial
states; the classifier gives the fused path's logits and trains under CUDA graphs as it does eagerly.
On CPU: the path falls back to padded with a warning, and computes the same function; and the kernels' own CUDA
source, built with a C++20 compiler against ``cuda_on_cpu.h`` (one CPU thread per CUDA thread, a barrier for
``__syncthreads``), gives the padded path's logits and gradients through the real autograd function, for float32
and bfloat16 weights, one to four reviews per block, one and two directions. That checks the kernels' logic and
indexing in CI; the GPU tests check them on the hardware.
"""

from __future__ import annotations

import copy
import ctypes
import fnmatch
import functools
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sentiment import lm, persistent
from sentiment import model as model_module
from sentiment.batching import PadCollator, bucket_length
from sentiment.config import build_config
from sentiment.graphs import GraphedTrainStep, train_step
from sentiment.lm import LSTMLanguageModel
from sentiment.model import LSTMClassifier
from sentiment.persistent import persistent_lstm, persistent_support

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference_lstm(
    lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed ``nn.LSTM`` (outputs zero at padding, final states after each review's last token)."""
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    output, (h_n, c_n) = lstm(packed, state)
    return pad_packed_sequence(output, batch_first=True, total_length=x.shape[1])[0], h_n, c_n


def run_both(hidden: int, bidirectional: bool, round_to_bf16: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(kernel, float64 reference) pairs of outputs, final states and gradients on random reviews of unequal
    lengths with random initial states. ``round_to_bf16``: the reference's W_hh rounded to bfloat16 first."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    batch, steps, features = 7, 23, 12
    directions = 2 if bidirectional else 1
    lstm = nn.LSTM(features, hidden, batch_first=True, bidirectional=bidirectional).double()
    if round_to_bf16:
        with torch.no_grad():
            for name, weight in lstm.named_parameters():
                if name.startswith("weight_hh"):
                    weight.copy_(weight.to(torch.bfloat16).double())
    x = torch.randn(batch, steps, features, dtype=torch.float64)
    lengths = torch.tensor([23, 1, 17, 23, 5, 9, 2])
    h0 = 0.5 * torch.randn(directions, batch, hidden, dtype=torch.float64)
    c0 = 0.5 * torch.randn(directions, batch, hidden, dtype=torch.float64)
    weights_out = torch.randn(batch, steps, directions * hidden, dtype=torch.float64)
    weights_h, weights_c = torch.randn_like(h0), torch.randn_like(c0)

    def loss(out: torch.Tensor, h_n: torch.Tensor, c_n: torch.Tensor) -> torch.Tensor:
        real = (torch.arange(steps, device=out.device)[None, :] < lengths.to(out.device)[:, None]).unsqueeze(-1)
        return (
            (out * real * weights_out.to(out)).sum() + (h_n * weights_h.to(h_n)).sum() + (c_n * weights_c.to(c_n)).sum()
        )

    ref_inputs = [t.clone().requires_grad_() for t in (x, h0, c0)]
    ref_out, ref_h, ref_c = reference_lstm(lstm, ref_inputs[0], lengths, (ref_inputs[1], ref_inputs[2]))
    loss(ref_out, ref_h, ref_c).backward()

    gpu = copy.deepcopy(lstm).float().to(device)
    inputs = [t.float().to(device).requires_grad_() for t in (x, h0, c0)]
    suffixes = ["", "_reverse"][:directions]
    w_ih = torch.cat([getattr(gpu, f"weight_ih_l0{s}") for s in suffixes])
    bias = torch.cat([getattr(gpu, f"bias_ih_l0{s}") + getattr(gpu, f"bias_hh_l0{s}") for s in suffixes])
    w_hh = torch.stack([getattr(gpu, f"weight_hh_l0{s}") for s in suffixes])
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the kernel's products in full float32
        gx = torch.nn.functional.linear(inputs[0], w_ih, bias).view(batch, steps, directions, 4 * hidden)
        out, (h_n, c_n) = persistent_lstm(gx, w_hh, lengths.to(device), (inputs[1], inputs[2]))
        loss(out.reshape(batch, steps, -1), h_n, c_n).backward()

    pairs = {"outputs": (out.reshape(batch, steps, -1), ref_out), "h_n": (h_n, ref_h), "c_n": (c_n, ref_c)}
    for name, mine, theirs in zip(("x", "h0", "c0"), inputs, ref_inputs, strict=True):
        pairs[f"grad {name}"] = (mine.grad, theirs.grad)
    for (name, mine), theirs in zip(gpu.named_parameters(), lstm.parameters(), strict=True):
        pairs[f"grad {name}"] = (mine.grad, theirs.grad)
    return pairs


def close(name: str, mine: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    """Every element within ``tolerance`` times the reference's largest magnitude (sums of many float32 terms)."""
    error = (mine.double().cpu() - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert error <= tolerance * scale, f"{name}: largest difference {error:.3g}, reference scale {scale:.3g}"


@needs_cuda
@pytest.mark.parametrize(
    ("hidden", "bidirectional", "weights"),
    [(16, False, "fp32"), (16, True, "fp32"), (75, False, "fp32"), (16, True, "mma"), (75, False, "mma"),
     (150, True, "mma"), (150, True, "bf16"), (150, True, "bf16+mma"), (75, False, "bf16")],
)  # fmt: skip
def test_kernel_equals_packed_lstm(
    monkeypatch: pytest.MonkeyPatch, hidden: int, bidirectional: bool, weights: str
) -> None:
    """Against the float64 reference with W_hh as the kernel holds it: float32 accumulation error only (the tensor
    cores' operands split in two bfloat16 parts keep ~16 bits of the state and the gate gradients)."""
    monkeypatch.setattr(persistent, "WEIGHT_FORMATS", (weights,))
    pairs = run_both(hidden, bidirectional, round_to_bf16=weights != "fp32")
    assert pairs["outputs"][0].abs().sum() > 0 and pairs["grad weight_hh_l0"][0].abs().sum() > 0
    for name, (mine, theirs) in pairs.items():
        close(name, mine, theirs, 1e-5)


@needs_cuda
def test_bfloat16_weights_stay_within_bfloat16_tolerance() -> None:
    """With the exact float32 W_hh in the reference, the bfloat16 copy costs no more than bfloat16's precision."""
    for name, (mine, theirs) in run_both(150, True, round_to_bf16=False).items():
        close(name, mine, theirs, 1e-2)


@needs_cuda
@pytest.mark.parametrize("bidirectional", [False, True])
def test_classifier_persistent_equals_fused(bidirectional: bool) -> None:
    """Same logits and gradients as the fused cuDNN path, two layers, reviews of unequal lengths."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    fused = LSTMClassifier(90, 10, 24, 2, bidirectional, dropout=0.0, rnn_input="fused").to(device).train()
    persistent = copy.deepcopy(fused)
    persistent.rnn_input = "persistent"
    ids = torch.randint(2, 90, (6, 31), device=device)
    lengths = torch.tensor([31, 4, 19, 31, 1, 12], device=device)
    ids[torch.arange(31, device=device)[None, :] >= lengths[:, None]] = 1
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # cuDNN in full float32, as the kernel is
        for model in (fused, persistent):
            model(ids, lengths).sum().backward()
        torch.testing.assert_close(persistent(ids, lengths), fused(ids, lengths), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(persistent.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)


@needs_cuda
def test_graph_replay_matches_eager_persistent_steps() -> None:
    """Training steps replayed from CUDA graphs over several shapes update the weights as eager steps do."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    eager = LSTMClassifier(80, 8, 16, 2, True, dropout=0.0, rnn_input="persistent").to(device).train()
    graphed = copy.deepcopy(eager)
    eager_opt = torch.optim.Adam(eager.parameters(), lr=0.01, capturable=True)
    graph_opt = torch.optim.Adam(graphed.parameters(), lr=0.01, capturable=True)
    step = GraphedTrainStep(graphed, graph_opt, max_grad_norm=1.0)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    collate = PadCollator(pad_id=1, fixed_rows=8)
    rng = np.random.default_rng(0)
    for lengths in ([40, 33], [5] * 8, [37, 38, 3], [120, 64, 100]):
        batch = collate([(rng.integers(2, 80, n), int(rng.integers(0, 2))) for n in lengths])
        assert batch["input_ids"].shape[1] == bucket_length(max(lengths))
        step.step(batch)
        train_step(eager, eager_opt, {k: v.to(device) for k, v in batch.items()}, totals, 1.0)
        eager_opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    assert len(step.graphs) == 3
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unsupported_device_falls_back_with_a_warning() -> None:
    """On CPU the persistent path says why it cannot run and computes the padded path's function."""
    assert "NVIDIA GPU" in persistent_support(16, torch.device("cpu"))
    torch.manual_seed(0)
    padded = LSTMClassifier(50, 6, 8, 2, True, dropout=0.0, rnn_input="padded").eval()
    persistent = copy.deepcopy(padded)
    persistent.rnn_input = "persistent"
    ids = torch.randint(2, 50, (3, 9))
    lengths = torch.tensor([9, 3, 6])
    with pytest.warns(UserWarning, match="rnn_input persistent: the persistent LSTM needs an NVIDIA GPU"):
        logits = persistent(ids, lengths)
    torch.testing.assert_close(logits, padded(ids, lengths))
    assert build_config(overrides={"rnn_input": "persistent"}).rnn_input == "persistent"


def test_weights_of_the_wrong_shape_are_refused_by_name() -> None:
    """W_hh and the bias are checked against the gate inputs' shape before anything runs."""
    gx, lengths = torch.zeros(3, 5, 2, 8), torch.tensor([5, 2, 1])
    with pytest.raises(ValueError, match=r"w_hh has shape \(2, 8, 3\), expected \(2, 8, 2\)"):
        persistent_lstm(gx, torch.zeros(2, 8, 3), lengths)
    with pytest.raises(ValueError, match=r"bias has shape \(8,\), expected \(2, 8\)"):
        persistent_lstm(gx, torch.zeros(2, 8, 2), lengths, bias=torch.zeros(8))


def test_products_around_the_kernel_follow_cudnns_tf32_switch() -> None:
    """The input projection and the weight gradients run in TensorFloat-32 exactly when cuDNN's RNNs may (PyTorch's
    default), and the projection computes ``linear``'s values and gradients; the global setting is restored."""
    assert persistent._cudnn_rnn_tf32()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert not persistent._cudnn_rnn_tf32()
    assert persistent._cudnn_rnn_tf32()
    torch.manual_seed(0)
    x, weight = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((3, 5, 4), (6, 4)))
    mine = persistent._Projection.apply(x, weight, True)
    theirs = torch.nn.functional.linear(x, weight)
    torch.testing.assert_close(mine, theirs)
    upstream = torch.randn_like(theirs)
    grads = [torch.autograd.grad(out, (x, weight), upstream) for out in (mine, theirs)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    precision = torch.get_float32_matmul_precision()
    with persistent._matmul_precision(True):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == precision


def test_auto_takes_the_persistent_kernels_on_hopper_above_hidden_128(monkeypatch: pytest.MonkeyPatch) -> None:
    """``rnn_input: auto`` prefers the persistent kernels only on compute capability 9 GPUs, above 128 hidden units
    (where cuDNN's backward is not persistent), where they can run; on CPU it stays padded, with no warning."""
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert not persistent.preferred(150, cpu)
    monkeypatch.setattr(persistent, "persistent_support", lambda hidden, device: None if hidden <= 158 else "too big")
    cases = [((9, 0), 150, True), ((9, 0), 128, False), ((9, 0), 75, False), ((9, 0), 200, False),
             ((8, 0), 150, False), ((10, 0), 150, False)]  # fmt: skip
    for capability, hidden, expected in cases:
        persistent.preferred.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, capability=capability: capability)
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        assert persistent.preferred(hidden, gpu) is expected, (capability, hidden)
    persistent.preferred.cache_clear()
    model = LSTMClassifier(40, 4, 150, 1, True, dropout=0.0)  # auto
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: auto never asked for the kernels on CPU
        model(torch.randint(2, 40, (2, 5)), torch.tensor([5, 3]))


@pytest.mark.parametrize("positions", [7, 12, 64, 4096])
def test_weight_gradient_products_in_slices_equal_one_product(positions: int) -> None:
    """The weight gradients' sums over positions, taken as products over slices summed after, equal one product."""
    torch.manual_seed(0)
    a = torch.randn(positions, 2, 9, dtype=torch.float64)[:, 1]  # strided, as one direction of the gates' gradients
    b = torch.randn(positions, 5, dtype=torch.float64)
    torch.testing.assert_close(persistent._outer_product_sum(a, b), a.t() @ b)


LAUNCHERS = r"""
extern "C" void launch_forward(int gx, int gy, const float* a, const W_TYPE* b, const float* bias, const int* c,
    const float* d, const float* e, float* f, float* g, float* h, float* i, float* j, int B, int T, int D, int save) {
  run_blocks(gx, gy, NTF, [&] { lstm_forward(a, b, bias, c, d, e, f, g, h, i, j, B, T, D, save); });
}
extern "C" void launch_backward(int gx, int gy, const float* a, const float* b, const float* c, const W_TYPE* d,
    const int* e, const float* f, const float* g, const float* h, float* i, float* bias, float* j, float* k, int B,
    int T, int D) {
  run_blocks(gx, gy, NTB, [&] { lstm_backward(a, b, c, d, e, f, g, h, i, bias, j, k, B, T, D); });
}
"""


def build_for_cpu(stem: Path, source: str) -> ctypes.CDLL:
    """A kernel's source built for the CPU threads of ``cuda_on_cpu.h`` as a shared library at ``stem``.so."""
    path = stem.with_suffix(".cpp")
    path.write_text('#include "cuda_on_cpu.h"\n' + source)
    library = stem.with_suffix(".so")
    command = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", f"-I{Path(__file__).parent}", "-o", library, path,
               "-lpthread"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return ctypes.CDLL(str(library))


def launch_on_cpu(function: Callable, grid: tuple, args: list) -> None:
    """Call a launcher of the CPU build with a launch's grid and arguments (tensors as their data pointers)."""
    values = [ctypes.c_void_p(a.data_ptr()) if torch.is_tensor(a) else ctypes.c_int(a) for a in args]
    function(ctypes.c_int(grid[0]), ctypes.c_int(grid[1]), *values)


def cpu_kernels(build_dir: Path) -> Callable:
    """A stand-in for ``persistent._kernels`` that builds the same source for the CPU (see ``cuda_on_cpu.h``)."""

    @functools.cache
    def kernels(hidden: int, reviews: int, weights: str, device_index: int) -> tuple:
        layout = persistent._layout(hidden, reviews, weights)
        # the kernels' weight pointer: 128-bit tiles for the tensor cores, 32-bit words for the CUDA cores
        pointer = f"#define W_TYPE {'uint4' if weights == 'mma' else 'unsigned int'}\n"
        lib = build_for_cpu(build_dir / f"lstm_{hidden}_{reviews}_{weights}", layout.source + pointer + LAUNCHERS)

        def launcher(function: Callable, outputs: slice) -> Callable:
            def launch(grid: tuple, block: tuple, shared_mem: int, args: list) -> None:
                for output in args[outputs]:  # garbage, as fresh GPU memory may hold: the kernel writes every element
                    output.fill_(float("nan"))
                launch_on_cpu(function, grid, args)

            return launch

        return launcher(lib.launch_forward, slice(6, 11)), launcher(lib.launch_backward, slice(8, 12)), layout

    return kernels


def kernels_on_cpu_threads(monkeypatch: pytest.MonkeyPatch, build_dir: Path, reviews: int, weights: str) -> None:
    """Route the persistent path to the CPU build of its kernels, with this plan (reviews per block, weights), a
    launch per layer (the stacked kernels have their own CPU build, :func:`stack_on_cpu_threads`)."""
    monkeypatch.setattr(persistent, "STACK_LAYERS", False)
    monkeypatch.setattr(persistent, "_kernels", cpu_kernels(build_dir))
    monkeypatch.setattr(persistent, "_index", lambda device: 0)
    monkeypatch.setattr(persistent, "_plan", lambda batch, directions, hidden, device: (reviews, weights))
    monkeypatch.setattr(persistent, "persistent_support", lambda hidden, device: None)


STACK_LAUNCHERS = r"""
extern "C" void launch_stack_forward(int gx, int gy, const float* a, const unsigned int* b, const float* c,
    const int* d, const float* e, const float* f, const float* g, float* h, float* i, float* j, float* k, float* l,
    int* counter, int B, int T, int masked, int save) {
  run_blocks(gx, gy, NT, [&] { lstm_stack_forward(a, b, c, d, e, f, g, h, i, j, k, l, counter, B, T, masked, save); });
}
extern "C" void launch_stack_backward(int gx, int gy, const float* a, const float* b, const float* c,
    const unsigned int* d, const int* e, const float* f, const float* g, const float* h, const float* i, float* j,
    float* k, float* l, float* m, float* n, int* counter, int B, int T, int masked) {
  run_blocks(gx, gy, NT, [&] {
    lstm_stack_backward(a, b, c, d, e, f, g, h, i, j, k, l, m, n, counter, B, T, masked);
  });
}
"""


def cpu_stack_kernels(build_dir: Path) -> Callable:
    """A stand-in for ``persistent._stack_kernels`` that builds the same source for the CPU. Blocks run one at a
    time in launch order, so every word a block waits for is already written (the CPU build aborts if not)."""

    @functools.cache
    def kernels(hidden: int, reviews: int, weights: str, layers: int, device_index: int) -> tuple:
        layout = persistent._stack_layout(hidden, reviews, weights, layers)
        lib = build_for_cpu(build_dir / f"stack_{hidden}_{reviews}_{weights}_{layers}", layout.source + STACK_LAUNCHERS)

        def forward(grid: tuple, block: tuple, shared_mem: int, args: list) -> None:
            for output in [*args[8:12], args[7][-1]]:  # not the layers below the top: they hold UNWRITTEN
                output.fill_(float("nan"))
            launch_on_cpu(lib.launch_stack_forward, grid, args)

        def backward(grid: tuple, block: tuple, shared_mem: int, args: list) -> None:
            for output in args[10:14]:
                output.fill_(float("nan"))
            launch_on_cpu(lib.launch_stack_backward, grid, args)

        return forward, backward, layout

    return kernels


def stack_on_cpu_threads(monkeypatch: pytest.MonkeyPatch, build_dir: Path, reviews: int, weights: str) -> None:
    """Route the stacked kernels to their CPU build, with this plan (reviews per block, weights)."""
    monkeypatch.setattr(persistent, "_stack_kernels", cpu_stack_kernels(build_dir))
    monkeypatch.setattr(persistent, "_index", lambda device: 0)
    monkeypatch.setattr(persistent, "_stack_plan", lambda batch, layers, hidden, device: (reviews, weights))
    monkeypatch.setattr(persistent, "persistent_support", lambda hidden, device: None)


def compiles_cxx20() -> bool:
    if shutil.which("g++") is None:
        return False
    check = subprocess.run(["g++", "-std=c++20", "-x", "c++", "-fsyntax-only", "-"], input="#include <barrier>\n",
                           capture_output=True, text=True)  # fmt: skip
    return check.returncode == 0


@pytest.mark.skipif(not compiles_cxx20(), reason="needs g++ with C++20 (std::barrier)")
@pytest.mark.parametrize(
    ("bidirectional", "hidden", "layers", "reviews", "weights"),
    [(False, 5, 3, 1, "fp32"), (False, 75, 2, 2, "fp32"), (True, 6, 2, 2, "bf16"), (False, 6, 2, 3, "bf16"),
     (True, 5, 1, 4, "fp32"), (True, 6, 2, 2, "mma"), (False, 5, 2, 3, "mma"), (True, 20, 2, 4, "mma"),
     (False, 75, 1, 1, "mma"), (True, 6, 2, 2, "bf16+mma"), (True, 5, 2, 2, "bf16"), (False, 7, 1, 3, "bf16+mma")],
)  # fmt: skip
def test_kernel_source_on_cpu_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bidirectional: bool, hidden: int, layers: int, reviews: int,
    weights: str,
) -> None:  # fmt: skip
    """The CUDA source's forward and backward, run on CPU threads through the real autograd function (the tensor
    cores' mma.sync emulated per lane), equal the padded path (its W_hh rounded to bfloat16 where the kernel holds
    bfloat16): logits in training and evaluation, and every gradient."""
    kernels_on_cpu_threads(monkeypatch, tmp_path, reviews, weights)
    torch.manual_seed(0)
    padded = LSTMClassifier(50, 5, hidden, layers, bidirectional, dropout=0.0, rnn_input="padded").train()
    if weights != "fp32":
        with torch.no_grad():
            for name, weight in padded.lstm.named_parameters():
                if name.startswith("weight_hh"):
                    weight.copy_(weight.to(torch.bfloat16).float())
    kernel = copy.deepcopy(padded)
    kernel.rnn_input = "persistent"
    batch, steps = 6, 11
    lengths = torch.tensor([11, 1, 7, 11, 4, 2])
    ids = torch.randint(2, 50, (batch, steps))
    ids[torch.arange(steps)[None, :] >= lengths[:, None]] = 1
    logits = {}
    for name, model in (("padded", padded), ("kernel", kernel)):
        logits[name] = model(ids, lengths)
        (logits[name] * torch.arange(1.0, batch + 1)).sum().backward()
    close("training logits", logits["kernel"], logits["padded"].double(), 1e-5)
    for (name, mine), theirs in zip(kernel.named_parameters(), padded.parameters(), strict=True):
        close(f"grad {name}", mine.grad, theirs.grad.double(), 1e-5)
    kernel.eval()
    padded.eval()
    with torch.inference_mode():
        close("evaluation logits", kernel(ids, lengths), padded(ids, lengths).double(), 1e-5)


@pytest.mark.skipif(not compiles_cxx20(), reason="needs g++ with C++20 (std::barrier)")
@pytest.mark.parametrize("stack", [False, True])
def test_language_model_on_kernel_source_equals_torch_lstm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stack: bool
) -> None:
    """The language model on the persistent kernels (CPU build), a launch per layer or its layers stacked in one,
    gives torch.lstm's logits, carried state and gradients, from a given state, two layers."""
    kernels_on_cpu_threads(monkeypatch, tmp_path, reviews=2, weights="fp32")
    if stack:
        stack_on_cpu_threads(monkeypatch, tmp_path, reviews=2, weights="fp32")
        monkeypatch.setattr(persistent, "STACK_LAYERS", True)
        monkeypatch.setattr(lm, "persistent_layer", None)  # a launch per layer would fail
    torch.manual_seed(0)
    usual = LSTMLanguageModel(40, 6, 7, n_layers=2, dropout=0.0).train()
    kernel = LSTMLanguageModel(40, 6, 7, n_layers=2, dropout=0.0, rnn_input="persistent").train()
    kernel.load_state_dict(usual.state_dict())
    ids = torch.randint(0, 40, (3, 9))
    state = (0.3 * torch.randn(2, 3, 7), 0.3 * torch.randn(2, 3, 7))
    results = {}
    for name, model in (("usual", usual), ("kernel", kernel)):
        inputs = tuple(s.clone().requires_grad_() for s in state)
        logits, (h, c) = model(ids, inputs)
        (logits.sin().sum() + h.sum() + 2 * c.sum()).backward()
        results[name] = (logits, h, c, *[s.grad for s in inputs])
    names = ("logits", "h", "c", "grad h0", "grad c0")
    for what, mine, theirs in zip(names, results["kernel"], results["usual"], strict=True):
        close(what, mine.detach(), theirs.detach().double(), 1e-5)
    for (name, mine), theirs in zip(kernel.named_parameters(), usual.parameters(), strict=True):
        close(f"grad {name}", mine.grad, theirs.grad.double(), 1e-5)
    with pytest.raises(ValueError, match="auto or persistent"):
        LSTMLanguageModel(40, 6, 7, rnn_input="fused")


def plans_on_an_h100(monkeypatch: pytest.MonkeyPatch, kernels: str) -> tuple[list, list]:
    """Plan as on an H100 (132 SMs, its shared memory) with no GPU: the plan's kernels (``kernels``, the name of
    the function that loads them) recorded, not compiled. Returns (each loaded plan, each batch of compiles)."""
    properties = type("Properties", (), {"multi_processor_count": 132, "shared_memory_per_block_optin": 232448,
                                         "shared_memory_per_multiprocessor": 233472})  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    compiled, ahead = [], []
    monkeypatch.setattr(persistent, kernels, lambda *plan: compiled.append(plan))
    monkeypatch.setattr(persistent, "_compile_ahead", lambda sources, device: ahead.append(len(sources)))
    monkeypatch.setattr(persistent, "_index", lambda device: 0)
    return compiled, ahead


def test_plan_fills_the_gpu_within_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reviews per block fill one wave of blocks over the SMs (at most 4); W_hh takes the first of the formats
    that fits (float32, else the tensor cores, else bfloat16 on the CUDA cores), with the reviews a wave wants if it
    can; every plan compiles up front, the compiles handed over all at once."""
    compiled, ahead = plans_on_an_h100(monkeypatch, "_kernels")
    gpu = torch.device("cuda", 0)
    assert persistent._plan(64, 1, 75, gpu) == (1, "fp32")  # lstm.yaml: 64 blocks, float32
    assert ahead[0] == 4  # the four plans' compiles handed over at once
    assert persistent._plan(256, 1, 75, gpu) == (2, "fp32")  # its evaluation batches
    assert persistent._plan(128, 2, 150, gpu) == (2, "mma")  # bilstm.yaml: 128 blocks, tensor cores
    assert persistent._plan(1024, 2, 150, gpu) == (4, "mma")
    assert persistent._plan(1024, 1, 115, gpu) == (4, "mma")  # 3 reviews of float32 do not fit
    assert persistent._plan(1024, 1, 160, gpu) == (4, "mma")  # the largest size on the tensor cores
    assert persistent._plan(1024, 1, 161, gpu) == (1, "bf16")  # then the CUDA cores, one review a block
    assert persistent._plan(1024, 1, 163, gpu) == (1, "bf16")  # the largest size that fits
    assert persistent._plan(1024, 1, 164, gpu) == (1, None)  # none (persistent_support refuses it first)
    monkeypatch.setattr(persistent, "WEIGHT_FORMATS", ("fp32", "bf16"))  # the CUDA cores only: bfloat16 at 150
    assert persistent._plan(128, 2, 150, gpu) == (2, "bf16")
    assert persistent._plan(1024, 1, 115, gpu) == (4, "bf16")
    monkeypatch.setattr(persistent, "WEIGHT_FORMATS", ("fp32", "bf16+mma"))  # a pair
    assert persistent._plan(128, 2, 150, gpu) == (2, "bf16+mma")
    assert persistent._plan(1024, 1, 115, gpu) == (4, "bf16+mma")
    assert {(150, 2, "bf16"), (150, 2, "mma")} <= {plan[:3] for plan in compiled}  # both kernels of the pair
    assert {(hidden, reviews) for hidden, reviews, _, _ in compiled} >= {(75, r) for r in range(1, 5)}


def test_kernel_sources_are_package_data() -> None:
    """Every file of ``sentiment/kernels/`` is named by pyproject's package data (a wheel without it could not
    compile the kernels), and each kernel pair's source is the shared part and its own file after the defines (the
    stacked kernels': the CUDA-core pair's source, their defines and their file)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(persistent.__file__).parent
    patterns = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = sorted(path.relative_to(root).as_posix() for path in (root / "kernels").iterdir())
    assert files == [f"kernels/{name}" for name in ("lstm_common.cuh", "lstm_cuda_cores.cu", "lstm_stacked.cu",
                                                     "lstm_tensor_cores.cu")]  # fmt: skip
    assert all(any(fnmatch.fnmatch(name, pattern) for pattern in patterns["sentiment"]) for name in files)
    common = (root / "kernels" / "lstm_common.cuh").read_text()
    for weights, own in (("bf16", "lstm_cuda_cores.cu"), ("mma", "lstm_tensor_cores.cu")):
        source = persistent._layout(16, 2, weights).source
        assert source.startswith("#define H 16\n#define R 2\n")
        assert source.endswith(common + (root / "kernels" / own).read_text())
    stacked = persistent._stack_layout(16, 2, "bf16", 3).source  # the CUDA-core pair's, then the stacked kernels
    assert stacked.startswith("#define STACK_ONLY\n" + persistent._layout(16, 2, "bf16").source)
    assert stacked.endswith("#define L 3\n#define SS 20\n" + (root / "kernels" / "lstm_stacked.cu").read_text())


def check_stack_against_layers(device: torch.device, hidden: int, layers: int, dropout: float, bf16: bool) -> None:
    """The stacked kernels (through ``persistent_stack``) against packed ``nn.LSTM`` layer by layer in float64,
    with the same dropout masks between layers: the top layer's outputs, every layer's final states, and the
    gradients of the input, the initial states and every weight and bias. ``bf16``: the reference's W_ih (above the
    first layer) and W_hh rounded to bfloat16, as the kernels hold them."""
    torch.manual_seed(0)
    batch, steps, features = 6, 11, 7
    lengths = torch.tensor([11, 1, 7, 11, 4, 2])
    lstms = [nn.LSTM(features if layer == 0 else hidden, hidden, batch_first=True).double() for layer in range(layers)]
    if bf16:
        with torch.no_grad():
            for layer, lstm in enumerate(lstms):
                for weight in [lstm.weight_hh_l0] + ([lstm.weight_ih_l0] if layer > 0 else []):
                    weight.copy_(weight.to(torch.bfloat16).double())
    x = torch.randn(batch, steps, features, dtype=torch.float64)
    h0, c0 = (0.5 * torch.randn(layers, batch, hidden, dtype=torch.float64) for _ in range(2))
    weights_out = torch.randn(batch, steps, hidden, dtype=torch.float64)
    weights_h, weights_c = torch.randn_like(h0), torch.randn_like(c0)
    real = (torch.arange(steps)[None, :] < lengths[:, None]).unsqueeze(-1)

    def loss(out: torch.Tensor, h_n: torch.Tensor, c_n: torch.Tensor) -> torch.Tensor:
        terms = (out * real.to(out.device) * weights_out.to(out), h_n * weights_h.to(h_n), c_n * weights_c.to(c_n))
        return sum(term.sum() for term in terms)

    torch.manual_seed(1)  # the masks persistent_stack draws after the same seed
    masks = torch.nn.functional.dropout(torch.ones(layers - 1, batch, steps, hidden, device=device), dropout)
    reference = [t.clone().requires_grad_() for t in (x, h0, c0)]
    layer_input, finals = reference[0], []
    for layer, lstm in enumerate(lstms):
        state = (reference[1][layer, None], reference[2][layer, None])
        out, h_n, c_n = reference_lstm(lstm, layer_input, lengths, state)
        finals.append((h_n, c_n))
        layer_input = out * masks[layer].double().cpu() if layer < layers - 1 else out
    reference_out = layer_input
    reference_h, reference_c = (torch.cat(parts) for parts in zip(*finals, strict=True))
    loss(reference_out, reference_h, reference_c).backward()

    kernel_lstms = [copy.deepcopy(lstm).float().to(device) for lstm in lstms]
    inputs = [t.float().to(device).requires_grad_() for t in (x, h0, c0)]
    weights = [[lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0] for lstm in kernel_lstms]
    torch.manual_seed(1)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the products around the kernels in float32
        out, (h_n, c_n) = persistent.persistent_stack(inputs[0], weights, lengths, dropout, (inputs[1], inputs[2]))
        loss(out, h_n, c_n).backward()
    pairs = {"outputs": (out, reference_out), "h_n": (h_n, reference_h), "c_n": (c_n, reference_c)}
    for name, mine, theirs in zip(("x", "h0", "c0"), inputs, reference, strict=True):
        pairs[f"grad {name}"] = (mine.grad, theirs.grad)
    for layer, (mine_lstm, lstm) in enumerate(zip(kernel_lstms, lstms, strict=True)):
        for (name, mine), theirs in zip(mine_lstm.named_parameters(), lstm.parameters(), strict=True):
            pairs[f"grad layer {layer} {name}"] = (mine.grad, theirs.grad)
    assert out.abs().sum() > 0 and inputs[0].grad.abs().sum() > 0
    for name, (mine, theirs) in pairs.items():
        close(name, mine.detach(), theirs.detach(), 1e-5)


@pytest.mark.skipif(not compiles_cxx20(), reason="needs g++ with C++20 (std::barrier)")
@pytest.mark.parametrize(
    ("hidden", "layers", "reviews", "weights", "dropout"),
    [(5, 3, 1, "fp32", 0.0), (6, 2, 3, "bf16", 0.4), (75, 3, 2, "fp32", 0.5), (8, 4, 2, "bf16", 0.0),
     (9, 2, 4, "fp32", 0.3), (75, 3, 1, "bf16", 0.5), (5, 2, 2, "bf16", 0.0)],
)  # fmt: skip
def test_stacked_kernels_on_cpu_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hidden: int, layers: int, reviews: int, weights: str,
    dropout: float,
) -> None:  # fmt: skip
    """The stacked kernels' CUDA source (every layer in one launch, the layers above the first computing their own
    input projections, dropout between layers) on CPU threads equals nn.LSTM layer by layer."""
    stack_on_cpu_threads(monkeypatch, tmp_path, reviews, weights)
    check_stack_against_layers(torch.device("cpu"), hidden, layers, dropout, bf16=weights == "bf16")


@pytest.mark.skipif(not compiles_cxx20(), reason="needs g++ with C++20 (std::barrier)")
def test_stacked_dropout_masks_stay_float32_under_autocast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a bfloat16 autocast the first layer's input projection comes out in bfloat16; the dropout masks the
    kernels read as float32 must not follow it. The same seed gives the float32 run's outputs within bfloat16's
    rounding of the projection."""
    stack_on_cpu_threads(monkeypatch, tmp_path, 2, "fp32")
    torch.manual_seed(0)
    lstms = [nn.LSTM(7 if layer == 0 else 6, 6, batch_first=True) for layer in range(3)]
    weights = [[lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0] for lstm in lstms]
    x, lengths = torch.randn(4, 9, 7), torch.tensor([9, 3, 6, 1])
    outputs = {}
    for autocast in (False, True):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
            outputs[autocast] = persistent.persistent_stack(x, weights, lengths, dropout=0.5)[0]
    assert outputs[True].dtype == torch.float32
    close("outputs under autocast", outputs[True], outputs[False].double(), 2e-2)


@pytest.mark.skipif(not compiles_cxx20(), reason="needs g++ with C++20 (std::barrier)")
def test_classifier_on_stacked_kernels_equals_padded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``STACK_LAYERS`` the classifier's unidirectional layers run in one launch of the stacked kernels (CPU
    build), never a launch per layer, and give the padded path's logits and gradients."""
    stack_on_cpu_threads(monkeypatch, tmp_path, 2, "fp32")
    monkeypatch.setattr(persistent, "STACK_LAYERS", True)
    launches = []
    monkeypatch.setattr(model_module, "persistent_layer", lambda *args: launches.append(args))
    torch.manual_seed(0)
    padded = LSTMClassifier(50, 5, 7, 3, False, dropout=0.0, rnn_input="padded").train()
    kernel = copy.deepcopy(padded)
    kernel.rnn_input = "persistent"
    lengths = torch.tensor([11, 1, 7, 11, 4, 2])
    ids = torch.randint(2, 50, (6, 11))
    ids[torch.arange(11)[None, :] >= lengths[:, None]] = 1
    logits = {}
    for name, model in (("padded", padded), ("kernel", kernel)):
        logits[name] = model(ids, lengths)
        (logits[name] * torch.arange(1.0, 7)).sum().backward()
    close("logits", logits["kernel"], logits["padded"].double(), 1e-5)
    for (name, mine), theirs in zip(kernel.named_parameters(), padded.parameters(), strict=True):
        close(f"grad {name}", mine.grad, theirs.grad.double(), 1e-5)
    assert not launches


@needs_cuda
@pytest.mark.parametrize(("hidden", "layers", "formats", "dropout"),
                         [(75, 3, ("fp32",), 0.5), (75, 3, ("bf16",), 0.0), (16, 2, ("fp32",), 0.3)])  # fmt: skip
def test_stacked_kernels_equal_packed_lstm_per_layer(
    monkeypatch: pytest.MonkeyPatch, hidden: int, layers: int, formats: tuple[str, ...], dropout: float
) -> None:
    """On the GPU, with the layers really running at once (blocks waiting on each other's words): as on CPU threads."""
    monkeypatch.setattr(persistent, "STACK_FORMATS", formats)
    check_stack_against_layers(torch.device("cuda"), hidden, layers, dropout, bf16=formats == ("bf16",))


def test_stack_plan_puts_every_layer_on_the_gpu_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stacked plan takes the fewest reviews per block whose blocks of all layers are resident at once, in
    float32 where it fits; the most reviews that fit where no plan makes one wave; none where [W_ih | W_hh] does not
    fit shared memory."""
    compiled, ahead = plans_on_an_h100(monkeypatch, "_stack_kernels")
    gpu = torch.device("cuda", 0)
    assert persistent._stack_plan(64, 3, 75, gpu) == (2, "fp32")  # lstm.yaml: 96 blocks of 2 reviews, one per SM
    assert ahead[0] == 4  # 1 to 4 reviews per block, float32: compiled at once
    assert persistent._stack_plan(40, 3, 75, gpu) == (1, "fp32")  # 120 blocks
    assert persistent._stack_plan(64, 3, 32, gpu) == (1, "fp32")  # small blocks: two per SM
    assert persistent._stack_plan(4096, 3, 75, gpu) == (4, "fp32")  # no wave: the most reviews that fit
    assert persistent._stack_plan(64, 2, 150, gpu) is None  # 4 x 150 rows of 300 weights: no format fits
    assert {plan[:3] for plan in compiled} >= {(75, 1, "fp32"), (75, 2, "fp32")}


@needs_cuda
def test_compiles_in_threads_equal_compiles_one_at_a_time() -> None:
    """The plans' NVRTC compiles run at once in threads: the same cubins as compiled one after another, each once."""
    device = torch.device("cuda")
    sources = [persistent._layout(24, reviews, "fp32").source + f"// {reviews} ahead\n" for reviews in (1, 2, 3)]
    persistent._compile_ahead(sources, device)
    before = persistent._cubin.cache_info().misses
    architecture = persistent._architecture(device)
    assert [persistent._cubin(source, architecture) for source in sources] == [
        persistent._cubin.__wrapped__(source, architecture) for source in sources
    ]
    assert persistent._cubin.cache_info().misses == before  # compiled ahead: none compiles again


@needs_cuda
def test_stacked_kernels_with_more_blocks_than_the_gpu_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Far more blocks than the GPU holds at once (one review per block, 4 layers of 600 reviews): blocks that wait
    start only after those they wait for (tickets), so the launch finishes, with a launch per layer's results."""
    monkeypatch.setattr(persistent, "_stack_plan", lambda batch, layers, hidden, device: (1, "fp32"))
    torch.manual_seed(0)
    device = torch.device("cuda")
    batch, steps, hidden, layers = 600, 40, 75, 4
    x = torch.randn(batch, steps, 50, device=device)
    lengths = torch.randint(1, steps + 1, (batch,), device=device)
    weights = []
    for layer in range(layers):
        shapes = ((4 * hidden, 50 if layer == 0 else hidden), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,))
        weights.append([0.2 * torch.randn(*shape, device=device) for shape in shapes])
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), torch.no_grad():
        stacked, (h_n, _) = persistent.persistent_stack(x, weights, lengths)
        layer_input, finals = x, []
        for layer in weights:
            layer_input, (h, _) = persistent.persistent_layer(layer_input, layer, lengths)
            finals.append(h)
    torch.cuda.synchronize()
    close("top outputs", stacked, layer_input.double().cpu(), 1e-5)
    close("final h", h_n, torch.cat(finals).double().cpu(), 1e-5)


@pytest.mark.skipif(not compiles_cxx20(), reason="needs g++ with C++20 (std::barrier)")
def test_stacked_kernels_alone_benchmark_launches_them_right(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's launches of the stacked kernels by themselves (CPU build) pass what the autograd function
    passes: the same grid and block, and arguments of the same shapes, types and flags (no dropout)."""
    from benchmarks import persistent_kernel

    stack_on_cpu_threads(monkeypatch, tmp_path, 2, "fp32")
    cpu_build, launches = persistent._stack_kernels, {"benchmark": [], "function": []}
    caller = "function"

    def recording(*shape: object) -> tuple:
        forward, backward, layout = cpu_build(*shape)

        def record(kernel: Callable, name: str) -> Callable:
            def launch(grid: tuple, block: tuple, shared_mem: int, args: list) -> None:
                described = [(tuple(a.shape), a.dtype) if torch.is_tensor(a) else a for a in args]
                launches[caller].append((name, grid, block, shared_mem, described))
                kernel(grid=grid, block=block, shared_mem=shared_mem, args=args)

            return launch

        return record(forward, "forward"), record(backward, "backward"), layout

    monkeypatch.setattr(persistent, "_stack_kernels", recording)
    monkeypatch.setattr(persistent_kernel, "timed", lambda run: run() or 2.0)
    weights = [[torch.randn(24, 4 if layer == 0 else 6, requires_grad=True), torch.randn(24, 6, requires_grad=True),
                torch.zeros(24), torch.zeros(24)] for layer in range(3)]  # fmt: skip
    out, _ = persistent.persistent_stack(torch.randn(5, 8, 4), weights, torch.full((5,), 8))
    out.sum().backward()
    caller = "benchmark"
    row = persistent_kernel.stack_kernels_alone(5, 8, 3, 6, (2, "fp32"), torch.device("cpu"))
    assert all(value == 250.0 for value in row.values()), row
    assert launches["benchmark"] == launches["function"]


def test_loaded_kernels_get_the_shared_memory_of_their_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each loaded kernel is allowed its own layout's shared memory (at least the 48 KiB every block has)."""
    allowed = {}

    class Kernel:
        def __init__(self, name: str) -> None:
            self.name = name

        def set_shared_memory_config(self, shared: int) -> None:
            allowed[self.name] = shared

    monkeypatch.setattr(persistent, "_compile", lambda source, names, device: {name: Kernel(name) for name in names})
    forward, backward, layout = persistent._stack_kernels.__wrapped__(75, 2, "fp32", 3, 0)
    assert (forward.name, backward.name) == ("lstm_stack_forward", "lstm_stack_backward")
    assert allowed == {"lstm_stack_forward": layout.forward_shared, "lstm_stack_backward": layout.backward_shared}
    forward, backward, layout = persistent._kernels.__wrapped__(16, 1, "mma", 0)
    assert allowed["lstm_forward"] == allowed["lstm_backward"] == 48 * 1024 > layout.backward_shared
