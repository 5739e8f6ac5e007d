// The persistent LSTM's kernels on the tensor cores, after lstm_common.cuh (mma.sync m16n8k16, bfloat16 operands,
// float32 accumulation). A step's product is W (rows x K) times an operand of 8 columns: columns r < 4 hold each
// review's vector rounded to bfloat16 ("hi"), columns 4 + r what that rounding lost, rounded again ("lo"), so hi + lo
// carries ~16 significant bits and W (hi + lo) is two columns of one product. The forward's W is W_hh (4H x H) and its
// vector the state; the backward's W is W_hh^T (H x 4H) and its vector the gate gradients. W sits in shared memory
// already in the operand's per-lane order (_fragments in sentiment/persistent.py arranges it), so a lane loads its part
// of a 16 x 16 tile with one 128-bit load. Defines: MTF, KTF (the forward's 16-row and 16-column tiles of W), MTB, KTB
// (the backward's), KS (backward warps per row tile, each a share of its column tiles), HBW, DBW (32-bit words from one
// operand column to the next), NTF, NTB (threads).

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
      hv = cell_update(act + cr * G, ck, c);
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
  if (cell_thread && cb < B) cell.start(grad_h_n, grad_c_n);
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
