// The persistent LSTM kernels' shared parts (sentiment/persistent.py compiles them with NVRTC at run time).
// A kernel pair's source is its shape's defines, then this file, then lstm_cuda_cores.cu or lstm_tensor_cores.cu,
// as one text. Every pair takes H (hidden size) and R (reviews per block) as defines.

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

// A forward cell thread's step for unit k, from its review's gates after their activation (i, f, g, o, H apart):
// the new cell state into c, and the new h returned.
__device__ __forceinline__ float cell_update(const float* a, int k, float& c) {
  c = a[H + k] * c + a[k] * a[2 * H + k];
  return a[3 * H + k] * tanhf(c);
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

  // Before the last step: the gradients reaching the final state.
  __device__ __forceinline__ void start(const float* grad_h_n, const float* grad_c_n) {
    dh_next = grad_h_n[((size_t)d * B + b) * H + k];
    dc = grad_c_n[((size_t)d * B + b) * H + k];
  }

  // What step s reads from global memory (zeros outside the review), fetched a step ahead so that the loads
  // overlap the step before.
  __device__ __forceinline__ Inputs fetch(const float* grad_out, const float* gates, const float* cells,
                                          const float* c0, int s) const {
    Inputs in = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (s >= 0 && s < length) {
      size_t base = ((size_t)b * T + position(d, length, s)) * D + d;
      in.grad = grad_out != nullptr ? grad_out[base * H + k] : 0.f;  // none: the caller adds its own
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
