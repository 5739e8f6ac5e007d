"""A persistent LSTM recurrence for NVIDIA GPUs: one thread block owns a few reviews of one direction for the
whole sequence, with the recurrent matrix ``W_hh`` held in shared memory.

cuDNN runs each time step of a small LSTM as a handful of separate kernels (its persistent kernels only cover
some sizes: at hidden 150 the backward pass gets its standard algorithm, three kernels per step). Here a step
is a matrix-vector product from shared memory, the gates and the state update, with no launch and no
synchronisation across the GPU: reviews are independent, so blocks never wait for each other. What is not
sequential stays outside as large matrix products in PyTorch: the input projection ``x W_ih^T + b`` of all steps
before the recurrence, and the weight gradients after it.

``W_hh`` is kept in float32 where a direction's matrix fits in one block's shared memory (hidden sizes up to
~110 on H100/H200), with a step's product on the CUDA cores, a thread per gate row. Above that a second pair of
kernels runs it on the tensor cores (``mma.sync``, bfloat16 ``W_hh``, up to 160) with the state split into two
bfloat16 parts so that it keeps ~16 bits; and up to 163, the CUDA-core kernels with bfloat16 ``W_hh``
(:data:`WEIGHT_FORMATS`). A forward kernel of one pair may run with the backward kernel of the other, as both save
the same activations. The gates, the
cell state and all accumulation are float32 in every kernel. Larger hidden sizes, other GPUs and the CPU use cuDNN /
PyTorch (:func:`persistent_support` says why).

A unidirectional stack of layers may also run in one launch (:func:`persistent_stack`, ``lstm_stacked.cu``): every
layer at once, each step of a layer as soon as the layer below has its output, the layers above the first computing
their input projections in the kernel (:data:`STACK_LAYERS`).

The CUDA source is in ``sentiment/kernels/``: ``lstm_common.cuh`` (what both pairs share), ``lstm_cuda_cores.cu``,
``lstm_tensor_cores.cu`` and ``lstm_stacked.cu``.

The kernels are CUDA C++ compiled at run time with NVRTC, which PyTorch's CUDA wheels ship, so no CUDA toolkit is
needed. ``torch.cuda._compile_kernel`` would do the compiling, but it asks for a toolkit's include folder even
for a kernel that includes nothing; :func:`_compile` is its few NVRTC calls without that.

The matrix products around the recurrence run at the precision cuDNN's LSTM runs its own on the default path:
TensorFloat-32 when ``torch.backends.cudnn`` allows it for RNNs (PyTorch's default), float32 when it does not
(``torch.backends.cudnn.flags(allow_tf32=False)``).

Semantics are those of a packed sequence: each review runs over its own length (the backward direction from its
last token), outputs at padding are zero, and the final state is the one after each review's last token.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import importlib.resources
import math
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch

MAX_REVIEWS_PER_BLOCK = 4


@functools.cache
def _source(name: str) -> str:
    """The CUDA source ``name`` in ``sentiment/kernels/``. A kernel pair is compiled from its shape's defines, then
    ``lstm_common.cuh``, then ``lstm_cuda_cores.cu`` or ``lstm_tensor_cores.cu``, one text (see :func:`_layout`)."""
    return importlib.resources.files("sentiment").joinpath("kernels", name).read_text()


def _quads(hidden: int, fp32: bool) -> int:
    """128-bit pieces of a weight row of ``hidden`` columns in shared memory (CUDA-core kernels: QUADS), float32 or
    bfloat16 pairs, zero-padded."""
    return -(-(hidden if fp32 else -(-hidden // 2)) // 4)


def _row_words(hidden: int, fp32: bool) -> int:
    """32-bit words from one weight row to the next in shared memory (CUDA-core kernels): the row's words rounded
    up to 128-bit pieces, plus 4 where needed for a stride of 4 mod 8 words, so that the 8 threads of each quarter
    warp reading their rows' 128-bit pieces at once hit 8 different groups of 4 banks."""
    quads = _quads(hidden, fp32)
    return 4 * quads if quads % 2 else 4 * quads + 4


def _tiles(size: int) -> int:
    """16-wide tiles covering ``size`` (the tensor-core kernels' tiles of W)."""
    return -(-size // 16)


def _operand_words(column_tiles: int) -> int:
    """32-bit words from one column of the tensor-core kernels' 8-column operand to the next: the column's words
    plus 4, a stride of 4 mod 8 words, so that the 8 columns a warp reads at once fall in 8 different groups of 4
    banks."""
    return 8 * column_tiles + 4


class _Layout(NamedTuple):
    """One compiled shape: the kernels' source with its defines, and each kernel's threads and shared bytes."""

    source: str
    forward_threads: int
    backward_threads: int
    forward_shared: int
    backward_shared: int


@functools.cache
def _layout(hidden: int, reviews: int, weights: str) -> _Layout:
    """The kernels for an LSTM of ``hidden`` units, ``reviews`` per block, ``weights`` "fp32" or "bf16" (CUDA
    cores: a thread per gate row) or "mma" (tensor cores: a warp per two 16-row tiles of W_hh forwards, per share of
    a tile of W_hh^T backwards, enough warps for the cell threads)."""
    defines = f"#define H {hidden}\n#define R {reviews}\n"
    if weights == "mma":
        forward_tiles, backward_tiles = (_tiles(4 * hidden), _tiles(hidden)), (_tiles(hidden), _tiles(4 * hidden))
        forward_threads = 32 * -(-forward_tiles[0] // 2)
        splits = max(-(-reviews * hidden // (32 * backward_tiles[0])), -(-forward_threads // 32 // backward_tiles[0]))
        splits = min(splits, backward_tiles[1])
        backward_threads = 32 * backward_tiles[0] * splits
        words = _operand_words(forward_tiles[1]), _operand_words(backward_tiles[1])
        for name, value in zip(("MTF", "KTF", "MTB", "KTB"), forward_tiles + backward_tiles, strict=True):
            defines += f"#define {name} {value}\n"
        defines += f"#define KS {splits}\n#define HBW {words[0]}\n#define DBW {words[1]}\n"
        defines += f"#define NTF {forward_threads}\n#define NTB {backward_threads}\n"
        forward_shared = 4 * (128 * math.prod(forward_tiles) + reviews * 4 * hidden + 8 * words[0])
        parts = splits * reviews * 16 * backward_tiles[0]  # the backward's shares of W_hh^T dg
        backward_shared = 4 * (128 * math.prod(backward_tiles) + 8 * words[1] + parts)
        source = defines + _source("lstm_common.cuh") + _source("lstm_tensor_cores.cu")
        return _Layout(source, forward_threads, backward_threads, forward_shared, backward_shared)
    fp32 = weights == "fp32"
    threads = 32 * math.ceil(4 * hidden / 32)
    defines += f"#define S {_row_words(hidden, fp32)}\n#define WFP32 {int(fp32)}\n#define NT {threads}\n"
    # weights, then the backward's gate gradients (rows padded to fours) and its 16 parts of W_hh^T times them
    shared = 4 * (4 * hidden * _row_words(hidden, fp32) + reviews * 4 * 4 * -(-hidden // 4) + 16 * reviews * hidden)
    source = defines + _source("lstm_common.cuh") + _source("lstm_cuda_cores.cu")
    return _Layout(source, threads, threads, shared, shared)


def _incoming(
    grad_out: torch.Tensor | None,
    grad_h_n: torch.Tensor | None,
    grad_c_n: torch.Tensor | None,
    out: torch.Tensor,
    h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A backward kernel's incoming gradients, float32 and contiguous: zeros like ``out`` / ``h0`` for those autograd
    passes as None (an output that no loss used)."""
    zeros = torch.zeros_like(h0)
    grad_out = out.new_zeros(out.shape) if grad_out is None else grad_out.float().contiguous()
    grad_h_n = zeros if grad_h_n is None else grad_h_n.float().contiguous()
    grad_c_n = zeros if grad_c_n is None else grad_c_n.float().contiguous()
    return grad_out, grad_h_n, grad_c_n


def _pair(weights: str) -> tuple[str, str]:
    """A plan's weights' format as (the forward kernel's, the backward kernel's): "bf16+mma" runs the forward on the
    CUDA cores and the backward on the tensor cores; a single name runs both kernels of that format."""
    forward, _, backward = weights.partition("+")
    return forward, backward or forward


def _shared_bytes(hidden: int, weights: str, reviews: int) -> int:
    """Shared memory of the larger of the two kernels."""
    forward, backward = _pair(weights)
    return max(_layout(hidden, reviews, forward).forward_shared, _layout(hidden, reviews, backward).backward_shared)


def _shared_limit(device: torch.device) -> int:
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 49152)


@functools.cache
def persistent_support(hidden: int, device: torch.device) -> str | None:
    """None if the persistent kernels can run an LSTM of ``hidden`` units on ``device``, else the reason."""
    if device.type != "cuda" or torch.version.cuda is None:
        return f"the persistent LSTM needs an NVIDIA GPU (this device is {device.type})"
    try:
        from torch.cuda import _utils

        _utils._get_gpu_rtc_library()
        _utils._cuda_load_module  # noqa: B018 (present since torch 2.8)
    except (ImportError, AttributeError, OSError) as err:
        return f"the persistent LSTM is compiled with NVRTC, which this PyTorch cannot load ({err})"
    if 4 * hidden > 1024:
        return f"hidden_dim {hidden} needs more than 1024 threads per block (the persistent LSTM takes up to 256)"
    if _weights(hidden, 1, device) is None:
        return (
            f"hidden_dim {hidden}: W_hh does not fit one block's {_shared_limit(device) // 1024} KiB of shared "
            "memory even in bfloat16 (the persistent LSTM takes a hidden_dim up to 163 on H100/H200)"
        )
    return None


# Above this hidden size PyTorch's cuDNN LSTM has no persistent backward kernel (``get_algo`` in ATen's cuDNN RNN
# asks for one up to 128 units), and the persistent path is the faster one: on an H100 a BiLSTM layer of 150 units
# forward + backward took 3.4 ms against cuDNN's 12.2 ms, while at 75 units both took 1.6-1.7 ms (2026-12-07).
AUTO_ABOVE_HIDDEN = 128


@functools.cache
def preferred(hidden: int, device: torch.device) -> bool:
    """Whether ``rnn_input: auto`` takes the persistent kernels for an LSTM of ``hidden`` units on ``device``: on
    Hopper GPUs (compute capability 9), where they were measured, above :data:`AUTO_ABOVE_HIDDEN` units, where they
    can run."""
    if device.type != "cuda" or hidden <= AUTO_ABOVE_HIDDEN or torch.version.cuda is None:
        return False
    return torch.cuda.get_device_capability(device)[0] == 9 and persistent_support(hidden, device) is None


def runs_here(module: torch.nn.Module, hidden: int, device: torch.device, why_not: str | None = None) -> bool:
    """Whether the persistent kernels run ``module``'s LSTM of ``hidden`` units on ``device``. If not (the
    device, the size, or the caller's own ``why_not``), warn once per module that its usual path runs instead."""
    reason = why_not or persistent_support(hidden, device)
    if reason is None:
        return True
    if not getattr(module, "_warned_persistent_fallback", False):
        warnings.warn(
            f"rnn_input persistent: {reason}; using the usual path, which computes the same function", stacklevel=3
        )
        module._warned_persistent_fallback = True
    return False


def _architecture(device: torch.device) -> str:
    properties = torch.cuda.get_device_properties(device)
    return f"sm_{properties.major}{properties.minor}"


@functools.cache
def _cubin(source: str, architecture: str) -> bytes:
    """``source`` compiled by NVRTC for ``architecture`` (e.g. "sm_90"), once per process."""
    from torch.cuda import _utils

    nvrtc = _utils._get_gpu_rtc_library()
    # No --use_fast_math: its tanhf is the hardware approximation (relative error up to ~5e-4), which the state and
    # the gradients would carry through every step; the exact functions cost little beside the matrix product.
    options = [f"--gpu-architecture={architecture}".encode(), b"-std=c++17"]
    program = ctypes.c_void_p()

    def check(result: int, what: str) -> None:
        if result != 0:
            log_size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(log_size))
            log = ctypes.create_string_buffer(log_size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f"NVRTC {what} failed ({result}): {log.value.decode(errors='replace')[:2000]}")

    check(nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"lstm.cu", 0, None, None), "create")
    try:
        check(nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options)), "compile")
        size = ctypes.c_size_t()
        check(nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetCUBIN(program, cubin), "cubin")
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return cubin.raw


_compiled_ahead: set[tuple[str, str]] = set()


def _compile_ahead(sources: list[str], device: torch.device) -> None:
    """NVRTC compiles of ``sources`` for ``device``, all at once in threads, before :func:`_compile` loads them one
    by one. A plan compiles up to four shapes on its first call, 0.4-0.5 s each on one core; NVRTC runs outside the
    GIL, one program independent of another (the same cubins as one after another; on 2 cores four took 1.0 s
    instead of 2.0 s, 2026-12-08). Hand-written: PyTorch compiles one kernel at a time."""
    architecture = _architecture(device)
    missing = [source for source in dict.fromkeys(sources) if (source, architecture) not in _compiled_ahead]
    if len(missing) > 1:
        with concurrent.futures.ThreadPoolExecutor(len(missing)) as pool:
            list(pool.map(lambda source: _cubin(source, architecture), missing))
    _compiled_ahead.update((source, architecture) for source in missing)


def _compile(source: str, names: tuple[str, ...], device: torch.device) -> dict:
    """Compile ``source`` with NVRTC for ``device``'s architecture (or take it from :func:`_compile_ahead`) and
    load ``names`` from it."""
    from torch.cuda import _utils

    cubin = _cubin(source, _architecture(device))
    with torch.cuda.device(device):
        return _utils._cuda_load_module(cubin, list(names))


def _load(layout: _Layout, names: tuple[str, str], device_index: int) -> tuple[object, object, _Layout]:
    """(forward, backward, layout): the kernels ``names`` of ``layout``'s source, compiled and loaded, each allowed
    the shared memory it needs."""
    kernels = _compile(layout.source, names, torch.device("cuda", device_index))
    for name, shared in zip(names, (layout.forward_shared, layout.backward_shared), strict=True):
        kernels[name].set_shared_memory_config(max(shared, 48 * 1024))
    return kernels[names[0]], kernels[names[1]], layout


@functools.cache
def _kernels(hidden: int, reviews: int, weights: str, device_index: int) -> tuple[object, object, _Layout]:
    """(forward, backward, layout) for one shape, compiled once per process."""
    return _load(_layout(hidden, reviews, weights), ("lstm_forward", "lstm_backward"), device_index)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# Every weights' format: "fp32" (float32 on the CUDA cores), "bf16" (bfloat16 on the CUDA cores), "mma" (bfloat16
# on the tensor cores), and a forward of one with the backward of another ("bf16+mma", see _pair).
FORMATS = ("fp32", "bf16", "mma", "fp32+mma", "bf16+mma")

# The formats in the order the plan takes them, the first that fits shared memory: "fp32" (up to ~110 hidden units),
# else "mma" (up to 160), else "bf16" (up to 163). The tensor cores took the BiLSTM config (hidden 150) from 1.257 to
# 1.105 s per epoch on an H100 (2026-12-08, docs/benchmarks.md); at hidden 75 float32 on the CUDA cores is the faster
# layer. Every format runs the same function (the tests check each against nn.LSTM, on CPU threads and on the GPU);
# python -m benchmarks.persistent_kernel measures them all.
WEIGHT_FORMATS = ("fp32", "mma", "bf16")


def _fits(hidden: int, weights: str, reviews: int, device: torch.device) -> bool:
    """Whether the kernels of format ``weights`` run ``reviews`` per block in one block's shared memory."""
    return _shared_bytes(hidden, weights, reviews) <= _shared_limit(device)


def _weights(hidden: int, reviews: int, device: torch.device) -> str | None:
    """The first of :data:`WEIGHT_FORMATS` whose kernels fit shared memory with ``reviews`` per block, or None."""
    return next((weights for weights in WEIGHT_FORMATS if _fits(hidden, weights, reviews, device)), None)


def _plan(batch: int, directions: int, hidden: int, device: torch.device) -> tuple[int, str]:
    """(reviews per block, weights' format): enough reviews per block for one wave of blocks over the SMs, in the
    first format that fits (see :data:`WEIGHT_FORMATS`). The first call for a hidden size compiles the kernels of
    every plan, so that none compiles while a CUDA graph is being captured (a batch split into smaller groups
    changes the plan)."""
    index = _index(device)
    plans = []
    for reviews in range(1, MAX_REVIEWS_PER_BLOCK + 1):
        weights = _weights(hidden, reviews, device)
        plans += [(reviews, part) for part in dict.fromkeys(_pair(weights))] if weights is not None else []
    _compile_ahead([_layout(hidden, reviews, part).source for reviews, part in plans], device)
    for reviews, part in plans:
        _kernels(hidden, reviews, part, index)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    reviews = max(1, min(MAX_REVIEWS_PER_BLOCK, math.ceil(batch * directions / sms)))
    while reviews > 1 and _weights(hidden, reviews, device) is None:
        reviews -= 1
    return reviews, _weights(hidden, reviews, device)


# Stacks of unidirectional layers in one launch (``lstm_stacked.cu``) where a stacked plan fits: the LSTM config's 3
# layers took 1.096-1.100 s per epoch stacked against 1.213 s a launch per layer on an H100 (2026-12-08,
# docs/benchmarks.md). python -m benchmarks.persistent_kernel measures both; the suite's --persistent_stack on|off.
STACK_LAYERS = True

# The stacked kernels' formats, in the order the plan takes them (CUDA cores only).
STACK_FORMATS = ("fp32", "bf16")


@functools.cache
def _stack_layout(hidden: int, reviews: int, weights: str, layers: int) -> _Layout:
    """The stacked kernels for ``layers`` layers of ``hidden`` units, ``reviews`` per block, ``weights`` "fp32" or
    "bf16": the CUDA-core kernels' defines and helpers (not their kernels: ``STACK_ONLY``), a row of [W_ih | W_hh]
    per gate row in shared memory (a stride of 4 mod 8 words, as :func:`_row_words`), and per review the state
    [input | h] forwards, the gate gradients and two sets of 16 parts (W_ih^T dg and W_hh^T dg) backwards; a word
    for the block's ticket."""
    fp32 = weights == "fp32"
    layout = _layout(hidden, reviews, weights)
    quads = _quads(hidden, fp32)
    stack_row = 8 * quads + 4  # two segments of quads: already a stride of 4 mod 8 words
    padded = quads * (4 if fp32 else 8)
    threads = layout.forward_threads
    defines = f"#define L {layers}\n#define SS {stack_row}\n"
    gate_rows = 4 * hidden
    forward_shared = 4 * (gate_rows * stack_row + reviews * 2 * padded + reviews * gate_rows + 4)
    backward_shared = 4 * (gate_rows * stack_row + reviews * 4 * 4 * -(-hidden // 4) + 2 * 16 * reviews * hidden + 4)
    source = "#define STACK_ONLY\n" + layout.source + defines + _source("lstm_stacked.cu")
    return _Layout(source, threads, threads, forward_shared, backward_shared)


@functools.cache
def _stack_kernels(hidden: int, reviews: int, weights: str, layers: int, device_index: int) -> tuple:
    """(forward, backward, layout) of the stacked kernels for one shape, compiled once per process."""
    layout = _stack_layout(hidden, reviews, weights, layers)
    return _load(layout, ("lstm_stack_forward", "lstm_stack_backward"), device_index)


def _resident_blocks(layout: _Layout, device: torch.device) -> int:
    """Blocks of the stacked kernels an SM holds at once: by shared memory (1 KiB of it reserved per block), by
    threads, and at most 2 (their launch bounds ask registers for 2)."""
    properties = torch.cuda.get_device_properties(device)
    per_sm = getattr(properties, "shared_memory_per_multiprocessor", _shared_limit(device) + 1024)
    threads = getattr(properties, "max_threads_per_multi_processor", 2048)
    shared = max(layout.forward_shared, layout.backward_shared) + 1024
    return max(0, min(2, per_sm // shared, threads // layout.forward_threads))


def _stack_plan(batch: int, layers: int, hidden: int, device: torch.device) -> tuple[int, str] | None:
    """(reviews per block, weights' format) for a stack, or None where no format fits shared memory: the fewest
    reviews per block whose blocks of every layer are resident at once (a wave: the layers then run side by
    side), in the first of :data:`STACK_FORMATS` that fits; else the most reviews that fit. The first call for a
    shape compiles every plan it could take, so that none compiles while a CUDA graph is being captured."""
    limit, sms = _shared_limit(device), torch.cuda.get_device_properties(device).multi_processor_count
    candidates = []
    for reviews in range(1, MAX_REVIEWS_PER_BLOCK + 1):
        for weights in STACK_FORMATS:
            layout = _stack_layout(hidden, reviews, weights, layers)
            if max(layout.forward_shared, layout.backward_shared) <= limit:
                candidates.append((reviews, weights, _resident_blocks(layout, device)))
                break
    if not candidates:
        return None
    _compile_ahead(
        [_stack_layout(hidden, reviews, weights, layers).source for reviews, weights, _ in candidates], device
    )
    for reviews, weights, _ in candidates:
        _stack_kernels(hidden, reviews, weights, layers, _index(device))
    waves = [(r, w) for r, w, resident in candidates if layers * math.ceil(batch / r) <= sms * resident]
    return waves[0] if waves else candidates[-1][:2]


def _cudnn_rnn_tf32() -> bool:
    """Whether cuDNN may run an RNN's float32 matrix products in TensorFloat-32 (torch 2.9 has a flag per
    operation; before it, one for all of cuDNN)."""
    precision = getattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def _matmul_precision(tf32: bool) -> Iterator[None]:
    """Float32 matrix products in the block in TensorFloat-32 (``tf32``) or in full float32, through PyTorch's
    public switch, set back after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class _Projection(torch.autograd.Function):
    """``x W^T`` whose forward and backward products run at a given precision (see :func:`_matmul_precision`):
    autograd's own backward of ``linear`` would run at whatever precision is set when it runs. (The biases go to
    the kernels.)"""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, tf32: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.tf32 = tf32
        with _matmul_precision(tf32):
            return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        with _matmul_precision(ctx.tf32):
            if ctx.needs_input_grad[0]:
                grad_x = grad @ weight.to(grad.dtype)
            if ctx.needs_input_grad[1]:
                rows = grad.reshape(-1, grad.shape[-1])
                grad_weight = _outer_product_sum(rows, x.reshape(-1, x.shape[-1]).to(grad.dtype))
        return grad_x, grad_weight, None


def _fragments(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` (D x M x K) in bfloat16 as the tensor-core kernels hold it: zero-padded to 16 x 16 tiles, each tile
    as 32 lanes' 4 words of ``mma.sync`` m16n8k16's A operand (lane 4g + t: rows g and g + 8, columns 2t, 2t + 1,
    2t + 8, 2t + 9; word 2 kh + half is row 8 half + g, columns 8 kh + 2t and 8 kh + 2t + 1, the first in the low
    half), tiles row by row."""
    directions, rows, columns = matrix.shape
    row_tiles, column_tiles = _tiles(rows), _tiles(columns)
    padded = matrix.new_zeros(directions, 16 * row_tiles, 16 * column_tiles, dtype=torch.bfloat16)
    padded[:, :rows, :columns] = matrix
    # axes: direction, row tile, half, g, column tile, kh, t, pair -> direction, tiles, lane (g, t), word (kh, half)
    lanes = padded.view(directions, row_tiles, 2, 8, column_tiles, 2, 4, 2).permute(0, 1, 4, 3, 6, 5, 2, 7)
    return lanes.contiguous().view(torch.int32)


def _weight_words(w_hh: torch.Tensor, weights: str, backward: bool = False) -> torch.Tensor:
    """``w_hh`` (D x 4H x H) as the 32-bit words a kernel reads: float32, bfloat16 pairs, or (tensor cores) tiles
    of W_hh for the forward kernel and of W_hh^T for the backward one."""
    w_hh = w_hh.detach()
    if weights == "mma":
        return _fragments(w_hh.transpose(1, 2) if backward else w_hh)
    return _words(w_hh, weights)


def _words(rows: torch.Tensor, weights: str) -> torch.Tensor:
    """``rows`` (... x columns) as 32-bit words: float32, or bfloat16 pairs, an odd row ending in a zero."""
    if weights == "fp32":
        return rows.float().contiguous().view(torch.int32)
    return torch.nn.functional.pad(rows.to(torch.bfloat16), (0, rows.shape[-1] % 2)).contiguous().view(torch.int32)


class _PersistentLSTM(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        gx: torch.Tensor,
        w_hh: torch.Tensor,
        bias: torch.Tensor,
        lengths: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, steps, directions, gate_rows = gx.shape
        hidden = gate_rows // 4
        reviews, weights = _plan(batch, directions, hidden, gx.device)
        forward_format, backward_format = _pair(weights)
        forward, _, layout = _kernels(hidden, reviews, forward_format, _index(gx.device))
        save = any(ctx.needs_input_grad)  # False under no_grad: evaluation stores nothing for backward
        words = _weight_words(w_hh, forward_format)
        out = gx.new_empty(batch, steps, directions, hidden)  # the kernel writes every element
        gates = gx.new_empty(batch, steps, directions, gate_rows) if save else gx.new_empty(1)
        cells = gx.new_empty(batch, steps, directions, hidden) if save else gx.new_empty(1)
        h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
        forward(
            grid=(math.ceil(batch / reviews), directions, 1), block=(layout.forward_threads, 1, 1),
            shared_mem=layout.forward_shared,
            args=[gx, words, bias, lengths, h0, c0, out, gates, cells, h_n, c_n, batch, steps, directions,
                  int(save)],
        )  # fmt: skip
        if save:
            same_words = backward_format == forward_format != "mma"
            backward_words = words if same_words else _weight_words(w_hh, backward_format, backward=True)
            ctx.save_for_backward(backward_words, lengths, h0, c0, out, gates, cells)
            ctx.plan = reviews, backward_format
            ctx.tf32 = _cudnn_rnn_tf32()  # the weight gradient's product, at the forward's precision
        return out, h_n, c_n

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_out: torch.Tensor | None,
        grad_h_n: torch.Tensor | None,
        grad_c_n: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        words, lengths, h0, c0, out, gates, cells = ctx.saved_tensors
        batch, steps, directions, hidden = out.shape
        reviews, backward_format = ctx.plan
        _, backward, layout = _kernels(hidden, reviews, backward_format, _index(out.device))
        grad_out, grad_h_n, grad_c_n = _incoming(grad_out, grad_h_n, grad_c_n, out, h0)
        grad_gates = torch.empty_like(gates)  # the kernel writes every element
        grad_bias = gates.new_empty(directions, batch, 4 * hidden)  # per review, summed below
        grad_h0, grad_c0 = torch.empty_like(h0), torch.empty_like(c0)
        backward(
            grid=(math.ceil(batch / reviews), directions, 1), block=(layout.backward_threads, 1, 1),
            shared_mem=layout.backward_shared,
            args=[grad_out, grad_h_n, grad_c_n, words, lengths, gates, cells, c0, grad_gates, grad_bias, grad_h0,
                  grad_c0, batch, steps, directions],
        )  # fmt: skip
        grad_w_hh = None
        if ctx.needs_input_grad[1]:  # sum over steps of dgates_t (x) h_{t-1}, per direction: one matrix product
            positions = batch * steps
            rows, previous = grad_gates.view(positions, directions, -1), _previous_states(out, lengths, h0)
            previous = previous.view(positions, directions, hidden)
            with _matmul_precision(ctx.tf32):
                grad_w_hh = torch.stack([_outer_product_sum(rows[:, d], previous[:, d]) for d in range(directions)])
        return grad_gates, grad_w_hh, grad_bias.sum(1), None, grad_h0, grad_c0


def _stack_words(w_ih: torch.Tensor, w_hh: torch.Tensor, weights: str) -> torch.Tensor:
    """The stacked kernels' weights: per layer and gate row, [W_ih | W_hh] (zeros for the first layer's W_ih, whose
    product comes precomputed), each part as float32 or bfloat16-pair words."""
    first = w_hh.new_zeros(1, *w_hh.shape[1:])
    segments = torch.cat([first, w_ih.detach().to(w_hh.dtype)]), w_hh.detach()
    return torch.cat([_words(segment, weights) for segment in segments], dim=2)


def _unwritten(*shape: int, like: torch.Tensor) -> torch.Tensor:
    """A float32 tensor of the stacked kernels' handoff, every word the bit pattern they wait on (UNWRITTEN)."""
    tensor = like.new_empty(*shape, dtype=torch.float32)
    tensor.view(torch.int32).fill_(-1)
    return tensor


class _StackedLSTM(torch.autograd.Function):
    """A stack of unidirectional LSTM layers on the stacked kernels: the layers run at once, each step of a layer as
    soon as the layer below has its output (see ``lstm_stacked.cu``)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        gx: torch.Tensor,
        w_ih: torch.Tensor,
        w_hh: torch.Tensor,
        bias: torch.Tensor,
        lengths: torch.Tensor,
        masks: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, steps, gate_rows = gx.shape
        layers, hidden = w_hh.shape[0], gate_rows // 4
        plan = _stack_plan(batch, layers, hidden, gx.device)
        if plan is None:
            raise RuntimeError(f"{layers} stacked layers of {hidden} units do not fit one block's shared memory")
        reviews, weights = plan
        forward, _, layout = _stack_kernels(hidden, reviews, weights, layers, _index(gx.device))
        save = any(ctx.needs_input_grad)
        words = _stack_words(w_ih, w_hh, weights)
        outs = _unwritten(layers, batch, steps, hidden, like=gx)  # the kernel writes every element
        gates = gx.new_empty(layers, batch, steps, gate_rows) if save else gx.new_empty(1)
        cells = gx.new_empty(layers, batch, steps, hidden) if save else gx.new_empty(1)
        h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
        counter = torch.zeros(1, dtype=torch.int32, device=gx.device)
        masked = int(masks.numel() > 0)
        forward(
            grid=(math.ceil(batch / reviews) * layers, 1, 1), block=(layout.forward_threads, 1, 1),
            shared_mem=layout.forward_shared,
            args=[gx, words, bias, lengths, h0, c0, masks, outs, gates, cells, h_n, c_n, counter, batch, steps,
                  masked, int(save)],
        )  # fmt: skip
        if save:
            ctx.save_for_backward(words, lengths, masks, h0, c0, outs, gates, cells)
            ctx.plan = reviews, weights
            ctx.tf32 = _cudnn_rnn_tf32()
        return outs[-1], h_n, c_n

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_out: torch.Tensor | None,
        grad_h_n: torch.Tensor | None,
        grad_c_n: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        words, lengths, masks, h0, c0, outs, gates, cells = ctx.saved_tensors
        layers, batch, steps, hidden = outs.shape
        reviews, weights = ctx.plan
        _, backward, layout = _stack_kernels(hidden, reviews, weights, layers, _index(outs.device))
        grad_out, grad_h_n, grad_c_n = _incoming(grad_out, grad_h_n, grad_c_n, outs[-1], h0)
        grad_inputs = _unwritten(max(layers - 1, 1), batch, steps, hidden, like=outs)
        grad_gates = torch.empty_like(gates)  # the kernel writes every element
        grad_bias = gates.new_empty(layers, batch, 4 * hidden)  # per review, summed below
        grad_h0, grad_c0 = torch.empty_like(h0), torch.empty_like(c0)
        counter = torch.zeros(1, dtype=torch.int32, device=outs.device)
        masked = int(masks.numel() > 0)
        backward(
            grid=(math.ceil(batch / reviews) * layers, 1, 1), block=(layout.backward_threads, 1, 1),
            shared_mem=layout.backward_shared,
            args=[grad_out, grad_h_n, grad_c_n, words, lengths, gates, cells, c0, masks, grad_inputs, grad_gates,
                  grad_bias, grad_h0, grad_c0, counter, batch, steps, masked],
        )  # fmt: skip
        rows = grad_gates.view(layers, batch * steps, 4 * hidden)
        grad_w_ih = grad_w_hh = None
        with _matmul_precision(ctx.tf32):
            if ctx.needs_input_grad[1]:  # sum over steps of dgates_t (x) the layer's input at t (dropout applied)
                inputs = outs[:-1] * masks if masked else outs[:-1]
                flat = inputs.reshape(layers - 1, batch * steps, hidden)
                grad_w_ih = torch.stack([_outer_product_sum(rows[i + 1], flat[i]) for i in range(layers - 1)])
            if ctx.needs_input_grad[2]:  # sum over steps of dgates_t (x) h_{t-1}
                grad_w_hh = torch.stack([
                    _outer_product_sum(rows[layer], _previous_states(outs[layer].unsqueeze(2), lengths,
                                                                     h0[layer : layer + 1]).view(-1, hidden))
                    for layer in range(layers)
                ])  # fmt: skip
        return grad_gates[0], grad_w_ih, grad_w_hh, grad_bias.sum(1), None, None, grad_h0, grad_c0


def _outer_product_sum(a: torch.Tensor, b: torch.Tensor, most_chunks: int = 16) -> torch.Tensor:
    """``a^T b`` for ``a`` (N x M) and ``b`` (N x K) whose N (positions) is far larger than M x K (a weight
    matrix), as products over up to ``most_chunks`` slices of N summed after. One product over all N gives cuBLAS few
    output tiles, each with a long reduction: on an H100 the kernel it chose for the weight gradients (TF32, 64 x 32
    tiles, twice a step) took 19% of the BiLSTM's profiled steps on this path (2026-12-07); the slices give it that
    many times more tiles to spread over the SMs. Hand-written: PyTorch's ``mm`` has no say in how cuBLAS splits a
    reduction."""
    positions = a.shape[0]
    chunks = math.gcd(positions, most_chunks)
    a_slices = a.view(chunks, positions // chunks, a.shape[1]).transpose(1, 2)
    return torch.bmm(a_slices, b.view(chunks, positions // chunks, b.shape[1])).sum(0)


def _previous_states(out: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_{t-1} at every position (B x T x D x H): the forward direction's previous position, the backward
    direction's next one, and ``h0`` where a direction starts (outputs at padding are zero, so position
    ``length`` of the backward direction reads zero before ``h0`` is written in)."""
    previous = torch.zeros_like(out)
    previous[:, 1:, 0] = out[:, :-1, 0]
    previous[:, 0, 0] = h0[0]
    if out.shape[2] == 2:
        previous[:, :-1, 1] = out[:, 1:, 1]
        rows = torch.arange(out.shape[0], device=out.device)
        previous[rows, lengths.long() - 1, 1] = h0[1]
    return previous


def persistent_lstm(
    gx: torch.Tensor,
    w_hh: torch.Tensor,
    lengths: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One LSTM layer's recurrence, one or two directions, on the GPU's persistent kernels, under autograd.

    ``gx`` (B x T x D x 4H): the input projections ``x W_ih^T`` of each direction, gates in PyTorch's order
    (input, forget, cell, output); ``w_hh`` (D x 4H x H); ``lengths`` (B,) of right-padded reviews; ``state``
    (h0, c0), each D x B x H (zeros if None); ``bias`` (D x 4H, zeros if None): ``b_ih + b_hh``, which the kernels
    add at each step and whose gradient they sum as they go (a pass over the gate gradients saved). Returns the
    outputs (B x T x D x H, zero at padding; direction 1 runs from each review's last token backwards) and the
    final (h, c), each D x B x H. Computed in float32 with ``W_hh`` in float32 or bfloat16 (see the module's
    docstring).
    """
    batch, _, directions, gate_rows = gx.shape
    hidden = gate_rows // 4
    if w_hh.shape != (directions, gate_rows, hidden):
        raise ValueError(f"w_hh has shape {tuple(w_hh.shape)}, expected {(directions, gate_rows, hidden)}")
    if bias is not None and bias.shape != (directions, gate_rows):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected {(directions, gate_rows)}")
    reason = persistent_support(hidden, gx.device)
    if reason is not None:
        raise RuntimeError(reason)
    if state is None:
        zeros = gx.new_zeros(directions, batch, hidden, dtype=torch.float32)
        state = (zeros, zeros)
    h0, c0 = (s.float().contiguous() for s in state)
    lengths = lengths.to(device=gx.device, dtype=torch.int32).contiguous()
    bias = gx.new_zeros(directions, gate_rows, dtype=torch.float32) if bias is None else bias.float().contiguous()
    out, h_n, c_n = _PersistentLSTM.apply(gx.float().contiguous(), w_hh, bias, lengths, h0, c0)
    return out, (h_n, c_n)


def persistent_layer(
    layer_input: torch.Tensor,
    weights: list[torch.Tensor],
    lengths: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One LSTM layer over ``layer_input`` (B x T x features): its input projections as one matrix product, then
    :func:`persistent_lstm`, which adds the biases. ``weights`` are the layer's in ``torch.lstm``'s order, per
    direction ``w_ih, w_hh, b_ih, b_hh``. Returns the outputs (B x T x D*H) and the final (h, c), each D x B x H."""
    batch, steps, _ = layer_input.shape
    directions = len(weights) // 4
    w_ih = torch.cat(weights[0::4])
    bias = torch.stack([b_ih + b_hh for b_ih, b_hh in zip(weights[2::4], weights[3::4], strict=True)])
    gx = _Projection.apply(layer_input, w_ih, _cudnn_rnn_tf32()).view(batch, steps, directions, -1)
    outputs, final = persistent_lstm(gx, torch.stack(weights[1::4]), lengths, state, bias)
    return outputs.view(batch, steps, -1), final


def persistent_stack(
    embedded: torch.Tensor,
    weights: list[list[torch.Tensor]],
    lengths: torch.Tensor,
    dropout: float = 0.0,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """A stack of unidirectional LSTM layers over ``embedded`` (B x T x features) in one launch of the stacked
    kernels, under autograd: the first layer's input projections as one matrix product, the other layers' inside the
    kernels. ``weights``: per layer ``w_ih, w_hh, b_ih, b_hh``; ``dropout``: the probability of zeroing each output
    of a layer below the top before the next layer reads it (``nn.LSTM``'s, 0 in evaluation); ``state`` (h0, c0),
    each L x B x H (zeros if None). Returns the top layer's outputs (B x T x H, zero at padding) and the final
    (h, c) of every layer, each L x B x H. Call :func:`stack_plan_exists` first: not every size fits."""
    batch, steps, _ = embedded.shape
    layers, hidden = len(weights), weights[0][1].shape[1]
    gx = _Projection.apply(embedded, weights[0][0], _cudnn_rnn_tf32()).view(batch, steps, 4 * hidden)
    w_ih = torch.stack([layer[0] for layer in weights[1:]]) if layers > 1 else gx.new_zeros(0, 4 * hidden, hidden)
    w_hh = torch.stack([layer[1] for layer in weights])
    bias = torch.stack([layer[2] + layer[3] for layer in weights]).float().contiguous()
    if dropout > 0 and layers > 1:
        ones = gx.new_ones(layers - 1, batch, steps, hidden, dtype=torch.float32)  # float32 under autocast too
        masks = torch.nn.functional.dropout(ones, dropout)
    else:
        masks = gx.new_empty(0)
    if state is None:
        zeros = gx.new_zeros(layers, batch, hidden, dtype=torch.float32)
        state = (zeros, zeros)
    h0, c0 = (s.float().contiguous() for s in state)
    lengths = lengths.to(device=gx.device, dtype=torch.int32).contiguous()
    out, h_n, c_n = _StackedLSTM.apply(gx.float().contiguous(), w_ih, w_hh, bias, lengths, masks, h0, c0)
    return out, (h_n, c_n)


def stack_plan_exists(layers: int, hidden: int, device: torch.device) -> bool:
    """Whether :func:`persistent_stack` runs ``layers`` layers of ``hidden`` units on ``device``: the persistent
    kernels run there (:func:`persistent_support`) and a stacked plan fits shared memory (which compiles its
    kernels, before any CUDA graph is captured)."""
    return persistent_support(hidden, device) is None and _stack_plan(1, layers, hidden, device) is not None
