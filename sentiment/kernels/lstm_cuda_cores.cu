// The persistent LSTM's kernels on the CUDA cores, a thread per gate row; after lstm_common.cuh. Defines: S (32-bit
// words from one weight row to the next in shared memory, see _row_words in sentiment/persistent.py), WFP32 (1: float32
// weights, 0: bfloat16 pairs) and NT (threads per block).

#define NTF NT
#define NTB NT
#define ROW_WORDS (WFP32 ? H : (H + 1) / 2)  // 32-bit words of a W_hh row in global memory (odd H: a zero last)
#define QUADS ((ROW_WORDS + 3) / 4)            // 128-bit pieces of a row in shared memory (zero-padded)
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

// acc[r] += a gate row times review r's state, over the row's 128-bit pieces q0 .. q1 - 1 (its words at `row`) and
// the same columns of the state (review r's at h + r * stride, zero-padded), in two sums (even and odd columns) so
// that each chain of dependent FMAs is half as long.
__device__ __forceinline__ void row_product(const unsigned int* row, const float* h, int stride, int q0, int q1,
                                            float* acc) {
  float acc2[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc2[r] = 0.f;
#pragma unroll 2
  for (int q = q0; q < q1; ++q) {
    uint4 words = load_uint4(row + 4 * q);
#if WFP32  // four weights: columns 4q .. 4q + 3
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float4 hv = load_float4(h + r * stride + 4 * q);
      acc[r] = fmaf(__uint_as_float(words.x), hv.x, acc[r]);
      acc2[r] = fmaf(__uint_as_float(words.y), hv.y, acc2[r]);
      acc[r] = fmaf(__uint_as_float(words.z), hv.z, acc[r]);
      acc2[r] = fmaf(__uint_as_float(words.w), hv.w, acc2[r]);
    }
#else  // eight bfloat16 weights: columns 8q .. 8q + 7
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float4 ha = load_float4(h + r * stride + 8 * q), hb = load_float4(h + r * stride + 8 * q + 4);
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
}

// The backward's W^T dg, thread (q, cq)'s share: rows RP q % 4 .. of gate q / 4 (rows `stride` words apart from
// `w`) times each review's gate gradients `dg`, columns 4 cq .. 4 cq + 3, into part q of `part` (PARTS x R x H).
__device__ __forceinline__ void transposed_part(const unsigned int* w, int stride, const float* dg, int q, int cq,
                                                float* part) {
  const int p = q >> 2, m0 = (q & 3) * RP, m1 = min(H, m0 + RP);
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
      const unsigned int* words = w + (p * H + m + j) * stride;
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

#ifndef STACK_ONLY  // the stacked kernels' source takes the defines and helpers above, not these kernels

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
      row_product(w + tid * S, h, HP, 0, QUADS, acc);
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
      float hv = cell_update(act + cr * G, ck, c);
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
  if (cell_thread && cb < B) cell.start(grad_h_n, grad_c_n);
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
    if (tid < PARTS * CQ) transposed_part(w, S, dg, tid / CQ, tid % CQ, part);
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

#endif  // STACK_ONLY
