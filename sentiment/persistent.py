"""A persistent LSTM recurrence for NVIDIA GPUs: one thread block owns a few reviews of one direction for the
whole sequence, with the recurrent matrix ``W_hh`` held in shared memory.

cuDNN runs each time step of a small LSTM as a handful of separate kernels (its persistent kernels only cover
some sizes: at hidden 150 the backward pass gets its standard algorithm, three kernels per step). Here a step
is a matrix-vector product from shared memory, the gates and the state update, with no launch and no
synchronisation across the GPU: reviews are independent, so blocks never wait for each other. What is not
sequential stays outside as large matrix products in PyTorch: the input projection ``x W_ih^T + b`` of all steps
before the recurrence, and the weight gradients after it.

``W_hh`` is kept in float32 where a direction's matrix fits in one block's shared memory (hidden sizes up to
~110 on H100/H200), else in bfloat16 (even sizes up to ~158); a step's product runs on the CUDA cores, a thread per
gate row. A second pair of kernels runs it on the tensor cores (``mma.sync``, bfloat16 ``W_hh``, any size up to
~160) with the state split into two bfloat16 parts so that it keeps ~16 bits (:data:`_MMA_SOURCE`,
:data:`WEIGHT_FORMATS`); a forward kernel of one pair may run with the backward kernel of the other, as both
save the same activations. The gates, the cell state and all accumulation are float32 in every kernel. Larger hidden
sizes, other GPUs and the CPU use cuDNN / PyTorch (:func:`persistent_support` says why).

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

import contextlib
import ctypes
import functools
import math
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch

# What both kernel pairs share. Every source takes H (hidden size) and R (reviews per block) as defines.
_COMMON_SOURCE = r"""
#define G (4 * H)

__device__ __forceinline__ float sigmoid_(float x) { return 1.f / (1.f + expf(-x)); }

// The lengths of the block's reviews (0 past the batch's end); returns the longest, the block's number of steps.
__device__ __forceinline__ int block_lengths(const int* lengths, int first, int B, int* len) {
  int steps = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    len[r] = first + r < B ? lengths[first + r] : 0;
    steps = max(steps, len[r]);
  }
  return steps;
}

// Position of step s of review r: forwards from 0, or backwards from its last token.
__device__ __forceinline__ int position(int direction, int length, int s) {
  return direction == 0 ? s : length - 1 - s;
}

// Zeros in `rows` rows (H apart, from unit k) at each padding position (length .. T - 1) of review b, direction d of
// a B x T x D x (rows H) tensor: the kernels' outputs are complete without a fill of the whole tensor first.
__device__ __forceinline__ void zero_padding(float* tensor, int rows, int b, int k, int length, int T, int D, int d) {
  for (int p = length; p < T; ++p) {
    float* at = tensor + (((size_t)b * T + p) * D + d) * rows * H + k;
    for (int row = 0; row < rows; ++row) at[row * H] = 0.f;
  }
}

// A backward kernel's cell thread: unit k of review b in direction d, walking the review's steps from its last.
struct BackwardCell {
  struct Inputs { float grad, c, c_prev, i, f, g, o; };
  int b, k, d, length, B, T, D;
  float dh_next = 0.f, dc = 0.f;  // the gradients reaching h_t and c_t from step t + 1 (or the final state's)
  float bias_sum[4] = {0.f, 0.f, 0.f, 0.f};  // this review's share of the bias gradient, gate by gate

  // What step s reads from global memory (zeros outside the review), fetched a step ahead so that the loads
  // overlap the step before.
  __device__ __forceinline__ Inputs fetch(const float* grad_out, const float* gates, const float* cells,
                                          const float* c0, int s) const {
    Inputs in = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (s >= 0 && s < length) {
      size_t base = ((size_t)b * T + position(d, length, s)) * D + d;
      in.grad = grad_out[base * H + k];
      in.c = cells[base * H + k];
      in.c_prev = s > 0 ? cells[(((size_t)b * T + position(d, length, s - 1)) * D + d) * H + k]
                        : c0[((size_t)d * B + b) * H + k];
      const float* ga = gates + base * G;
      in.i = ga[k]; in.f = ga[H + k]; in.g = ga[2 * H + k]; in.o = ga[3 * H + k];
    }
    return in;
  }

  // Step s: the four gate gradients (before the activations) into dgate, and into grad_gates at the step's position.
  __device__ __forceinline__ void step(const Inputs& in, int s, float* grad_gates, float* dgate) {
    float dh = in.grad + dh_next, tc = tanhf(in.c);
    dc += dh * in.o * (1.f - tc * tc);
    dgate[0] = dc * in.g * in.i * (1.f - in.i);
    dgate[1] = dc * in.c_prev * in.f * (1.f - in.f);
    dgate[2] = dc * in.i * (1.f - in.g * in.g);
    dgate[3] = dh * tc * in.o * (1.f - in.o);
    dc *= in.f;
    float* out = grad_gates + (((size_t)b * T + position(d, length, s)) * D + d) * G + k;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      bias_sum[q] += dgate[q];
      out[q * H] = dgate[q];
    }
  }

  // After the first step: the gradients of the initial state and this review's bias shares, and zeros at padding.
  __device__ __forceinline__ void finish(float* grad_gates, float* grad_bias, float* grad_h0, float* grad_c0) const {
    grad_h0[((size_t)d * B + b) * H + k] = dh_next;
    grad_c0[((size_t)d * B + b) * H + k] = dc;
    zero_padding(grad_gates, 4, b, k, length, T, D, d);
#pragma unroll
    for (int q = 0; q < 4; ++q) grad_bias[((size_t)d * B + b) * G + q * H + k] = bias_sum[q];
  }
};
"""

# The kernels on the CUDA cores. Defines: S (32-bit words from one weight row to the next in shared memory, see
# _row_words), WFP32 (1: float32 weights, 0: bfloat16 pairs) and NT (threads per block).
_SCALAR_SOURCE = r"""
#define NTF NT
#define NTB NT
#define ROW_WORDS (WFP32 ? H : H / 2)  // 32-bit words of one W_hh row in global memory
#define QUADS ((ROW_WORDS + 3) / 4)      // 128-bit pieces of a row in shared memory (zero-padded)
#define HP (QUADS * (WFP32 ? 4 : 8))     // columns of a padded row; the state is kept padded with zeros too
// The backward's W_hh^T dg: each gate's rows in 4 parts of RP rows (a multiple of 4), columns in fours (CQ of them).
#define CQ ((H + 3) / 4)
#define RP (4 * ((H + 15) / 16))
#define HQ (4 * CQ)  // rows per gate in the backward's dg, zero past H
#define PARTS 16

// 128-bit loads from shared memory (the CPU build of the tests defines its own, which check the alignment).
#ifndef CPU_THREADS
__device__ __forceinline__ float4 load_float4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ uint4 load_uint4(const unsigned int* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ uint2 load_uint2(const unsigned int* p) { return *reinterpret_cast<const uint2*>(p); }
#endif

// A direction's W_hh into shared memory, each row S words from the last, zero-padded to QUADS * 4 words.
__device__ __forceinline__ void load_weights(unsigned int* w, const unsigned int* source) {
  for (int i = threadIdx.x; i < G * QUADS * 4; i += NT) {
    int row = i / (QUADS * 4), col = i - row * (QUADS * 4);
    w[row * S + col] = col < ROW_WORDS ? source[row * ROW_WORDS + col] : 0u;
  }
}

extern "C" __global__ void __launch_bounds__(NT, 1) lstm_forward(
    const float* __restrict__ gx, const unsigned int* __restrict__ w_hh, const float* __restrict__ bias,
    const int* __restrict__ lengths, const float* __restrict__ h0, const float* __restrict__ c0,
    float* __restrict__ out, float* __restrict__ gates, float* __restrict__ cells, float* __restrict__ h_n,
    float* __restrict__ c_n, int B, int T, int D, int save) {
  extern __shared__ unsigned int shared[];
  unsigned int* w = shared;
  float* h = (float*)(shared + G * S);  // R x HP: the state being read, zero past H
  float* act = h + R * HP;              // R x G: the gates after their activation
  const int d = blockIdx.y, first = blockIdx.x * R, tid = threadIdx.x;
  load_weights(w, w_hh + (size_t)d * G * ROW_WORDS);
  int len[R];
  const int steps = block_lengths(lengths, first, B, len);
  // Cell threads: one per (review, hidden unit); c lives in a register for the whole sequence.
  const bool cell_thread = tid < R * H;
  const int cr = tid / H, ck = tid - (tid / H) * H, cb = first + cr;
  const int cell_len = cell_thread && cb < B ? lengths[cb] : 0;
  float c = 0.f;
  if (cell_thread) {
    bool real = cb < B;
    c = real ? c0[((size_t)d * B + cb) * H + ck] : 0.f;
    h[cr * HP + ck] = real ? h0[((size_t)d * B + cb) * H + ck] : 0.f;
  }
#if HP > H
  for (int i = tid; i < R * (HP - H); i += NT) h[(i / (HP - H)) * HP + H + i % (HP - H)] = 0.f;
#endif
  // Gate threads: one per gate row j, for all R reviews.
  const bool gate_thread = tid < G;
  const int gate = tid / H;  // 0 input, 1 forget, 2 cell candidate, 3 output
  const float row_bias = gate_thread ? bias[d * G + tid] : 0.f;
  float x_next[R];
#pragma unroll
  for (int r = 0; r < R; ++r)
    x_next[r] = gate_thread && len[r] > 0
        ? gx[(((size_t)(first + r) * T + position(d, len[r], 0)) * D + d) * G + tid] : 0.f;
  __syncthreads();
  for (int s = 0; s < steps; ++s) {
    if (gate_thread) {
      float acc[R], x[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        x[r] = x_next[r];
        acc[r] = 0.f;
        x_next[r] = s + 1 < len[r]  // the next step's input, loaded while this step computes
            ? gx[(((size_t)(first + r) * T + position(d, len[r], s + 1)) * D + d) * G + tid] : 0.f;
      }
      const unsigned int* row = w + tid * S;
      float acc2[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc2[r] = 0.f;
#pragma unroll 2
      for (int q = 0; q < QUADS; ++q) {
        uint4 words = load_uint4(row + 4 * q);
#if WFP32  // four weights: columns 4q .. 4q + 3
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float4 hv = load_float4(h + r * HP + 4 * q);
          acc[r] = fmaf(__uint_as_float(words.x), hv.x, acc[r]);
          acc2[r] = fmaf(__uint_as_float(words.y), hv.y, acc2[r]);
          acc[r] = fmaf(__uint_as_float(words.z), hv.z, acc[r]);
          acc2[r] = fmaf(__uint_as_float(words.w), hv.w, acc2[r]);
        }
#else  // eight bfloat16 weights: columns 8q .. 8q + 7
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float4 ha = load_float4(h + r * HP + 8 * q), hb = load_float4(h + r * HP + 8 * q + 4);
          acc[r] = fmaf(__uint_as_float(words.x << 16), ha.x, acc[r]);
          acc2[r] = fmaf(__uint_as_float(words.x & 0xffff0000u), ha.y, acc2[r]);
          acc[r] = fmaf(__uint_as_float(words.y << 16), ha.z, acc[r]);
          acc2[r] = fmaf(__uint_as_float(words.y & 0xffff0000u), ha.w, acc2[r]);
          acc[r] = fmaf(__uint_as_float(words.z << 16), hb.x, acc[r]);
          acc2[r] = fmaf(__uint_as_float(words.z & 0xffff0000u), hb.y, acc2[r]);
          acc[r] = fmaf(__uint_as_float(words.w << 16), hb.z, acc[r]);
          acc2[r] = fmaf(__uint_as_float(words.w & 0xffff0000u), hb.w, acc2[r]);
        }
#endif
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] += acc2[r];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float v = acc[r] + x[r] + row_bias;
        v = gate == 2 ? tanhf(v) : sigmoid_(v);
        act[r * G + tid] = v;
        if (save && s < len[r]) gates[(((size_t)(first + r) * T + position(d, len[r], s)) * D + d) * G + tid] = v;
      }
    }
    __syncthreads();
    if (s < cell_len) {
      const float* a = act + cr * G;
      c = a[H + ck] * c + a[ck] * a[2 * H + ck];
      float hv = a[3 * H + ck] * tanhf(c);
      h[cr * HP + ck] = hv;
      size_t at = (((size_t)cb * T + position(d, cell_len, s)) * D + d) * H + ck;
      out[at] = hv;
      if (save) cells[at] = c;
    }
    __syncthreads();
  }
  if (cell_thread && cb < B) {
    h_n[((size_t)d * B + cb) * H + ck] = h[cr * HP + ck];
    c_n[((size_t)d * B + cb) * H + ck] = c;
    zero_padding(out, 1, cb, ck, cell_len, T, D, d);
  }
}

extern "C" __global__ void __launch_bounds__(NT, 1) lstm_backward(
    const float* __restrict__ grad_out, const float* __restrict__ grad_h_n, const float* __restrict__ grad_c_n,
    const unsigned int* __restrict__ w_hh, const int* __restrict__ lengths, const float* __restrict__ gates,
    const float* __restrict__ cells, const float* __restrict__ c0, float* __restrict__ grad_gates,
    float* __restrict__ grad_bias, float* __restrict__ grad_h0, float* __restrict__ grad_c0, int B, int T, int D) {
  extern __shared__ unsigned int shared[];
  unsigned int* w = shared;
  float* dg = (float*)(shared + G * S);  // R x 4 x HQ: this step's gate gradients (before the activations)
  float* part = dg + R * 4 * HQ;         // PARTS x R x H: W_hh^T dg, one part per quarter gate
  const int d = blockIdx.y, first = blockIdx.x * R, tid = threadIdx.x;
  load_weights(w, w_hh + (size_t)d * G * ROW_WORDS);
  int len[R];
  const int steps = block_lengths(lengths, first, B, len);
  const bool cell_thread = tid < R * H;
  const int cr = tid / H, ck = tid - (tid / H) * H, cb = first + cr;
  BackwardCell cell = {cb, ck, d, cell_thread && cb < B ? lengths[cb] : 0, B, T, D};
  if (cell_thread && cb < B) {
    cell.dh_next = grad_h_n[((size_t)d * B + cb) * H + ck];
    cell.dc = grad_c_n[((size_t)d * B + cb) * H + ck];
  }
  BackwardCell::Inputs next = cell.fetch(grad_out, gates, cells, c0, steps - 1);
#if HQ > H
  for (int i = tid; i < R * 4 * (HQ - H); i += NT) dg[(i / (HQ - H)) * HQ + H + i % (HQ - H)] = 0.f;
#endif
  __syncthreads();
  for (int s = steps - 1; s >= 0; --s) {
    const BackwardCell::Inputs in = next;
    next = cell.fetch(grad_out, gates, cells, c0, s - 1);
    if (cell_thread) {
      float dgate[4] = {0.f, 0.f, 0.f, 0.f};
      if (s < cell.length) cell.step(in, s, grad_gates, dgate);
#pragma unroll
      for (int q = 0; q < 4; ++q) dg[(cr * 4 + q) * HQ + ck] = dgate[q];
    }
    __syncthreads();
    if (tid < PARTS * CQ) {  // thread (q, cq): rows RP q % 4 .. of gate q / 4, columns 4 cq .. 4 cq + 3
      const int q = tid / CQ, cq = tid - (tid / CQ) * CQ, p = q >> 2;
      const int m0 = (q & 3) * RP, m1 = min(H, m0 + RP);
      float acc[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.f;
      for (int m = m0; m < m1; m += 4) {  // four rows at a time: their gradients are one 128-bit load
        float4 g4[R];
#pragma unroll
        for (int r = 0; r < R; ++r) g4[r] = load_float4(dg + (r * 4 + p) * HQ + m);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (m + j >= H) break;  // rows past H belong to the next gate; their gradients are zero anyway
          const unsigned int* words = w + (p * H + m + j) * S;
#if WFP32
          uint4 q4 = load_uint4(words + 4 * cq);
          float w4[4] = {__uint_as_float(q4.x), __uint_as_float(q4.y), __uint_as_float(q4.z), __uint_as_float(q4.w)};
#else
          uint2 q2 = load_uint2(words + 2 * cq);
          float w4[4] = {__uint_as_float(q2.x << 16), __uint_as_float(q2.x & 0xffff0000u),
                         __uint_as_float(q2.y << 16), __uint_as_float(q2.y & 0xffff0000u)};
#endif
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float g = j == 0 ? g4[r].x : j == 1 ? g4[r].y : j == 2 ? g4[r].z : g4[r].w;
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(w4[c], g, acc[r][c]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          if (4 * cq + c < H) part[(q * R + r) * H + 4 * cq + c] = acc[r][c];
    }
    __syncthreads();
    if (s < cell.length) {
      float sum = 0.f;
#pragma unroll
      for (int q = 0; q < PARTS; ++q) sum += part[(q * R + cr) * H + ck];
      cell.dh_next = sum;
    }
  }
  if (cell_thread && cb < B) cell.finish(grad_gates, grad_bias, grad_h0, grad_c0);
}
"""

# The kernels on the tensor cores (``mma.sync`` m16n8k16, bfloat16 operands, float32 accumulation). A step's
# product is W (rows x K) times an operand of 8 columns: columns r < 4 hold each review's vector rounded to bfloat16
# ("hi"), columns 4 + r what that rounding lost, rounded again ("lo"), so hi + lo carries ~16 significant bits and
# W (hi + lo) is two columns of one product. The forward's W is W_hh (4H x H) and its vector the state; the
# backward's W is W_hh^T (H x 4H) and its vector the gate gradients. W sits in shared memory already in the
# operand's per-lane order (_fragments arranges it), so a lane loads its part of a 16 x 16 tile with one 128-bit
# load. Defines: MTF, KTF (the forward's 16-row and 16-column tiles of W), MTB, KTB (the backward's), KS (backward
# warps per row tile, each a share of its column tiles), HBW, DBW (32-bit words from one operand column to the
# next), NTF, NTB (threads).
_MMA_SOURCE = r"""
// float to bfloat16 bits, rounding to nearest even (the same on the CPU build of the tests).
__device__ __forceinline__ unsigned bf16_bits(float f) {
  unsigned u = __float_as_uint(f);
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

#ifndef CPU_THREADS
// c += a b for the warp's 16 x 16 tile a and 16 x 8 operand b (this lane's registers of each).
__device__ __forceinline__ void mma_bf16(float* c, uint4 a, unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
__device__ __forceinline__ float shfl_down(float v, int delta) { return __shfl_down_sync(0xffffffffu, v, delta); }
#endif

// v as row k of review r's two operand columns (WORDS 32-bit words apart): hi in column r, lo in column 4 + r.
template <int WORDS>
__device__ __forceinline__ void put_split(unsigned short* operand, int r, int k, float v) {
  unsigned hi = bf16_bits(v);
  operand[r * 2 * WORDS + k] = (unsigned short)hi;
  operand[(4 + r) * 2 * WORDS + k] = (unsigned short)bf16_bits(v - __uint_as_float(hi << 16));
}

// acc += W's tile row `tile` times the operand, over column tiles k0 .. k1 - 1, in two chains (independent mma's).
template <int WORDS, int KT>
__device__ __forceinline__ void tile_product(float* acc, const uint4* w, const unsigned* operand, int tile, int k0,
                                             int k1, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const unsigned* column = operand + g * WORDS + t;  // this lane's operand column: review g (hi) or g - 4 (lo)
  const uint4* a = w + tile * KT * 32 + lane;
  float acc2[4] = {0.f, 0.f, 0.f, 0.f};
  int k = k0;
#pragma unroll 4
  for (; k + 1 < k1; k += 2) {
    mma_bf16(acc, a[k * 32], column[k * 8], column[k * 8 + 4]);
    mma_bf16(acc2, a[(k + 1) * 32], column[(k + 1) * 8], column[(k + 1) * 8 + 4]);
  }
  if (k < k1) mma_bf16(acc, a[k * 32], column[k * 8], column[k * 8 + 4]);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[j] += acc2[j];
    acc[j] += shfl_down(acc[j], 2);  // + the lo column, two lanes on; lanes t < 2 hold reviews 2t and 2t + 1
  }
}

extern "C" __global__ void __launch_bounds__(NTF, 1) lstm_forward(
    const float* __restrict__ gx, const uint4* __restrict__ w_hh, const float* __restrict__ bias,
    const int* __restrict__ lengths, const float* __restrict__ h0, const float* __restrict__ c0,
    float* __restrict__ out, float* __restrict__ gates, float* __restrict__ cells, float* __restrict__ h_n,
    float* __restrict__ c_n, int B, int T, int D, int save) {
  extern __shared__ unsigned int shared[];
  uint4* w = reinterpret_cast<uint4*>(shared);             // MTF x KTF tiles x 32 lanes: W_hh
  float* act = (float*)(shared + MTF * KTF * 128);          // R x G: the gates after their activation
  unsigned* hb = shared + MTF * KTF * 128 + R * G;          // 8 columns x HBW words: the state as the operand
  const int d = blockIdx.y, first = blockIdx.x * R, tid = threadIdx.x;
  const int lane = tid & 31, g = lane >> 2, t = lane & 3, tile0 = 2 * (tid >> 5);  // rows of tiles tile0, tile0 + 1
  for (int i = tid; i < MTF * KTF * 32; i += NTF) w[i] = w_hh[(size_t)d * MTF * KTF * 32 + i];
  for (int i = tid; i < 8 * HBW; i += NTF) hb[i] = 0u;
  int len[R];
  const int steps = block_lengths(lengths, first, B, len);
  const bool cell_thread = tid < R * H;
  const int cr = tid / H, ck = tid - (tid / H) * H, cb = first + cr;
  const int cell_len = cell_thread && cb < B ? lengths[cb] : 0;
  float c = 0.f, hv = 0.f;
  if (cell_thread && cb < B) {
    c = c0[((size_t)d * B + cb) * H + ck];
    hv = h0[((size_t)d * B + cb) * H + ck];
  }
  __syncthreads();
  if (cell_thread) put_split<HBW>((unsigned short*)hb, cr, ck, hv);
  // After a step's product each lane finishes one gate row of its warp's two tiles for every review, as a thread of
  // the CUDA-core kernel does: the product's sums sit in 8 of the 32 lanes (R = 2), too few for the activations.
  const int row = tile0 * 16 + lane;
  const bool gate_lane = row < G;
  const float row_bias = gate_lane ? bias[d * G + row] : 0.f;
  float x_next[R];  // x W_ih^T of this row, a step ahead
#pragma unroll
  for (int r = 0; r < R; ++r)
    x_next[r] = gate_lane && len[r] > 0
        ? gx[(((size_t)(first + r) * T + position(d, len[r], 0)) * D + d) * G + row] : 0.f;
  __syncthreads();
  for (int s = 0; s < steps; ++s) {
    float x[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      x[r] = x_next[r];
      x_next[r] = gate_lane && s + 1 < len[r]
          ? gx[(((size_t)(first + r) * T + position(d, len[r], s + 1)) * D + d) * G + row] : 0.f;
    }
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    tile_product<HBW, KTF>(acc[0], w, hb, tile0, 0, KTF, lane);
    if (tile0 + 1 < MTF) tile_product<HBW, KTF>(acc[1], w, hb, tile0 + 1, 0, KTF, lane);
    if (t < 2) {  // the sums into act, where the lane of each row picks them up
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int tt = i >> 2, half = (i >> 1) & 1, p = i & 1;
        const int sum_row = (tile0 + tt) * 16 + half * 8 + g, r = 2 * t + p;
        if (sum_row < G && r < R) act[r * G + sum_row] = acc[tt][half * 2 + p];
      }
    }
    __syncwarp();
    if (gate_lane) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float v = act[r * G + row] + x[r] + row_bias;
        v = row / H == 2 ? tanhf(v) : sigmoid_(v);
        act[r * G + row] = v;
        if (save && s < len[r]) gates[(((size_t)(first + r) * T + position(d, len[r], s)) * D + d) * G + row] = v;
      }
    }
    __syncthreads();
    if (s < cell_len) {
      const float* a = act + cr * G;
      c = a[H + ck] * c + a[ck] * a[2 * H + ck];
      hv = a[3 * H + ck] * tanhf(c);
      put_split<HBW>((unsigned short*)hb, cr, ck, hv);
      size_t at = (((size_t)cb * T + position(d, cell_len, s)) * D + d) * H + ck;
      out[at] = hv;
      if (save) cells[at] = c;
    }
    __syncthreads();
  }
  if (cell_thread && cb < B) {
    h_n[((size_t)d * B + cb) * H + ck] = hv;
    c_n[((size_t)d * B + cb) * H + ck] = c;
    zero_padding(out, 1, cb, ck, cell_len, T, D, d);
  }
}

extern "C" __global__ void __launch_bounds__(NTB, 1) lstm_backward(
    const float* __restrict__ grad_out, const float* __restrict__ grad_h_n, const float* __restrict__ grad_c_n,
    const uint4* __restrict__ w_hh_t, const int* __restrict__ lengths, const float* __restrict__ gates,
    const float* __restrict__ cells, const float* __restrict__ c0, float* __restrict__ grad_gates,
    float* __restrict__ grad_bias, float* __restrict__ grad_h0, float* __restrict__ grad_c0, int B, int T, int D) {
  extern __shared__ unsigned int shared[];
  uint4* w = reinterpret_cast<uint4*>(shared);       // MTB x KTB tiles x 32 lanes: W_hh^T
  unsigned* gb = shared + MTB * KTB * 128;            // 8 columns x DBW words: the gate gradients as the operand
  float* part = (float*)(gb + 8 * DBW);               // KS x R x 16 MTB: each column share's W_hh^T dg
  const int d = blockIdx.y, first = blockIdx.x * R, tid = threadIdx.x;
  const int lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int tile = (tid >> 5) % MTB, split = (tid >> 5) / MTB;
  const int k0 = split * KTB / KS, k1 = (split + 1) * KTB / KS;
  for (int i = tid; i < MTB * KTB * 32; i += NTB) w[i] = w_hh_t[(size_t)d * MTB * KTB * 32 + i];
  for (int i = tid; i < 8 * DBW; i += NTB) gb[i] = 0u;
  int len[R];
  const int steps = block_lengths(lengths, first, B, len);
  const bool cell_thread = tid < R * H;
  const int cr = tid / H, ck = tid - (tid / H) * H, cb = first + cr;
  BackwardCell cell = {cb, ck, d, cell_thread && cb < B ? lengths[cb] : 0, B, T, D};
  if (cell_thread && cb < B) {
    cell.dh_next = grad_h_n[((size_t)d * B + cb) * H + ck];
    cell.dc = grad_c_n[((size_t)d * B + cb) * H + ck];
  }
  BackwardCell::Inputs next = cell.fetch(grad_out, gates, cells, c0, steps - 1);
  __syncthreads();
  for (int s = steps - 1; s >= 0; --s) {
    const BackwardCell::Inputs in = next;
    next = cell.fetch(grad_out, gates, cells, c0, s - 1);
    if (cell_thread) {
      float dgate[4] = {0.f, 0.f, 0.f, 0.f};
      if (s < cell.length) cell.step(in, s, grad_gates, dgate);
#pragma unroll
      for (int q = 0; q < 4; ++q) put_split<DBW>((unsigned short*)gb, cr, q * H + ck, dgate[q]);
    }
    __syncthreads();
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    tile_product<DBW, KTB>(acc, w, gb, tile, k0, k1, lane);
    if (t < 2) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = tile * 16 + (i >> 1) * 8 + g, r = 2 * t + (i & 1);
        if (m < H && r < R) part[(split * R + r) * (16 * MTB) + m] = acc[i];
      }
    }
    __syncthreads();
    if (s < cell.length) {
      float sum = 0.f;
#pragma unroll
      for (int q = 0; q < KS; ++q) sum += part[(q * R + cr) * (16 * MTB) + ck];
      cell.dh_next = sum;
    }
  }
  if (cell_thread && cb < B) cell.finish(grad_gates, grad_bias, grad_h0, grad_c0);
}
"""

MAX_REVIEWS_PER_BLOCK = 4


def _row_words(hidden: int, fp32: bool) -> int:
    """32-bit words from one weight row to the next in shared memory (CUDA-core kernels): the row's words rounded
    up to 128-bit pieces, plus 4 where needed for a stride of 4 mod 8 words, so that the 8 threads of each quarter
    warp reading their rows' 128-bit pieces at once hit 8 different groups of 4 banks."""
    quads = -(-(hidden if fp32 else hidden // 2) // 4)
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
        return _Layout(defines + _COMMON_SOURCE + _MMA_SOURCE, forward_threads, backward_threads, forward_shared,
                       backward_shared)  # fmt: skip
    fp32 = weights == "fp32"
    threads = 32 * math.ceil(4 * hidden / 32)
    defines += f"#define S {_row_words(hidden, fp32)}\n#define WFP32 {int(fp32)}\n#define NT {threads}\n"
    # weights, then the backward's gate gradients (rows padded to fours) and its 16 parts of W_hh^T times them
    shared = 4 * (4 * hidden * _row_words(hidden, fp32) + reviews * 4 * 4 * -(-hidden // 4) + 16 * reviews * hidden)
    return _Layout(defines + _COMMON_SOURCE + _SCALAR_SOURCE, threads, threads, shared, shared)


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
            "memory even in bfloat16 (the persistent LSTM takes an even hidden_dim up to ~158 on H100/H200)"
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


def _compile(source: str, names: tuple[str, ...], device: torch.device) -> dict:
    """Compile ``source`` with NVRTC for ``device``'s architecture and load ``names`` from it."""
    from torch.cuda import _utils

    nvrtc = _utils._get_gpu_rtc_library()
    props = torch.cuda.get_device_properties(device)
    # No --use_fast_math: its tanhf is the hardware approximation (relative error up to ~5e-4), which the state and
    # the gradients would carry through every step; the exact functions cost little beside the matrix product.
    options = [f"--gpu-architecture=sm_{props.major}{props.minor}".encode(), b"-std=c++17"]
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
    with torch.cuda.device(device):
        return _utils._cuda_load_module(cubin.raw, list(names))


@functools.cache
def _kernels(hidden: int, reviews: int, weights: str, device_index: int) -> tuple[object, object, _Layout]:
    """(forward, backward, layout) for one shape, compiled once per process."""
    layout = _layout(hidden, reviews, weights)
    device = torch.device("cuda", device_index)
    kernels = _compile(layout.source, ("lstm_forward", "lstm_backward"), device)
    kernels["lstm_forward"].set_shared_memory_config(max(layout.forward_shared, 48 * 1024))
    kernels["lstm_backward"].set_shared_memory_config(max(layout.backward_shared, 48 * 1024))
    return kernels["lstm_forward"], kernels["lstm_backward"], layout


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# Every weights' format: "fp32" (float32 on the CUDA cores), "bf16" (bfloat16 on the CUDA cores), "mma" (bfloat16
# on the tensor cores), and a forward of one with the backward of another ("bf16+mma", see _pair).
FORMATS = ("fp32", "bf16", "mma", "fp32+mma", "bf16+mma")

# The formats in the order the plan takes them, the first that fits shared memory: "fp32", else "bf16". The others
# run the same function (the tests check each against nn.LSTM, on CPU threads and on the GPU); one takes bf16's place
# once measured faster on a GPU (python -m benchmarks.persistent_kernel measures every format).
WEIGHT_FORMATS = ("fp32", "bf16")


def _fits(hidden: int, weights: str, reviews: int, device: torch.device) -> bool:
    """Whether the kernels of format ``weights`` run ``reviews`` per block in one block's shared memory (bfloat16
    pairs on the CUDA cores need an even hidden size)."""
    even = hidden % 2 == 0 or "bf16" not in _pair(weights)
    return even and _shared_bytes(hidden, weights, reviews) <= _shared_limit(device)


def _weights(hidden: int, reviews: int, device: torch.device) -> str | None:
    """The first of :data:`WEIGHT_FORMATS` whose kernels fit shared memory with ``reviews`` per block, or None."""
    return next((weights for weights in WEIGHT_FORMATS if _fits(hidden, weights, reviews, device)), None)


def _plan(batch: int, directions: int, hidden: int, device: torch.device) -> tuple[int, str]:
    """(reviews per block, weights' format): enough reviews per block for one wave of blocks over the SMs, in the
    first format that fits (see :data:`WEIGHT_FORMATS`). The first call for a hidden size compiles the kernels of
    every plan, so that none compiles while a CUDA graph is being captured (a batch split into smaller groups
    changes the plan)."""
    index = _index(device)
    for reviews in range(1, MAX_REVIEWS_PER_BLOCK + 1):
        weights = _weights(hidden, reviews, device)
        for part in set(_pair(weights)) if weights is not None else ():
            _kernels(hidden, reviews, part, index)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    reviews = max(1, min(MAX_REVIEWS_PER_BLOCK, math.ceil(batch * directions / sms)))
    while reviews > 1 and _weights(hidden, reviews, device) is None:
        reviews -= 1
    return reviews, _weights(hidden, reviews, device)


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
    return (w_hh.float() if weights == "fp32" else w_hh.to(torch.bfloat16)).contiguous().view(torch.int32)


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
        zeros = torch.zeros_like(h0)
        grad_out = out.new_zeros(out.shape) if grad_out is None else grad_out.float().contiguous()
        grad_h_n = zeros if grad_h_n is None else grad_h_n.float().contiguous()
        grad_c_n = zeros if grad_c_n is None else grad_c_n.float().contiguous()
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
