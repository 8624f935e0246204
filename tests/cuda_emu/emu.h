// CPU emulation of the CUDA features fastctx's kernels use, for running their
// device code (indexing, lane packing, warp and block reductions) on a machine
// without a GPU. One block at a time; one std::thread per CUDA thread;
// std::barrier for __syncthreads and for the warp collectives. Correctness
// only: no timing, no memory model beyond what the barriers give.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// One block runs at a time, so a function-local static is the block's shared memory.
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim, gridDim;
// The block's dynamic shared memory: the extraction in tests/test_cuda_emulation.py
// turns `extern __shared__ ... smem_raw[]` into a pointer to this.
inline unsigned char* emu_dyn_smem = nullptr;

struct EmuBlock {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  alignas(16) unsigned char lanes[32][32][8];  // [warp][lane]: one exchanged value per lane
};
inline EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->block->arrive_and_wait(); }

// Every lane of the warp publishes `v`, then reads lane `src_lane`'s value.
template <typename T>
T emu_exchange(T v, int src_lane, bool valid) {
  static_assert(sizeof(T) <= 8, "exchanged values are at most 8 bytes");
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  std::memcpy(emu_block->lanes[w][lane], &v, sizeof(T));
  emu_block->warp[w]->arrive_and_wait();
  T r = v;
  if (valid) std::memcpy(&r, emu_block->lanes[w][src_lane], sizeof(T));
  emu_block->warp[w]->arrive_and_wait();
  return r;
}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return emu_exchange(v, (threadIdx.x & 31) ^ lane_mask, true);
}

template <typename T>
T __shfl_down_sync(unsigned, T v, int delta) {
  const int src = (threadIdx.x & 31) + delta;
  return emu_exchange(v, src, src < 32);
}

inline unsigned __ballot_sync(unsigned, bool pred) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  emu_block->lanes[w][lane][0] = pred ? 1 : 0;
  emu_block->warp[w]->arrive_and_wait();
  unsigned word = 0;
  for (int src = 0; src < 32; ++src) word |= static_cast<unsigned>(emu_block->lanes[w][src][0]) << src;
  emu_block->warp[w]->arrive_and_wait();
  return word;
}

using std::max;
using std::min;

// Runs kernel() for every block of `grid` with block.x threads each (the
// kernels here are 1-D blocks of whole warps) and `smem` bytes of dynamic
// shared memory, filled with 0xFF (NaN as floats) so reads of shared memory
// no thread wrote show up in the results.
inline void emu_launch(dim3 grid, dim3 block, const std::function<void()>& kernel, size_t smem = 0) {
  gridDim = grid;
  blockDim = block;
  const int threads = static_cast<int>(block.x);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        EmuBlock eb;
        eb.block = std::make_unique<std::barrier<>>(threads);
        for (int w = 0; w < (threads + 31) / 32; ++w)
          eb.warp.push_back(std::make_unique<std::barrier<>>(std::min(32, threads - 32 * w)));
        emu_block = &eb;
        std::vector<unsigned char> dyn(std::max<size_t>(smem, 1), 0xFF);
        emu_dyn_smem = dyn.data();
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = dim3(t, 0, 0);
            blockIdx = dim3(bx, by, bz);
            kernel();
            // A thread that returned early must not hold up the others' barriers.
            eb.block->arrive_and_drop();
            eb.warp[t >> 5]->arrive_and_drop();
          });
        for (auto& th : pool) th.join();
      }
}
