// Just enough of CUDA C++ to run a kernel's own source on the CPU, for tests without a GPU: one std::thread per
// CUDA thread, a std::barrier for __syncthreads(), one block at a time (blocks are independent), and shared memory
// filled with garbage before each block, as a GPU's would be. Vector loads abort on an address a GPU would fault on.
#define CPU_THREADS
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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
inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
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

template <typename Body> void run_blocks(int grid_x, int grid_y, int threads, Body body) {
  for (int y = 0; y < grid_y; ++y) {
    for (int x = 0; x < grid_x; ++x) {
      blockIdx = {x, y, 0};
      std::barrier<> barrier(threads);
      block_barrier = &barrier;
      memset(shared, 0xff, sizeof(shared));
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { threadIdx = {t, 0, 0}; body(); });
      for (auto& thread : pool) thread.join();
    }
  }
}
