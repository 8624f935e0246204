// CPU emulation of the CUDA features fastctx's kernels use, so their device
// code (csrc/cuda/<op>_kernel.cuh, included as it is) runs on a machine
// without a GPU, one block at a time.
//
// Two schedules of a block's threads:
//   free        one std::thread per CUDA thread, all running at once;
//               __syncthreads and the warp collectives are barriers.
//   serialised  the threads run one at a time (as fibers on the calling
//               thread) and switch only at __syncthreads and warp collectives
//               (shuffles, ballots), in forward, reverse or seeded-random
//               thread order. A missing barrier then gives wrong results
//               deterministically: the running thread reads shared memory its
//               neighbours have not written yet.
// Both report what a GPU would hang on or leave undefined (emu::fatal):
// threads waiting at different barriers, a collective after lanes exited,
// misaligned cp.async. cp.async copies never waited for are counted
// (emu::stats) and fail the driver's case.
//
// Memory: dynamic shared memory is filled with 0xFF bytes (NaN as floats) at
// each block start, so reads of shared memory no thread wrote show in the
// results. cp.async only records its copy in the thread's open group;
// cp_async_commit closes the group and cp_async_wait<N> performs the copies
// of all but the newest N committed groups: the latest a copy may land, so a
// missing or short wait reads stale shared memory. `sync_copies` copies at
// issue instead, the earliest it may land (and what the pre-sm_80 fallback of
// csrc/common/cuda_helpers.cuh does), so a copy issued into a buffer other
// threads still read corrupts it. The two modes bracket the hardware.
//
// Correctness only: no timing, no memory model beyond what the schedules give.
#pragma once
#define FASTCTX_CUDA_EMU 1

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN_FIBERS 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// One block runs at a time, so a function-local static is the block's shared memory.
#define __shared__ static

// Mutation knob of the tests: every cp_async_wait<N> waits only for all but
// the newest N + slack groups.
#ifndef FASTCTX_EMU_CP_ASYNC_WAIT_SLACK
#define FASTCTX_EMU_CP_ASYNC_WAIT_SLACK 0
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim, gridDim;

using std::max;
using std::min;

namespace emu {

enum class Order { kFree, kForward, kReverse, kRandom };

inline const char* order_name(Order o) {
  switch (o) {
    case Order::kFree: return "free";
    case Order::kForward: return "forward";
    case Order::kReverse: return "reverse";
    default: return "random";
  }
}

// Set by the driver before a launch.
struct Settings {
  Order order = Order::kFree;
  unsigned seed = 1;         // of the random order
  bool sync_copies = false;  // cp.async copies at issue (the pre-sm_80 path)
};
inline Settings settings;

// Counted over a run; a driver treats any as a failure.
struct Stats {
  std::atomic<int64_t> unwaited_copies{0};  // cp.async copies still pending when their thread exited
};
inline Stats stats;

[[noreturn]] inline void fatal(const char* fmt, ...) {
  std::va_list args;
  va_start(args, fmt);
  std::fflush(stdout);
  std::fprintf(stderr, "EMU ERROR: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
  std::_Exit(3);
}

// ---- one CUDA thread ---------------------------------------------------------
struct AsyncCopy {
  void* dst;
  const void* src;
};

enum class Wait : uint8_t { kRunnable, kBlockBarrier, kWarpCollective, kDone };

struct CudaThread {
  int id = 0;
  std::vector<AsyncCopy> open;                   // cp.async: the current, uncommitted group
  std::deque<std::vector<AsyncCopy>> committed;  // oldest first
  // serialised schedule
  Wait wait = Wait::kRunnable;
  uint64_t collectives = 0;  // warp collectives so far (free schedule)
  ucontext_t context;
  char* stack = nullptr;  // from fiber_stack(id)
  void* asan_fake_stack = nullptr;
};
// The CUDA thread running here: per OS thread (free), or switched by the
// scheduler together with threadIdx (serialised).
inline thread_local CudaThread* self = nullptr;

inline void drop_pending_copies() {
  int64_t n = static_cast<int64_t>(self->open.size());
  for (const auto& g : self->committed) n += static_cast<int64_t>(g.size());
  if (n > 0) stats.unwaited_copies += n;
  self->open.clear();
  self->committed.clear();
}

// ---- barrier of the free schedule --------------------------------------------
// Reusable; a thread that exited the kernel leaves it for the rest of the block.
// Waiters sleep on the generation counter, so opening wakes them without a lock
// convoy.
class Barrier {
 public:
  void reset(int n) {
    expected_ = n;
    arrived_ = 0;
  }
  void arrive_and_wait() {
    uint32_t gen;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      gen = generation_.load();
      if (++arrived_ == expected_) {
        open_locked();
        return;
      }
    }
    while (generation_.load() == gen) generation_.wait(gen);
  }
  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) open_locked();
  }

 private:
  void open_locked() {
    arrived_ = 0;
    generation_.fetch_add(1);
    generation_.notify_all();
  }
  std::mutex mutex_;
  std::atomic<uint32_t> generation_{0};
  int expected_ = 0, arrived_ = 0;
};

// ---- the running block -------------------------------------------------------
enum class Kind : uint8_t { kShuffle, kBallot };

// One lane's part in a warp collective.
struct LaneSlot {
  Kind kind;
  uint64_t value;  // shuffled bits, or the ballot predicate
  int src;         // source lane of a shuffle
  bool valid;      // false: the shuffle returns the lane's own value
  uint64_t result;
};

struct Block {
  int threads = 0, warps = 0;
  std::vector<unsigned char> dynamic_smem;
  // [warp][lane]; the free schedule alternates between two sets (see warp_collective)
  std::vector<std::array<std::array<LaneSlot, 32>, 2>> lanes;
  std::vector<CudaThread> cuda_threads;
  const std::function<void()>* kernel = nullptr;
  // free schedule
  Barrier block_barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  // serialised schedule
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;  // (ASan fiber bookkeeping)
  size_t scheduler_stack_size = 0;
};
inline Block* block = nullptr;

inline uint64_t collective_result(const std::array<LaneSlot, 32>& slots, int lane) {
  const LaneSlot& me = slots[lane];
  if (me.kind == Kind::kBallot) {
    uint64_t word = 0;
    for (int l = 0; l < 32; ++l) word |= (slots[l].value & 1u) << l;
    return word;
  }
  return me.valid ? slots[me.src].value : me.value;
}

// ---- fibers of the serialised schedule ------------------------------------------
constexpr size_t kFiberStack = size_t(1) << 20;

// Fiber stacks are kept for the whole program: allocating 256 of them per
// launch costs more than the launch (and far more under AddressSanitizer).
inline char* fiber_stack(int id) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (static_cast<int>(stacks.size()) <= id) stacks.emplace_back(new char[kFiberStack]);
  return stacks[id].get();
}

// Switches from the running fiber back to the scheduler (exiting: the fiber
// never resumes).
inline void to_scheduler(bool exiting) {
  CudaThread* me = self;
#if defined(EMU_ASAN_FIBERS)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &me->asan_fake_stack, block->scheduler_stack,
                                 block->scheduler_stack_size);
#endif
  if (exiting) return;  // the fiber function returns to uc_link, the scheduler
  swapcontext(&me->context, &block->scheduler);
#if defined(EMU_ASAN_FIBERS)
  __sanitizer_finish_switch_fiber(me->asan_fake_stack, &block->scheduler_stack, &block->scheduler_stack_size);
#endif
}

inline void fiber_main() {
#if defined(EMU_ASAN_FIBERS)
  __sanitizer_finish_switch_fiber(nullptr, &block->scheduler_stack, &block->scheduler_stack_size);
#endif
  (*block->kernel)();
  drop_pending_copies();
  self->wait = Wait::kDone;
  to_scheduler(true);
}

inline void resume(CudaThread& t) {
  self = &t;
  threadIdx = dim3(static_cast<unsigned>(t.id));
#if defined(EMU_ASAN_FIBERS)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t.stack, kFiberStack);
#endif
  swapcontext(&block->scheduler, &t.context);
#if defined(EMU_ASAN_FIBERS)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void start_fiber(CudaThread& t) {
  t.stack = fiber_stack(t.id);
  getcontext(&t.context);
  t.context.uc_stack.ss_sp = t.stack;
  t.context.uc_stack.ss_size = kFiberStack;
  t.context.uc_link = &block->scheduler;
  makecontext(&t.context, fiber_main, 0);
  t.wait = Wait::kRunnable;
}

// A serialised thread stops at a sync point until the scheduler opens it.
inline void yield(Wait why) {
  self->wait = why;
  to_scheduler(false);
}

// After a round in which every runnable thread ran to its next sync point,
// opens the complete ones: warp collectives all of whose lanes wait in one,
// else the block barrier once every live thread waits there. Anything else
// would hang a GPU.
inline void open_sync_points() {
  Block& b = *block;
  bool opened = false;
  for (int w = 0; w < b.warps; ++w) {
    int waiting = 0, done = 0;
    for (int l = 0; l < 32; ++l) {
      const Wait s = b.cuda_threads[w * 32 + l].wait;
      waiting += s == Wait::kWarpCollective;
      done += s == Wait::kDone;
    }
    if (waiting == 0 || waiting + done < 32) continue;
    if (done > 0)
      fatal("block (%u,%u,%u) warp %d: a full-mask warp collective after %d lanes exited", blockIdx.x, blockIdx.y,
            blockIdx.z, w, done);
    auto& slots = b.lanes[w][0];
    for (int l = 1; l < 32; ++l)
      if (slots[l].kind != slots[0].kind) fatal("warp %d: lanes in different warp collectives", w);
    for (int l = 0; l < 32; ++l) slots[l].result = collective_result(slots, l);
    for (int l = 0; l < 32; ++l) b.cuda_threads[w * 32 + l].wait = Wait::kRunnable;
    opened = true;
  }
  if (opened) return;
  int at_barrier = 0, done = 0;
  for (const CudaThread& t : b.cuda_threads) {
    at_barrier += t.wait == Wait::kBlockBarrier;
    done += t.wait == Wait::kDone;
  }
  if (at_barrier > 0 && at_barrier + done == b.threads) {
    for (CudaThread& t : b.cuda_threads)
      if (t.wait == Wait::kBlockBarrier) t.wait = Wait::kRunnable;
    return;
  }
  std::string who;
  for (const CudaThread& t : b.cuda_threads) {
    if (who.size() > 300) break;
    if (t.wait == Wait::kWarpCollective) who += " " + std::to_string(t.id) + ":collective";
    if (t.wait == Wait::kBlockBarrier) who += " " + std::to_string(t.id) + ":barrier";
  }
  fatal("block (%u,%u,%u): threads wait at different sync points:%s", blockIdx.x, blockIdx.y, blockIdx.z,
        who.c_str());
}

inline void sync_block() {
  if (settings.order == Order::kFree) {
    block->block_barrier.arrive_and_wait();
  } else {
    yield(Wait::kBlockBarrier);
  }
}

inline uint64_t warp_collective(Kind kind, uint64_t value, int src, bool valid) {
  const int lane = self->id & 31, w = self->id >> 5;
  if (settings.order != Order::kFree) {
    auto& slots = block->lanes[w][0];
    slots[lane] = LaneSlot{kind, value, src, valid, 0};
    yield(Wait::kWarpCollective);  // the scheduler fills in every lane's result
    return slots[lane].result;
  }
  // Consecutive collectives of a warp use alternate slot sets: a lane that
  // has read its result may publish the next value without waiting for the
  // others to read theirs, and cannot get two collectives ahead, since the
  // next barrier waits for all of them.
  auto& slots = block->lanes[w][self->collectives++ & 1];
  slots[lane] = LaneSlot{kind, value, src, valid, 0};
  block->warp_barriers[w]->arrive_and_wait();
  return collective_result(slots, lane);
}

// Worker threads of the free schedule. They live for the whole program
// (creating 256 threads per launch would dominate the run time); worker t
// runs CUDA thread t of every block of a launch.
class Workers {
 public:
  ~Workers() {
    job_ = nullptr;
    for (auto& s : start_) s->release();
    for (auto& th : threads_) th.join();
  }
  // Runs part(t) on workers t < n and returns when all have finished.
  void run(int n, const std::function<void(int)>& part) {
    while (static_cast<int>(threads_.size()) < n) {
      const int t = static_cast<int>(threads_.size());
      start_.push_back(std::make_unique<std::binary_semaphore>(0));
      // A worker holds its own semaphore, never indexes start_: this loop keeps
      // growing (reallocating) start_ while the workers created before run.
      std::binary_semaphore* start = start_.back().get();
      threads_.emplace_back([this, t, start] {
        while (true) {
          start->acquire();
          if (job_ == nullptr) return;
          (*job_)(t);
          done_.release();
        }
      });
    }
    job_ = &part;
    for (int t = 0; t < n; ++t) start_[t]->release();
    for (int t = 0; t < n; ++t) done_.acquire();
  }

 private:
  const std::function<void(int)>* job_ = nullptr;
  std::vector<std::thread> threads_;
  std::vector<std::unique_ptr<std::binary_semaphore>> start_;
  std::counting_semaphore<1024> done_{0};
};
inline Workers workers;

}  // namespace emu

// ---- CUDA built-ins ------------------------------------------------------------
inline void __syncthreads() { emu::sync_block(); }

inline unsigned char* emu_dynamic_smem() { return emu::block->dynamic_smem.data(); }

template <typename T>
uint64_t emu_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp collectives exchange at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
T emu_from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

inline void emu_check_mask(unsigned mask) {
  if (mask != 0xffffffffu) emu::fatal("warp collective with mask %08x: only full warps are emulated", mask);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane) {
  emu_check_mask(mask);
  return emu_from_bits<T>(emu::warp_collective(emu::Kind::kShuffle, emu_bits(v), src_lane & 31, true));
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  emu_check_mask(mask);
  const int src = (emu::self->id & 31) ^ lane_mask;
  return emu_from_bits<T>(emu::warp_collective(emu::Kind::kShuffle, emu_bits(v), src & 31, src < 32));
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  emu_check_mask(mask);
  const int src = (emu::self->id & 31) + static_cast<int>(delta);
  return emu_from_bits<T>(emu::warp_collective(emu::Kind::kShuffle, emu_bits(v), src & 31, src < 32));
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  emu_check_mask(mask);
  return static_cast<unsigned>(emu::warp_collective(emu::Kind::kBallot, pred != 0, 0, true));
}

inline int __ffs(int x) { return x == 0 ? 0 : __builtin_ctz(static_cast<unsigned>(x)) + 1; }

template <typename T>
T __ldg(const T* p) {
  return *p;
}

inline void emu_cp_async16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
    emu::fatal("cp.async of 16 bytes from %p to %p: both must be 16-byte aligned", src, dst);
  if (emu::settings.sync_copies) {
    std::memcpy(dst, src, 16);
    return;
  }
  emu::self->open.push_back({dst, src});
}

inline void emu_cp_async_commit() {
  if (emu::settings.sync_copies) return;
  emu::self->committed.push_back(std::move(emu::self->open));
  emu::self->open.clear();
}

inline void emu_cp_async_wait(int pending) {
  auto& committed = emu::self->committed;
  const size_t keep = static_cast<size_t>(pending + FASTCTX_EMU_CP_ASYNC_WAIT_SLACK);
  while (committed.size() > keep) {
    for (const emu::AsyncCopy& c : committed.front()) std::memcpy(c.dst, c.src, 16);
    committed.pop_front();
  }
}

// ---- launch ---------------------------------------------------------------------
// Runs kernel() for every block of `grid`, in blockIdx order, with `threads`
// threads per block (whole warps) and `smem` bytes of dynamic shared memory,
// under emu::settings' schedule.
inline void emu_launch(dim3 grid, int threads, const std::function<void()>& kernel, size_t smem = 0) {
  if (threads <= 0 || threads % 32 != 0 || threads > 1024) emu::fatal("blocks of %d threads are not emulated", threads);
  gridDim = grid;
  blockDim = dim3(static_cast<unsigned>(threads));
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  if (blocks == 0) return;
  emu::Block b;
  b.threads = threads;
  b.warps = threads / 32;
  b.kernel = &kernel;
  b.dynamic_smem.assign(std::max<size_t>(smem, 1), 0xFF);
  b.lanes.resize(b.warps);
  b.cuda_threads.resize(threads);
  for (int t = 0; t < threads; ++t) b.cuda_threads[t].id = t;
  for (int w = 0; w < b.warps; ++w) b.warp_barriers.push_back(std::make_unique<emu::Barrier>());
  emu::block = &b;

  const auto reset_block = [&b] {
    std::fill(b.dynamic_smem.begin(), b.dynamic_smem.end(), 0xFF);
    b.block_barrier.reset(b.threads);
    for (auto& wb : b.warp_barriers) wb->reset(32);
  };
  const auto block_index = [grid](int64_t i) {
    return dim3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                static_cast<unsigned>(i / (static_cast<int64_t>(grid.x) * grid.y)));
  };

  if (emu::settings.order == emu::Order::kFree) {
    const auto on_block_end = [&reset_block]() noexcept { reset_block(); };
    std::barrier block_end(threads, on_block_end);
    reset_block();
    emu::workers.run(threads, [&](int t) {
      emu::self = &b.cuda_threads[t];
      threadIdx = dim3(static_cast<unsigned>(t));
      for (int64_t i = 0; i < blocks; ++i) {
        blockIdx = block_index(i);
        emu::self->collectives = 0;
        kernel();
        emu::drop_pending_copies();
        // An exited thread no longer holds up the block's barriers.
        b.block_barrier.leave();
        b.warp_barriers[t >> 5]->leave();
        block_end.arrive_and_wait();
      }
    });
  } else {
    std::mt19937 rng(emu::settings.seed);
    std::vector<int> order(threads);
    std::iota(order.begin(), order.end(), 0);
    if (emu::settings.order == emu::Order::kReverse) std::reverse(order.begin(), order.end());
    for (int64_t i = 0; i < blocks; ++i) {
      blockIdx = block_index(i);
      reset_block();
      for (auto& t : b.cuda_threads) emu::start_fiber(t);
      while (true) {
        if (emu::settings.order == emu::Order::kRandom) std::shuffle(order.begin(), order.end(), rng);
        for (const int t : order)
          if (b.cuda_threads[t].wait == emu::Wait::kRunnable) emu::resume(b.cuda_threads[t]);
        if (std::all_of(b.cuda_threads.begin(), b.cuda_threads.end(),
                        [](const emu::CudaThread& t) { return t.wait == emu::Wait::kDone; }))
          break;
        emu::open_sync_points();
      }
    }
    emu::self = nullptr;
  }
  emu::block = nullptr;
}
