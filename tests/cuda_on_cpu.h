// Just enough of CUDA C++ to run a kernel's own source on the CPU, for tests without a GPU: one std::thread per
// CUDA thread, a std::barrier for __syncthreads(), one block at a time in launch order (the stacked kernels' blocks
// wait only for earlier ones), and shared memory filled with garbage before each block, as a GPU's would be. Vector
// loads abort on an address a GPU would fault on.
// Warp-wide operations (the tensor cores' mma.sync m16n8k16 and __shfl_down_sync) exchange the 32 lanes' registers
// through memory between two barriers of the warp, and compute what the PTX manual says each lane receives.
#define CPU_THREADS
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
using std::max;
using std::min;
struct dim3_ { int x, y, z; };
thread_local dim3_ threadIdx;
dim3_ blockIdx;
std::barrier<>* block_barrier;
alignas(16) unsigned int shared[64 * 1024];
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__
#define __syncthreads() block_barrier->arrive_and_wait()
// Only a block's thread 0 takes its ticket, and blocks run one at a time: a plain add is atomic here.
inline int atomicAdd(int* address, int value) { int old = *address; *address += value; return old; }
inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint4 { unsigned int x, y, z, w; };
struct uint2 { unsigned int x, y; };
inline void check_aligned(const void* p, unsigned bytes = 16) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes) { std::fprintf(stderr, "misaligned vector load\n"); std::abort(); }
}
inline float4 load_float4(const float* p) { check_aligned(p); float4 v; memcpy(&v, p, 16); return v; }
inline uint4 load_uint4(const unsigned int* p) { check_aligned(p); uint4 v; memcpy(&v, p, 16); return v; }
inline uint2 load_uint2(const unsigned int* p) { check_aligned(p, 8); uint2 v; memcpy(&v, p, 8); return v; }

// What a warp's lanes hand each other: mma operands, or one value for a shuffle.
struct WarpExchange { unsigned int a[32][4]; unsigned int b[32][2]; float value[32]; };
thread_local std::barrier<>* warp_barrier;
thread_local WarpExchange* warp_exchange;

inline float bf16_half(unsigned int word, int high) { return __uint_as_float(high ? word & 0xffff0000u : word << 16); }

// c += a b, a 16 x 16 (4 words a lane: rows g, g + 8, columns 2t, 2t + 1 and + 8), b 16 x 8 (2 words: rows 2t,
// 2t + 1 and + 8, column g), c 16 x 8 (rows g, g + 8, columns 2t, 2t + 1), lane = 4g + t; products exact in float.
inline void mma_bf16(float* c, uint4 a, unsigned int b0, unsigned int b1) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  WarpExchange& x = *warp_exchange;
  x.a[lane][0] = a.x; x.a[lane][1] = a.y; x.a[lane][2] = a.z; x.a[lane][3] = a.w;
  x.b[lane][0] = b0; x.b[lane][1] = b1;
  warp_barrier->arrive_and_wait();
  for (int j = 0; j < 4; ++j) {
    const int row = g + 8 * (j / 2), column = 2 * t + j % 2;
    float sum = c[j];
    for (int k = 0; k < 16; ++k) {
      unsigned int a_word = x.a[(row % 8) * 4 + (k % 8) / 2][(k / 8) * 2 + row / 8];
      unsigned int b_word = x.b[column * 4 + (k % 8) / 2][k / 8];
      sum += bf16_half(a_word, k % 2) * bf16_half(b_word, k % 2);
    }
    c[j] = sum;
  }
  warp_barrier->arrive_and_wait();
}

inline void __syncwarp() { warp_barrier->arrive_and_wait(); }

inline float shfl_down(float v, int delta) {
  const int lane = threadIdx.x % 32;
  warp_exchange->value[lane] = v;
  warp_barrier->arrive_and_wait();
  float result = lane + delta < 32 ? warp_exchange->value[lane + delta] : v;
  warp_barrier->arrive_and_wait();
  return result;
}

template <typename Body> void run_blocks(int grid_x, int grid_y, int threads, Body body) {
  const int warps = (threads + 31) / 32;
  for (int y = 0; y < grid_y; ++y) {
    for (int x = 0; x < grid_x; ++x) {
      blockIdx = {x, y, 0};
      std::barrier<> barrier(threads);
      block_barrier = &barrier;
      std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
      for (int w = 0; w < warps; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(min(32, threads - 32 * w)));
      std::vector<WarpExchange> exchanges(warps);
      memset(shared, 0xff, sizeof(shared));
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          threadIdx = {t, 0, 0};
          warp_barrier = warp_barriers[t / 32].get();
          warp_exchange = &exchanges[t / 32];
          body();
        });
      }
      for (auto& thread : pool) thread.join();
    }
  }
}
