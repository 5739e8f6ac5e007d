"""A fused LSTM layer in Triton (forward and backward), a prototype to replace cuDNN for the BiLSTM on GPU.

One kernel launch runs the whole recurrence of a layer: the grid is (directions, blocks of ``block_b`` batch
rows), and each program loops over time on its own rows. LSTM rows are independent across the batch, so no
program ever waits for another (no grid-wide synchronisation, unlike cuDNN's persistent kernels, which split the
weights over many SMs).

What runs where, for one layer of hidden size ``H`` and ``D`` directions:

* input projection, in PyTorch (one GEMM for all steps and both directions):
  ``x_gates = x @ [W_ih_fwd; W_ih_rev]^T + (b_ih + b_hh)``, shape (B, T, D*4H); its autograd gives the gradients
  of ``x``, ``W_ih`` and both biases from ``d_x_gates``;
* forward kernel: per step ``gates = x_gates[:, t] + h @ W_hh^T`` (``tl.dot`` over chunks of H), PyTorch's gate
  order (i, f, g, o), ``c = f*c + i*g``, ``h = o*tanh(c)``; it writes the outputs (B, T, D*H) and, for the
  backward pass, the gate activations (B, T, D*4H) and the cell states (B, T, D*H), in float32;
* backward kernel: the same grid, time in reverse processing order; per step the gate derivatives from the
  incoming output gradient plus the recurrent one, written for every step to ``d_gates`` (B, T, D*4H), and the
  recurrent gradient ``dh_prev = d_gates_t @ W_hh`` (``tl.dot``);
* ``dW_hh = sum_t d_gates_t^T @ h_{t-1}``: one GEMM in PyTorch over all steps.

The recurrent dots are float32 (``precision`` "ieee", "tf32" or "tf32x3"), or, with "bf16", take W_hh in bfloat16
(half the bytes that every step re-reads) and h or the gate gradients rounded to bfloat16, accumulating in
float32; nothing else changes (see :data:`PRECISIONS`).

Lengths: the forward direction runs positions 0..len-1 and writes zeros after; the reverse direction runs, at
step s, position len-1-s, so each review is read backwards from its real last token and no padding ever enters
the state (as ``nn.LSTM`` on a packed sequence). Final states: the forward direction's state after each row's
last real token, the reverse direction's after position 0.

Within a program the state lives in a small scratch buffer in global memory (L1/L2 resident, double-buffered by
step parity), not in registers: Triton cannot slice a register tensor, and each step needs ``h`` in K chunks for
the dot and produces it in N chunks. A ``tl.debug_barrier()`` (``bar.sync``) separates the steps; it also makes
the global writes of one step visible to the whole program (CTA) in the next.

Rows are sorted by length (longest first) before being cut into blocks, so each program loops over about the
lengths of its own rows, as a packed sequence would.

Measured on an H200 (README.md beside this file, ``bench.py``): exact against cuDNN, but about
2x slower than it (hidden 150, batch 128, 894 steps, one bidirectional layer forward + backward: 80 ms in float32,
65 ms with "bf16", against cuDNN's 39 ms): 16 programs leave most SMs idle and every step re-reads W_hh from L2.

Triton is optional: this module imports without it, and calling :func:`triton_lstm` then raises an ImportError
naming ``pip install triton``. On a machine without a GPU, Triton's interpreter runs the kernels on CPU tensors
when ``TRITON_INTERPRET=1`` is set (slow; for tests) before triton is first imported. This module imports
triton, and wraps its kernels with ``triton.jit``, only at the first call.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.nn.functional as F

# Triton is optional and imported at the first call (``_require_triton``): this module imports without it, and
# importing this module does not fix whether Triton runs in its interpreter (decided when triton is imported).
triton: Any = None
tl: Any = None

__all__ = [
    "PRECISIONS",
    "TritonLSTMConfig",
    "compile_report",
    "ptx_global_loads",
    "triton_lstm",
    "triton_lstm_layers",
]

# The recurrent dots' precision. "ieee", "tf32" and "tf32x3" are ``tl.dot``'s input precision for float32
# operands: "ieee" is exact float32 (CUDA cores, no tensor cores); "tf32" and "tf32x3" use tensor cores (tf32x3
# recovers nearly float32 accuracy with three tf32 products). "bf16": W_hh goes to the kernels in bfloat16 (cast
# once per call; half the bytes read per step) and the other operand (h forward, the gate gradients backward) is
# rounded to bfloat16 just before each ``tl.dot``, which accumulates in float32 on tensor cores; everything else
# (gates, states, saved activations, every gradient, dW_hh's GEMM) stays float32, and W_hh's gradient reaches the
# float32 parameter as with the other precisions.
PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@dataclasses.dataclass(frozen=True)
class TritonLSTMConfig:
    """Launch parameters of the kernels.

    ``block_b``: batch rows per program (>= 16, as ``tl.dot`` needs M >= 16); ``block_h``: the hidden chunk a
    program computes at a time (the N of the dots); ``block_k``: the reduction chunk (the K of the dots); both
    powers of two >= 16, H need not be one (masks cut the state chunks at H, and W_hh goes to the kernels
    zero-padded to a multiple of both, so that its tiles load unmasked). ``num_warps``, ``num_stages`` (software
    pipelining of the K loop; None: Triton's default) and ``maxnreg`` (ptxas's register limit per thread, ``.maxnreg``;
    None: ptxas's own choice) go to the launch. ``precision``: one of :data:`PRECISIONS`.

    The defaults compile for sm_90 (H200) at H=150 and H=192 without register spills in either kernel, with the
    launcher's 16-byte pointer alignment (:func:`compile_report`; triton 3.6's ptxas, H=150: forward 120, backward
    129 registers; "bf16": 134 and 135; "tf32": 148 and 140). ``maxnreg=192`` is what avoids spills there: left to
    itself, ptxas caps both kernels at 128 registers or fewer (for occupancy) and spills 4 to 36 bytes (H=150 ieee:
    forward 80 registers and 8 bytes, backward 128 and 16). The kernels need 256 threads (8 warps) or ptxas spills.
    """

    block_b: int = 16
    block_h: int = 32
    block_k: int = 32
    num_warps: int = 8
    precision: str = "ieee"
    num_stages: int | None = None
    maxnreg: int | None = 192

    def __post_init__(self) -> None:
        for name, value in (("block_b", self.block_b), ("block_h", self.block_h), ("block_k", self.block_k)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (got {value})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} (got {self.precision!r})")

    @property
    def bf16(self) -> bool:
        """Whether the recurrent dots take bfloat16 operands (W_hh passed in bfloat16)."""
        return self.precision == "bf16"

    def kernel_constants(self) -> dict[str, Any]:
        """The precision constexprs of both kernels: ``PRECISION`` (``tl.dot``'s input precision for float32
        operands; unused under bf16, where ``tl.dot`` gets bfloat16 operands and no input precision) and ``BF16``."""
        return {"PRECISION": "ieee" if self.bf16 else self.precision, "BF16": self.bf16}

    def launch_options(self) -> dict[str, int]:
        """Keyword arguments of the kernel launch."""
        options = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            options["num_stages"] = self.num_stages
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        return options

    def as_dict(self) -> dict[str, Any]:
        """The parameters, for reports."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Kernels. Plain functions here, wrapped by ``triton.jit`` at the first call (see ``_kernels``), so that whether
# Triton's interpreter runs them is decided then, not at import. tanh is written as 2*sigmoid(2x) - 1 (Triton
# has no portable tanh in ``tl``; libdevice's is CUDA-only and the interpreter lacks it); its absolute error is
# a few float32 ulps of 1.
# ---------------------------------------------------------------------------------------------------------------


def _lstm_fwd_kernel(
    xg_ptr,  # (B, T, D*4H) float32: x @ W_ih^T + b_ih + b_hh; strides (sxb, sxt, 1)
    wt_ptr,  # (D, HP, 4*HP) float32 (bfloat16 if BF16), contiguous, zero-padded: W_hh transposed per direction
    h0_ptr,  # (D, B, H) float32, contiguous
    c0_ptr,  # (D, B, H)
    rows_ptr,  # (B,) int32: program slot -> batch row (rows sorted by length, longest first)
    lens_ptr,  # (B,) int32: the length of each slot's row
    out_ptr,  # (B, T, D*H) float32, contiguous, zero-filled
    act_ptr,  # (B, T, D*4H) float32 gate activations (i, f, g, o), for backward (SAVE)
    cs_ptr,  # (B, T, D*H) float32 cell states, for backward (SAVE)
    hs_ptr,  # (D, 2, B, H) float32 scratch: h, double-buffered by step parity
    cc_ptr,  # (D, 2, B, H) float32 scratch: c
    hn_ptr,  # (D, B, H) float32: final h
    cn_ptr,  # (D, B, H) float32: final c
    B,
    T,
    sxb,
    sxt,
    H: tl.constexpr,
    HP: tl.constexpr,  # H padded to a multiple of BLOCK_H and BLOCK_K: the weights' layout (``_padded_hidden``)
    D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SAVE: tl.constexpr,
    PRECISION: tl.constexpr,
    BF16: tl.constexpr,
):
    direction = tl.program_id(0)
    slots = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    slot_mask = slots < B
    rows = tl.load(rows_ptr + slots, mask=slot_mask, other=0).to(tl.int64)
    lens = tl.load(lens_ptr + slots, mask=slot_mask, other=0)
    steps = tl.load(lens_ptr + tl.program_id(1) * BLOCK_B)  # the block's longest row (rows sorted by length)
    reverse = direction == 1

    G: tl.constexpr = 4 * H
    slot64 = slots.to(tl.int64)
    state = direction * 2 * B * H  # this direction's scratch, buffer 0
    xg_rows = xg_ptr + rows[:, None] * sxb + direction * G
    out_rows = out_ptr + rows[:, None] * (T * D * H) + direction * H
    act_rows = act_ptr + rows[:, None] * (T * D * G) + direction * G
    cs_rows = cs_ptr + rows[:, None] * (T * D * H) + direction * H
    # W_hh^T, padded (see ``_padded_weights``): gate g's (K, N) block at columns g*HP, every row and gate block HP
    # long with zeros past H. The chunks below never reach past HP (HP is a multiple of BLOCK_H and BLOCK_K), so
    # the weight tiles load unmasked, and every row, gate and chunk starts at a multiple of 16 elements: 16-byte
    # aligned and contiguous, vector loads (the real and padded rows of W^T met by a chunk k >= H are multiplied
    # by h_k's masked zeros; the padded columns n >= H give accumulators that no store keeps).
    tl.static_assert(HP % BLOCK_H == 0 and HP % BLOCK_K == 0 and HP >= H)
    GP: tl.constexpr = 4 * HP
    wt = wt_ptr + direction * HP * GP

    # The initial state into scratch buffer 0.
    for n0 in range(0, H, BLOCK_H):
        cols = n0 + tl.arange(0, BLOCK_H)
        mask = slot_mask[:, None] & (cols < H)[None, :]
        first = (direction * B + rows[:, None]) * H + cols[None, :]
        scratch = state + slot64[:, None] * H + cols[None, :]
        tl.store(hs_ptr + scratch, tl.load(h0_ptr + first, mask=mask, other=0.0), mask=mask)
        tl.store(cc_ptr + scratch, tl.load(c0_ptr + first, mask=mask, other=0.0), mask=mask)
    tl.debug_barrier()

    # A while loop, not ``range(steps)``: Triton's interpreter cannot take a runtime scalar as a range bound
    # under numpy 2 (its scalars are 1-element arrays), and the steps depend on each other anyway.
    s = 0
    while s < steps:
        buf_in = state + (s % 2) * B * H
        buf_out = state + ((s + 1) % 2) * B * H
        valid = (s < lens) & slot_mask
        pos = tl.where(reverse, lens - 1 - s, s)
        pos = tl.where(valid, pos, 0).to(tl.int64)
        for n0 in range(0, H, BLOCK_H):
            cols = n0 + tl.arange(0, BLOCK_H)
            col_mask = cols < H
            mask = valid[:, None] & col_mask[None, :]
            xg = xg_rows + pos[:, None] * sxt + cols[None, :]
            acc_i = tl.load(xg, mask=mask, other=0.0)
            acc_f = tl.load(xg + H, mask=mask, other=0.0)
            acc_g = tl.load(xg + 2 * H, mask=mask, other=0.0)
            acc_o = tl.load(xg + 3 * H, mask=mask, other=0.0)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < H
                h_k = tl.load(
                    hs_ptr + buf_in + slot64[:, None] * H + ks[None, :],
                    mask=slot_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                w = wt + ks[:, None] * GP + cols[None, :]  # unmasked: inside the padded layout
                if BF16:  # bfloat16 operands (W^T is bfloat16 in memory), float32 accumulators
                    h_b = h_k.to(tl.bfloat16)
                    acc_i = tl.dot(h_b, tl.load(w), acc_i)
                    acc_f = tl.dot(h_b, tl.load(w + HP), acc_f)
                    acc_g = tl.dot(h_b, tl.load(w + 2 * HP), acc_g)
                    acc_o = tl.dot(h_b, tl.load(w + 3 * HP), acc_o)
                else:
                    acc_i = tl.dot(h_k, tl.load(w), acc_i, input_precision=PRECISION)
                    acc_f = tl.dot(h_k, tl.load(w + HP), acc_f, input_precision=PRECISION)
                    acc_g = tl.dot(h_k, tl.load(w + 2 * HP), acc_g, input_precision=PRECISION)
                    acc_o = tl.dot(h_k, tl.load(w + 3 * HP), acc_o, input_precision=PRECISION)
            gate_i = tl.sigmoid(acc_i)
            gate_f = tl.sigmoid(acc_f)
            gate_g = 2.0 * tl.sigmoid(2.0 * acc_g) - 1.0
            gate_o = tl.sigmoid(acc_o)
            scratch = slot64[:, None] * H + cols[None, :]
            state_mask = slot_mask[:, None] & col_mask[None, :]
            c_old = tl.load(cc_ptr + buf_in + scratch, mask=state_mask, other=0.0)
            h_old = tl.load(hs_ptr + buf_in + scratch, mask=state_mask, other=0.0)
            c_new = gate_f * c_old + gate_i * gate_g
            h_new = gate_o * (2.0 * tl.sigmoid(2.0 * c_new) - 1.0)
            # Rows past their length keep their state (it is their final state).
            tl.store(cc_ptr + buf_out + scratch, tl.where(valid[:, None], c_new, c_old), mask=state_mask)
            tl.store(hs_ptr + buf_out + scratch, tl.where(valid[:, None], h_new, h_old), mask=state_mask)
            at = pos[:, None] * (D * H) + cols[None, :]
            tl.store(out_rows + at, h_new, mask=mask)
            if SAVE:
                tl.store(cs_rows + at, c_new, mask=mask)
                act = act_rows + pos[:, None] * (D * G) + cols[None, :]
                tl.store(act, gate_i, mask=mask)
                tl.store(act + H, gate_f, mask=mask)
                tl.store(act + 2 * H, gate_g, mask=mask)
                tl.store(act + 3 * H, gate_o, mask=mask)
        tl.debug_barrier()
        s += 1

    last = state + (steps % 2) * B * H
    for n0 in range(0, H, BLOCK_H):
        cols = n0 + tl.arange(0, BLOCK_H)
        mask = slot_mask[:, None] & (cols < H)[None, :]
        final = (direction * B + rows[:, None]) * H + cols[None, :]
        scratch = last + slot64[:, None] * H + cols[None, :]
        tl.store(hn_ptr + final, tl.load(hs_ptr + scratch, mask=mask, other=0.0), mask=mask)
        tl.store(cn_ptr + final, tl.load(cc_ptr + scratch, mask=mask, other=0.0), mask=mask)


def _lstm_bwd_kernel(
    dout_ptr,  # (B, T, D*H) float32, contiguous: gradient of the outputs
    act_ptr,  # (B, T, D*4H) saved gate activations
    cs_ptr,  # (B, T, D*H) saved cell states
    c0_ptr,  # (D, B, H) initial cell state
    w_ptr,  # (D, 4*HP, HP) float32 (bfloat16 if BF16), contiguous, zero-padded: W_hh per gate (``_padded_weights``)
    dhn_ptr,  # (D, B, H) gradient of the final h
    dcn_ptr,  # (D, B, H) gradient of the final c
    dg_ptr,  # (B, T, D*4H) float32, zero-filled: gradient of the gate pre-activations (= of x_gates)
    dh_ptr,  # (D, 2, B, H) scratch: recurrent dh, double-buffered
    dc_ptr,  # (D, 2, B, H) scratch: recurrent dc
    dh0_ptr,  # (D, B, H) gradient of h0
    dc0_ptr,  # (D, B, H) gradient of c0
    rows_ptr,
    lens_ptr,
    B,
    T,
    H: tl.constexpr,
    HP: tl.constexpr,  # as in the forward kernel
    D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BF16: tl.constexpr,
):
    direction = tl.program_id(0)
    slots = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    slot_mask = slots < B
    rows = tl.load(rows_ptr + slots, mask=slot_mask, other=0).to(tl.int64)
    lens = tl.load(lens_ptr + slots, mask=slot_mask, other=0)
    steps = tl.load(lens_ptr + tl.program_id(1) * BLOCK_B)  # the block's longest row (rows sorted by length)
    reverse = direction == 1

    G: tl.constexpr = 4 * H
    slot64 = slots.to(tl.int64)
    state = direction * 2 * B * H
    dout_rows = dout_ptr + rows[:, None] * (T * D * H) + direction * H
    cs_rows = cs_ptr + rows[:, None] * (T * D * H) + direction * H
    act_rows = act_ptr + rows[:, None] * (T * D * G) + direction * G
    dg_rows = dg_ptr + rows[:, None] * (T * D * G) + direction * G
    # W_hh padded: gate g's (K, N) block at rows g*HP, HP rows of HP columns, zeros past H (as the forward kernel's
    # W^T): unmasked, aligned tile loads.
    tl.static_assert(HP % BLOCK_H == 0 and HP % BLOCK_K == 0 and HP >= H)
    w = w_ptr + direction * 4 * HP * HP

    for n0 in range(0, H, BLOCK_H):
        cols = n0 + tl.arange(0, BLOCK_H)
        mask = slot_mask[:, None] & (cols < H)[None, :]
        final = (direction * B + rows[:, None]) * H + cols[None, :]
        scratch = state + slot64[:, None] * H + cols[None, :]
        tl.store(dh_ptr + scratch, tl.load(dhn_ptr + final, mask=mask, other=0.0), mask=mask)
        tl.store(dc_ptr + scratch, tl.load(dcn_ptr + final, mask=mask, other=0.0), mask=mask)
    tl.debug_barrier()

    it = 0
    while it < steps:  # see the forward kernel's while loop
        s = steps - 1 - it  # the processing step, latest first
        buf_in = state + (it % 2) * B * H
        buf_out = state + ((it + 1) % 2) * B * H
        valid = (s < lens) & slot_mask
        pos = tl.where(reverse, lens - 1 - s, s)
        pos = tl.where(valid, pos, 0).to(tl.int64)
        # The previous processing step's position (its c is this step's c_prev); none at s == 0 (c0 then).
        has_prev = valid & (s > 0)
        prev = tl.where(reverse, pos + 1, pos - 1)
        prev = tl.where(has_prev, prev, 0)
        # Phase A: gate derivatives and the recurrent dc, elementwise, chunk by chunk.
        for n0 in range(0, H, BLOCK_H):
            cols = n0 + tl.arange(0, BLOCK_H)
            col_mask = cols < H
            mask = valid[:, None] & col_mask[None, :]
            state_mask = slot_mask[:, None] & col_mask[None, :]
            scratch = slot64[:, None] * H + cols[None, :]
            at = pos[:, None] * (D * H) + cols[None, :]
            dh = tl.load(dh_ptr + buf_in + scratch, mask=state_mask, other=0.0)
            dh += tl.load(dout_rows + at, mask=mask, other=0.0)
            dc = tl.load(dc_ptr + buf_in + scratch, mask=state_mask, other=0.0)
            act = act_rows + pos[:, None] * (D * G) + cols[None, :]
            gate_i = tl.load(act, mask=mask, other=0.0)
            gate_f = tl.load(act + H, mask=mask, other=0.0)
            gate_g = tl.load(act + 2 * H, mask=mask, other=0.0)
            gate_o = tl.load(act + 3 * H, mask=mask, other=0.0)
            c = tl.load(cs_rows + at, mask=mask, other=0.0)
            c_prev = tl.load(
                cs_rows + prev[:, None] * (D * H) + cols[None, :],
                mask=has_prev[:, None] & col_mask[None, :],
                other=0.0,
            )
            c_first = tl.load(c0_ptr + (direction * B + rows[:, None]) * H + cols[None, :], mask=mask, other=0.0)
            c_prev = tl.where(has_prev[:, None], c_prev, c_first)
            tanh_c = 2.0 * tl.sigmoid(2.0 * c) - 1.0
            dc_total = dc + dh * gate_o * (1.0 - tanh_c * tanh_c)
            d_i = dc_total * gate_g * gate_i * (1.0 - gate_i)
            d_f = dc_total * c_prev * gate_f * (1.0 - gate_f)
            d_g = dc_total * gate_i * (1.0 - gate_g * gate_g)
            d_o = dh * tanh_c * gate_o * (1.0 - gate_o)
            dg = dg_rows + pos[:, None] * (D * G) + cols[None, :]
            tl.store(dg, d_i, mask=mask)
            tl.store(dg + H, d_f, mask=mask)
            tl.store(dg + 2 * H, d_g, mask=mask)
            tl.store(dg + 3 * H, d_o, mask=mask)
            tl.store(dc_ptr + buf_out + scratch, tl.where(valid[:, None], dc_total * gate_f, dc), mask=state_mask)
        tl.debug_barrier()  # d_gates of this step, written above, are read below by other threads
        # Phase B: dh_prev = d_gates @ W_hh, chunk by chunk.
        for n0 in range(0, H, BLOCK_H):
            cols = n0 + tl.arange(0, BLOCK_H)
            col_mask = cols < H
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for gate in tl.static_range(4):
                for k0 in range(0, H, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_mask = ks < H
                    d_k = tl.load(
                        dg_rows + pos[:, None] * (D * G) + gate * H + ks[None, :],
                        mask=valid[:, None] & k_mask[None, :],
                        other=0.0,
                    )
                    w_k = tl.load(w + (gate * HP + ks[:, None]) * HP + cols[None, :])  # unmasked: padded layout
                    if BF16:  # bfloat16 operands (W is bfloat16 in memory), float32 accumulator
                        acc = tl.dot(d_k.to(tl.bfloat16), w_k, acc)
                    else:
                        acc = tl.dot(d_k, w_k, acc, input_precision=PRECISION)
            scratch = slot64[:, None] * H + cols[None, :]
            state_mask = slot_mask[:, None] & col_mask[None, :]
            dh_old = tl.load(dh_ptr + buf_in + scratch, mask=state_mask, other=0.0)
            tl.store(dh_ptr + buf_out + scratch, tl.where(valid[:, None], acc, dh_old), mask=state_mask)
        tl.debug_barrier()
        it += 1

    last = state + (steps % 2) * B * H
    for n0 in range(0, H, BLOCK_H):
        cols = n0 + tl.arange(0, BLOCK_H)
        mask = slot_mask[:, None] & (cols < H)[None, :]
        first = (direction * B + rows[:, None]) * H + cols[None, :]
        scratch = last + slot64[:, None] * H + cols[None, :]
        tl.store(dh0_ptr + first, tl.load(dh_ptr + scratch, mask=mask, other=0.0), mask=mask)
        tl.store(dc0_ptr + first, tl.load(dc_ptr + scratch, mask=mask, other=0.0), mask=mask)


def _padded_hidden(hidden: int, config: TritonLSTMConfig) -> int:
    """``HP``: the hidden size rounded up to a multiple of both ``block_h`` and ``block_k`` (powers of two, so of
    the larger), the length of every row and gate block of the kernels' weight layout (160 for H=150 with blocks of
    32; H itself when it is a multiple already)."""
    block = max(config.block_h, config.block_k)
    return -(-hidden // block) * block


def _padded_weights(w_hh: torch.Tensor, padded: int, transpose: bool) -> torch.Tensor:
    """W_hh (D, 4H, H) in the kernels' zero-padded layout, in its own dtype: ``transpose`` (forward) gives
    (D, HP, 4*HP) with ``out[d, k, g*HP + n] = w_hh[d, g*H + n, k]``, else (backward) (D, 4*HP, HP) with
    ``out[d, g*HP + k, n] = w_hh[d, g*H + k, n]``; zeros wherever k or n >= H. Rebuilt per call (a few hundred KB);
    the gradient of W_hh never sees this layout (``dW_hh`` is a GEMM of d_gates and h in PyTorch)."""
    directions, gates, hidden = w_hh.shape
    blocks = w_hh.view(directions, 4, hidden, hidden)  # (d, g, n, k)
    if transpose:
        if padded == hidden:
            return blocks.permute(0, 3, 1, 2).contiguous().view(directions, hidden, gates)  # (reshape: a view)
        out = w_hh.new_zeros(directions, padded, 4, padded)
        out[:, :hidden, :, :hidden] = blocks.permute(0, 3, 1, 2)
        return out.view(directions, padded, 4 * padded)
    if padded == hidden:
        return w_hh.contiguous()
    out = w_hh.new_zeros(directions, 4, padded, padded)
    out[:, :, :hidden, :hidden] = blocks
    return out.view(directions, 4 * padded, padded)


_JITTED: dict[bool, tuple[Any, Any]] = {}


def _require_triton() -> None:
    """Import triton into this module's globals (the kernels read ``tl`` from them when they are compiled)."""
    global triton, tl
    if triton is None:
        try:
            import triton as triton_module
            import triton.language as tl_module
        except ImportError as err:
            raise ImportError(
                "the Triton LSTM needs Triton: pip install triton (on a CUDA machine, the version your torch pins; "
                "without a GPU, set TRITON_INTERPRET=1 to run it in Triton's interpreter)"
            ) from err
        triton, tl = triton_module, tl_module


def _kernels() -> tuple[Any, Any]:
    """The jitted (forward, backward) kernels, for the current interpreter setting."""
    _require_triton()
    interpret = _interpreting()
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.sigmoid, InterpretedFunction) != interpret:
        # triton.language's own functions were wrapped, interpreted or compiled, when triton was imported.
        raise RuntimeError(
            f"TRITON_INTERPRET is {'on' if interpret else 'off'} now but was not when triton was first imported: "
            "set it before anything imports triton"
        )
    if interpret not in _JITTED:
        # ``triton.jit`` reads TRITON_INTERPRET when it wraps a function: interpreted or compiled is decided here.
        _JITTED[interpret] = (triton.jit(_lstm_fwd_kernel), triton.jit(_lstm_bwd_kernel))
    return _JITTED[interpret]


def ptx_global_loads(ptx: str, weight_lines: set[int] | None = None) -> dict[str, dict[str, int]]:
    """Count the global-memory loads in a kernel's PTX by instruction form and width: ``ld.global`` (vectors as
    ``ld.global.v2.b32``, ``ld.global.v4.b32``; scalars as ``ld.global.b32``, ``ld.global.b16``) and the
    asynchronous copies to shared memory that Triton's software pipelining makes of the K loops' tile loads
    (``cp.async.16B``, ``cp.async.8B``, ``cp.async.4B``: bytes per thread and instruction). Static counts (each
    instruction once, however often it runs). ``weight_lines``: line numbers of this module whose loads are W_hh
    tiles; those loads (by the PTX's ``.loc`` line info) are counted under ``"weights"``, the others under
    ``"other"``."""
    import re

    source_file = os.path.abspath(__file__)
    # This module's file, by name: Triton's cache may hand back PTX compiled from an identical copy elsewhere (its
    # key has the kernel's source and first line, not the file's path).
    files = re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)
    ours = {number for number, path in files if os.path.basename(path) == os.path.basename(source_file)}
    counts: dict[str, dict[str, int]] = {"weights": {}, "other": {}}
    line = None
    for text in ptx.splitlines():
        if (loc := re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", text)) is not None:
            line = int(loc.group(2)) if loc.group(1) in ours else None
            continue
        instruction = re.search(r"\b(ld\.global\S*|cp\.async\.(?:ca|cg)\.shared\.global)\s+(.*)", text)
        if instruction is None:
            continue
        opcode = instruction.group(1)
        if opcode.startswith("cp.async"):
            size = instruction.group(2).split(",")[2].strip()
            key = f"cp.async.{int(size, 0)}B"
        else:
            parts = opcode.split(".")
            vector = [part for part in parts if re.fullmatch(r"v\d+", part)]
            key = ".".join(["ld.global", *vector, parts[-1]])
        group = counts["weights" if weight_lines and line in weight_lines else "other"]
        group[key] = group.get(key, 0) + 1
    return counts


def _weight_load_lines() -> set[int]:
    """The line numbers of this module that load W_hh tiles in the kernels (``tl.load(w``...)."""
    import inspect
    import re

    lines = set()
    for kernel in (_lstm_fwd_kernel, _lstm_bwd_kernel):
        source, first = inspect.getsourcelines(kernel)
        lines |= {first + i for i, text in enumerate(source) if re.search(r"tl\.load\(w[\s)]", text)}
    return lines


def compile_report(
    hidden: int,
    config: TritonLSTMConfig | None = None,
    directions: int = 2,
    arch: int = 90,
    aligned_pointers: bool = True,
) -> dict[str, dict[str, Any]]:
    """Compile both kernels for an NVIDIA GPU of compute capability ``arch`` (90: H100/H200) without one, and
    report what ``ptxas -v`` says of each: registers per thread, spill bytes, shared memory; and, from the PTX,
    the global loads by width (:func:`ptx_global_loads`: ``"weights"``, the W_hh tiles, and ``"other"``). Needs
    Triton's NVIDIA backend (its bundled ptxas) and TRITON_INTERPRET off. Returns ``{"forward": {...},
    "backward": {...}}``.

    ``aligned_pointers``: compile as a launch does with tensors whose data starts 16-byte aligned (Triton's
    launcher then marks the pointer arguments ``tt.divisibility=16``, which vector loads need; every tensor the
    wrapper passes is freshly allocated or contiguous, so in practice aligned). The integer arguments (B, T, the
    x_gates strides) stay unspecialised here (a launch specialises those divisible by 16): never more vectorised
    than a real launch.
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget

    config = config or TritonLSTMConfig()
    fwd, bwd = _kernels()
    if _interpreting():
        raise RuntimeError("compile_report needs TRITON_INTERPRET off")
    constants = {
        "H": hidden, "HP": _padded_hidden(hidden, config), "D": directions, "BLOCK_B": config.block_b,
        "BLOCK_H": config.block_h, "BLOCK_K": config.block_k, **config.kernel_constants(),
    }  # fmt: skip
    weights = ("wt_ptr", "w_ptr")  # W_hh^T (forward), W_hh (backward): bfloat16 under bf16
    weight_lines = _weight_load_lines()
    report = {}
    for name, kernel, consts in (("forward", fwd, {**constants, "SAVE": True}), ("backward", bwd, constants)):
        signature, attrs = {}, {}
        for index, arg in enumerate(kernel.arg_names):
            if arg in consts:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = "*i32" if arg in ("rows_ptr", "lens_ptr") else "*fp32"
                if arg in weights and config.bf16:
                    signature[arg] = "*bf16"
                if aligned_pointers:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            else:
                signature[arg] = "i32"
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=config.launch_options())
        with tempfile.TemporaryDirectory() as folder:
            ptx = os.path.join(folder, "kernel.ptx")
            with open(ptx, "w") as handle:
                handle.write(compiled.asm["ptx"])
            ptxas = triton.knobs.nvidia.ptxas.path
            suffix = "a" if arch >= 90 else ""
            result = subprocess.run(
                [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", ptx, "-o", os.path.join(folder, "kernel.cubin")],
                capture_output=True,
                text=True,
                check=True,
            )
        numbers = {
            key: int(match.group(1)) if (match := re.search(pattern, result.stderr)) else 0
            for key, pattern in (
                ("registers", r"Used (\d+) registers"),
                ("spill_stores", r"(\d+) bytes spill stores"),
                ("spill_loads", r"(\d+) bytes spill loads"),
            )
        }
        report[name] = {
            **numbers,
            "shared_bytes": compiled.metadata.shared,
            "global_loads": ptx_global_loads(compiled.asm["ptx"], weight_lines),
        }
    return report


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "the Triton LSTM got CPU tensors: run it on a GPU, or set TRITON_INTERPRET=1 (Triton's interpreter, "
            "slow) before triton is first imported"
        )


class _TritonLSTMFunction(torch.autograd.Function):
    """The recurrent part of one layer (both directions at once); inputs and outputs float32.

    Inputs: ``x_gates`` (B, T, D*4H), ``w_hh`` (D, 4H, H), ``h0`` and ``c0`` (D, B, H), ``rows`` and ``lens``
    (B,) int32 on the device (rows sorted by length and their lengths), and the config.
    Outputs: ``outputs`` (B, T, D*H), zero past each row's length; ``h_n`` and ``c_n`` (D, B, H).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x_gates: torch.Tensor,
        w_hh: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
        rows: torch.Tensor,
        lens: torch.Tensor,
        config: TritonLSTMConfig,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fwd, _ = _kernels()
        batch, steps, _ = x_gates.shape
        directions, gates, hidden = w_hh.shape
        if x_gates.stride(-1) != 1:
            x_gates = x_gates.contiguous()
        save = any(ctx.needs_input_grad[:4])
        out = x_gates.new_zeros(batch, steps, directions * hidden)
        if save:
            act = x_gates.new_empty(batch, steps, directions * gates)
            cs = x_gates.new_empty(batch, steps, directions * hidden)
        else:
            act = cs = out  # never written (SAVE=False)
        hs = x_gates.new_empty(directions, 2, batch, hidden)
        cc = torch.empty_like(hs)
        h_n = x_gates.new_empty(directions, batch, hidden)
        c_n = torch.empty_like(h_n)
        # W_hh^T per direction, zero-padded (D, HP, 4*HP): bfloat16 under bf16 (cast before the copy: half the bytes).
        padded = _padded_hidden(hidden, config)
        w_t = _padded_weights(w_hh.bfloat16() if config.bf16 else w_hh, padded, transpose=True)
        grid = (directions, triton.cdiv(batch, config.block_b))
        fwd[grid](
            x_gates, w_t, h0.contiguous(), c0.contiguous(), rows, lens, out, act, cs, hs, cc, h_n, c_n,
            batch, steps, x_gates.stride(0), x_gates.stride(1),
            H=hidden, HP=padded, D=directions, BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_K=config.block_k,
            SAVE=save, **config.kernel_constants(), **config.launch_options(),
        )  # fmt: skip
        if save:
            ctx.save_for_backward(w_hh, h0, c0, rows, lens, out, act, cs)
            ctx.config = config
        return out, h_n, c_n

    @staticmethod
    def backward(
        ctx: Any, d_out: torch.Tensor | None, d_hn: torch.Tensor | None, d_cn: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        _, bwd = _kernels()
        w_hh, h0, c0, rows, lens, out, act, cs = ctx.saved_tensors
        config: TritonLSTMConfig = ctx.config
        directions, gates, hidden = w_hh.shape
        batch, steps, _ = out.shape
        d_out = torch.zeros_like(out) if d_out is None else d_out.float().contiguous()
        d_hn = h0.new_zeros(directions, batch, hidden) if d_hn is None else d_hn.float().contiguous()
        d_cn = h0.new_zeros(directions, batch, hidden) if d_cn is None else d_cn.float().contiguous()
        d_gates = out.new_zeros(batch, steps, directions * gates)
        dh = out.new_empty(directions, 2, batch, hidden)
        dc = torch.empty_like(dh)
        d_h0 = out.new_empty(directions, batch, hidden)
        d_c0 = torch.empty_like(d_h0)
        # W_hh zero-padded, (D, 4*HP, HP); the saved w_hh is float32 (D, 4H, H).
        padded = _padded_hidden(hidden, config)
        w_k = _padded_weights(w_hh.bfloat16() if config.bf16 else w_hh, padded, transpose=False)
        grid = (directions, triton.cdiv(batch, config.block_b))
        bwd[grid](
            d_out, act, cs, c0.contiguous(), w_k, d_hn, d_cn, d_gates, dh, dc, d_h0, d_c0, rows, lens,
            batch, steps,
            H=hidden, HP=padded, D=directions, BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_K=config.block_k,
            **config.kernel_constants(), **config.launch_options(),
        )  # fmt: skip
        d_w_hh = None
        if ctx.needs_input_grad[1]:
            # h_{t-1} of every step, (B, T, D, H): the forward direction's is the output one position earlier (h0
            # at position 0); the reverse direction's the output one position later (h0 at the last real one).
            h = out.view(batch, steps, directions, hidden)
            h_prev = torch.empty_like(h)
            h_prev[:, 0, 0] = h0[0]
            h_prev[:, 1:, 0] = h[:, :-1, 0]
            if directions == 2:
                h_prev[:, :-1, 1] = h[:, 1:, 1]
                h_prev[:, -1, 1] = 0.0
                lengths = torch.empty_like(lens).scatter_(0, rows.long(), lens).long()  # back to batch order
                batch_index = torch.arange(batch, device=out.device)
                h_prev[batch_index, (lengths - 1).clamp(min=0), 1] = h0[1]
            # dW_hh[d] = sum over rows and steps of d_gates^T h_prev: one batched GEMM over (B*T), no copies.
            d_flat = d_gates.view(-1, directions, gates).permute(1, 2, 0)  # (D, 4H, B*T)
            d_w_hh = torch.bmm(d_flat, h_prev.view(-1, directions, hidden).transpose(0, 1))
        return d_gates, d_w_hh, d_h0, d_c0, None, None, None


def _layer_weights(weights: list[torch.Tensor] | tuple[torch.Tensor, ...], directions: int) -> list[tuple]:
    """Per direction (w_ih, w_hh, b_ih or None, b_hh or None) from ``torch.lstm``'s flat order."""
    per = len(weights) // directions
    if per not in (2, 4) or per * directions != len(weights):
        raise ValueError(
            f"expected {2 * directions} or {4 * directions} weights for {directions} direction(s) in torch.lstm's "
            f"order (w_ih, w_hh[, b_ih, b_hh] per direction), got {len(weights)}"
        )
    out = []
    for d in range(directions):
        group = list(weights[d * per : (d + 1) * per])
        out.append((group[0], group[1], group[2] if per == 4 else None, group[3] if per == 4 else None))
    return out


def triton_lstm(
    x: torch.Tensor,
    lengths: torch.Tensor,
    weights: list[torch.Tensor] | tuple[torch.Tensor, ...],
    bidirectional: bool = False,
    hx: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: TritonLSTMConfig | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer on right-padded, batch-first ``x`` (B, T, I), as ``nn.LSTM`` on the packed sequence.

    ``lengths`` (B,), any device, each in [0, T]; ``weights`` in ``torch.lstm``'s order: ``w_ih`` (4H, I),
    ``w_hh`` (4H, H), ``b_ih`` (4H), ``b_hh`` (4H) per direction (biases optional, all or none); ``hx`` optional
    ``(h0, c0)``, each (D, B, H). Returns ``outputs`` (B, T, D*H) with zeros past each row's length, ``h_n`` and
    ``c_n`` (D, B, H): the forward direction's state at each row's last real token, the reverse direction's after
    position 0. Everything differentiable (x, weights, hx) gets gradients. Computed in float32 (but for the
    recurrent dots' operands under ``config.precision="bf16"``); under a bfloat16 autocast the input projection
    runs in bfloat16 and its result is cast to float32 for the recurrence.
    ``validate=False`` skips the range check of ``lengths`` (a host sync; leave it off under CUDA graph capture).
    """
    _require_triton()
    _check_device(x)
    config = config or TritonLSTMConfig()
    directions = 2 if bidirectional else 1
    groups = _layer_weights(weights, directions)
    batch, steps, _ = x.shape
    hidden = groups[0][1].shape[1]
    w_ih = torch.cat([g[0] for g in groups], dim=0)
    bias = None
    if groups[0][2] is not None:
        bias = torch.cat([g[2] + g[3] for g in groups], dim=0)
    x_gates = F.linear(x, w_ih, bias).float()  # (B, T, D*4H): one GEMM for every step and direction
    w_hh = torch.stack([g[1] for g in groups]).float()  # (D, 4H, H)
    if hx is None:
        h0 = c0 = x_gates.new_zeros(directions, batch, hidden)
    else:
        h0, c0 = (s.float() for s in hx)
        if h0.shape != (directions, batch, hidden) or c0.shape != (directions, batch, hidden):
            raise ValueError(f"hx must be two tensors of shape {(directions, batch, hidden)}")
    lengths = lengths.to(device=x.device, dtype=torch.int64)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if validate and batch and (int(lengths.min()) < 0 or int(lengths.max()) > steps):
        raise ValueError(f"lengths must lie in [0, {steps}]")
    rows = torch.argsort(lengths, descending=True, stable=True)
    lens = lengths[rows].to(torch.int32)
    return _TritonLSTMFunction.apply(x_gates, w_hh, h0, c0, rows.to(torch.int32), lens, config)


def triton_lstm_layers(
    x: torch.Tensor,
    lengths: torch.Tensor,
    weights: list[torch.Tensor] | tuple[torch.Tensor, ...],
    num_layers: int = 1,
    bidirectional: bool = False,
    hx: tuple[torch.Tensor, torch.Tensor] | None = None,
    dropout: float = 0.0,
    train: bool = False,
    config: TritonLSTMConfig | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stack of :func:`triton_lstm` layers with ``torch.lstm``'s flat weight order and dropout between layers
    (in training); returns ``outputs`` (B, T, D*H) of the last layer, ``h_n`` and ``c_n`` (layers*D, B, H)."""
    directions = 2 if bidirectional else 1
    per_layer = len(weights) // num_layers
    if per_layer * num_layers != len(weights):
        raise ValueError(f"{len(weights)} weights do not split into {num_layers} layers")
    h_list, c_list = [], []
    layer_input = x
    for layer in range(num_layers):
        if layer > 0 and dropout > 0:
            layer_input = F.dropout(layer_input, dropout, train)
        layer_hx = None
        if hx is not None:
            layer_hx = (
                hx[0][layer * directions : (layer + 1) * directions],
                hx[1][layer * directions : (layer + 1) * directions],
            )
        layer_input, h_n, c_n = triton_lstm(
            layer_input, lengths, weights[layer * per_layer : (layer + 1) * per_layer], bidirectional, layer_hx,
            config, validate=validate and layer == 0,
        )  # fmt: skip
        h_list.append(h_n)
        c_list.append(c_n)
    return layer_input, torch.cat(h_list), torch.cat(c_list)
