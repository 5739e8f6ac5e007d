// The persistent LSTM's kernels for a stack of unidirectional layers in one launch, on the CUDA cores; after
// lstm_common.cuh and lstm_cuda_cores.cu, whose defines and helpers they use. Defines: L (layers) and SS (32-bit
// words from one row of [W_ih | W_hh] to the next in shared memory).
//
// A block runs R reviews of one layer for the whole sequence, and the layers run at once, as a wavefront: layer l
// takes step t as soon as layer l - 1 has written its output at step t (backwards, as soon as layer l + 1 has
// written the gradient of its input at step t). Each layer above the first computes its input projection itself:
// its rows in shared memory are [W_ih | W_hh] and its state [input | h], so a step is one product of twice the width.
// The first layer's input projection comes in precomputed (gx), as in the one-layer kernels.
//
// The handoff between layers is the tensor itself (the outputs forwards, the input gradients backwards), filled
// with UNWRITTEN before the launch: a reader loads its word until it is no longer UNWRITTEN. Each 32-bit word
// carries its own arrival, so no fence or flag is needed; no step writes UNWRITTEN (a NaN, which handoff()
// replaces by the usual one). A block takes its layer and reviews from a ticket, in the order blocks start (an
// atomic counter, zero before the launch), lower layers first forwards and higher layers first backwards: a block
// waits only for blocks with smaller tickets, which have started, so the wavefront cannot deadlock whatever the
// number of blocks resident at once.

#define UNWRITTEN 0xffffffffu
#define SEGMENT (QUADS * 4)  // words of one segment (W_ih or W_hh) of a row in shared memory
#define HS (2 * HP)          // floats of one review's state in the forward kernel: [input | h], each zero-padded

// The word at `at` once its writer has stored it (the GPU build spins; blocks run in ticket order on CPU threads,
// so there it must already be written).
__device__ __forceinline__ float arrived(const float* at) {
  const volatile unsigned int* word = (const volatile unsigned int*)at;
  unsigned int bits = *word;
#ifdef CPU_THREADS
  if (bits == UNWRITTEN) { std::fprintf(stderr, "read before written\n"); std::abort(); }
#else
  while (bits == UNWRITTEN) {  // back off a little between loads: fewer requests to L2 beside the writer's
    __nanosleep(32);
    bits = *word;
  }
#endif
  return __uint_as_float(bits);
}

// Store a value that another block reads with arrived().
__device__ __forceinline__ void handoff(float* at, float value) {
  unsigned int bits = __float_as_uint(value);
  *(volatile unsigned int*)at = bits == UNWRITTEN ? 0x7fffffffu : bits;
}

// The block's ticket: the order in which it started.
__device__ __forceinline__ int take_ticket(int* counter, int* slot) {
  if (threadIdx.x == 0) *slot = atomicAdd(counter, 1);
  __syncthreads();
  return *slot;
}

// A layer's [W_ih | W_hh] into shared memory, each row SS words from the last, each segment zero-padded to SEGMENT
// words. The first layer has no W_ih here (its segment stays zero and is never read).
__device__ __forceinline__ void load_stack_weights(unsigned int* w, const unsigned int* source, int layer) {
  for (int i = threadIdx.x; i < G * 2 * SEGMENT; i += NT) {
    int row = i / (2 * SEGMENT), col = i - row * (2 * SEGMENT), segment = col / SEGMENT, word = col % SEGMENT;
    bool real = word < ROW_WORDS && (segment == 1 || layer > 0);
    w[row * SS + col] = real ? source[(row * 2 + segment) * ROW_WORDS + word] : 0u;
  }
}

extern "C" __global__ void __launch_bounds__(NT, 2) lstm_stack_forward(
    const float* __restrict__ gx, const unsigned int* __restrict__ w_stack, const float* __restrict__ bias,
    const int* __restrict__ lengths, const float* __restrict__ h0, const float* __restrict__ c0,
    const float* __restrict__ masks, float* outs, float* __restrict__ gates, float* __restrict__ cells,
    float* __restrict__ h_n, float* __restrict__ c_n, int* counter, int B, int T, int masked, int save) {
  extern __shared__ unsigned int shared[];
  unsigned int* w = shared;
  float* h = (float*)(shared + G * SS);  // R x HS: [this step's input | the state], zero past H in each
  float* act = h + R * HS;               // R x G: the gates after their activation
  const int per_layer = (B + R - 1) / R, tid = threadIdx.x;
  const int ticket = take_ticket(counter, (int*)(act + R * G));
  const int layer = ticket / per_layer, first = (ticket - layer * per_layer) * R;
  const size_t layer_tokens = (size_t)B * T;
  load_stack_weights(w, w_stack + (size_t)layer * G * 2 * ROW_WORDS, layer);
  int len[R];
  const int steps = min(block_lengths(lengths, first, B, len), T);  // a length past T reads no further than T
  const float* below = outs + (layer > 0 ? layer - 1 : 0) * layer_tokens * H;  // the layer below's outputs
  const float* mask = masks + (masked && layer > 0 ? layer - 1 : 0) * layer_tokens * H;
  float* out = outs + layer * layer_tokens * H;
  const bool cell_thread = tid < R * H;
  const int cr = tid / H, ck = tid - (tid / H) * H, cb = first + cr;
  const int cell_len = cell_thread && cb < B ? min(lengths[cb], T) : 0;
  const size_t state_at = ((size_t)layer * B + cb) * H + ck;
  float c = 0.f;
  if (cell_thread) {
    c = cb < B ? c0[state_at] : 0.f;
    h[cr * HS + HP + ck] = cb < B ? h0[state_at] : 0.f;
    h[cr * HS + ck] = 0.f;
  }
#if HP > H
  for (int i = tid; i < R * 2 * (HP - H); i += NT) {  // the padding of both parts
    int r = i / (2 * (HP - H)), j = i % (2 * (HP - H));
    h[r * HS + (j / (HP - H)) * HP + H + j % (HP - H)] = 0.f;
  }
#endif
  // The input of step s from the layer below, dropout applied; the first layer's comes as gx.
  auto take_input = [&](int s) {
    if (layer > 0 && s < cell_len) {
      size_t at = ((size_t)cb * T + s) * H + ck;
      h[cr * HS + ck] = arrived(below + at) * (masked ? mask[at] : 1.f);
    }
  };
  take_input(0);
  const bool gate_thread = tid < G;
  const int gate = tid / H;  // 0 input, 1 forget, 2 cell candidate, 3 output
  const float row_bias = gate_thread ? bias[layer * G + tid] : 0.f;
  // The first layer's product covers W_hh (the row's second segment) and the state; the others' both segments.
  const int first_quad = layer > 0 ? 0 : QUADS;
  float x_next[R];
#pragma unroll
  for (int r = 0; r < R; ++r)
    x_next[r] = layer == 0 && gate_thread && len[r] > 0 ? gx[((size_t)(first + r) * T) * G + tid] : 0.f;
  __syncthreads();
  for (int s = 0; s < steps; ++s) {
    if (gate_thread) {
      float acc[R], x[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        x[r] = x_next[r];
        acc[r] = 0.f;
        x_next[r] = layer == 0 && s + 1 < len[r] ? gx[((size_t)(first + r) * T + s + 1) * G + tid] : 0.f;
      }
      row_product(w + tid * SS, h, HS, first_quad, 2 * QUADS, acc);  // the state's parts match the row's
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float v = acc[r] + x[r] + row_bias;
        v = gate == 2 ? tanhf(v) : sigmoid_(v);
        act[r * G + tid] = v;
        if (save && s < len[r]) gates[(layer * layer_tokens + (size_t)(first + r) * T + s) * G + tid] = v;
      }
    }
    __syncthreads();
    if (s < cell_len) {
      float hv = cell_update(act + cr * G, ck, c);
      h[cr * HS + HP + ck] = hv;
      size_t at = ((size_t)cb * T + s) * H + ck;
      handoff(out + at, hv);
      if (save) cells[layer * layer_tokens * H + at] = c;
    }
    take_input(s + 1);
    __syncthreads();
  }
  if (cell_thread && cb < B) {
    h_n[state_at] = h[cr * HS + HP + ck];
    c_n[state_at] = c;
    zero_padding(out, 1, cb, ck, cell_len, T, 1, 0);
  }
}

extern "C" __global__ void __launch_bounds__(NT, 2) lstm_stack_backward(
    const float* __restrict__ grad_out, const float* __restrict__ grad_h_n, const float* __restrict__ grad_c_n,
    const unsigned int* __restrict__ w_stack, const int* __restrict__ lengths, const float* __restrict__ gates,
    const float* __restrict__ cells, const float* __restrict__ c0, const float* __restrict__ masks,
    float* grad_inputs, float* __restrict__ grad_gates, float* __restrict__ grad_bias, float* __restrict__ grad_h0,
    float* __restrict__ grad_c0, int* counter, int B, int T, int masked) {
  extern __shared__ unsigned int shared[];
  unsigned int* w = shared;
  float* dg = (float*)(shared + G * SS);  // R x 4 x HQ: this step's gate gradients (before the activations)
  float* part = dg + R * 4 * HQ;         // 2 x PARTS x R x H: W_ih^T dg and W_hh^T dg, one part per quarter gate
  const int per_layer = (B + R - 1) / R, tid = threadIdx.x;
  const int ticket = take_ticket(counter, (int*)(part + 2 * PARTS * R * H));
  const int layer = L - 1 - ticket / per_layer, first = (ticket % per_layer) * R;
  const size_t layer_tokens = (size_t)B * T;
  load_stack_weights(w, w_stack + (size_t)layer * G * 2 * ROW_WORDS, layer);
  int len[R];
  const int steps = min(block_lengths(lengths, first, B, len), T);
  const bool cell_thread = tid < R * H;
  const int cr = tid / H, ck = tid - (tid / H) * H, cb = first + cr;
  const size_t states = (size_t)layer * B * H;
  BackwardCell cell = {cb, ck, 0, cell_thread && cb < B ? min(lengths[cb], T) : 0, B, T, 1};
  if (cell_thread && cb < B) cell.start(grad_h_n + states, grad_c_n + states);
  const float* layer_gates = gates + layer * layer_tokens * G;
  const float* layer_cells = cells + layer * layer_tokens * H;
  float* layer_grad_gates = grad_gates + layer * layer_tokens * G;
  // The gradient reaching this layer's outputs: the top layer's from grad_out; a lower layer's is the gradient of
  // the input of the layer above, which that layer's blocks write into grad_inputs, times the dropout mask.
  const bool top = layer == L - 1;
  const float* above = grad_inputs + (top ? 0 : layer) * layer_tokens * H;
  const float* mask = masks + (masked && !top ? layer : 0) * layer_tokens * H;
  float* input_grad = grad_inputs + (layer > 0 ? layer - 1 : 0) * layer_tokens * H;  // written for the layer below
  auto from_above = [&](int s) {
    if (top || s < 0 || s >= cell.length) return 0.f;
    size_t at = ((size_t)cb * T + s) * H + ck;
    return arrived(above + at) * (masked ? mask[at] : 1.f);
  };
  const float* own_grad = top ? grad_out : nullptr;
  BackwardCell::Inputs next = cell.fetch(own_grad, layer_gates, layer_cells, c0 + states, steps - 1);
  float next_above = from_above(steps - 1);
#if HQ > H
  for (int i = tid; i < R * 4 * (HQ - H); i += NT) dg[(i / (HQ - H)) * HQ + H + i % (HQ - H)] = 0.f;
#endif
  __syncthreads();
  for (int s = steps - 1; s >= 0; --s) {
    BackwardCell::Inputs in = next;
    in.grad += next_above;
    next = cell.fetch(own_grad, layer_gates, layer_cells, c0 + states, s - 1);
    if (cell_thread) {
      float dgate[4] = {0.f, 0.f, 0.f, 0.f};
      if (s < cell.length) cell.step(in, s, layer_grad_gates, dgate);
#pragma unroll
      for (int q = 0; q < 4; ++q) dg[(cr * 4 + q) * HQ + ck] = dgate[q];
    }
    __syncthreads();
    if (tid < PARTS * CQ) {  // W_ih^T dg (the gradient of the layer's input; not the first layer's), W_hh^T dg
      for (int segment = layer > 0 ? 0 : 1; segment < 2; ++segment)
        transposed_part(w + segment * SEGMENT, SS, dg, tid / CQ, tid % CQ, part + segment * PARTS * R * H);
    }
    __syncthreads();
    if (s < cell.length) {
      float sum = 0.f, input_sum = 0.f;
#pragma unroll
      for (int q = 0; q < PARTS; ++q) sum += part[(PARTS + q) * R * H + cr * H + ck];
      cell.dh_next = sum;
      if (layer > 0) {
#pragma unroll
        for (int q = 0; q < PARTS; ++q) input_sum += part[q * R * H + cr * H + ck];
        handoff(input_grad + ((size_t)cb * T + s) * H + ck, input_sum);
      }
    }
    next_above = from_above(s - 1);
  }
  if (cell_thread && cb < B) cell.finish(layer_grad_gates, grad_bias + layer * B * G, grad_h0 + states,
                                         grad_c0 + states);
}
