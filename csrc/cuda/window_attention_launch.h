#pragma once
// Launch plan of the window_attention kernels: plain C++, called by the
// extension (window_attention.cu) and by the CPU emulation
// (tests/cuda_emu/window_attention.cpp). Device code:
// window_attention_kernel.cuh.
//
// One block per (window, head), heads innermost along grid.x so the blocks
// of one window, which read the same token rows, run side by side. A block
// keeps its window's keys and values in shared memory and walks the queries
// in blocks of `bq` rows; the [bq x N] scores live in shared memory only.
// Sizes are padded to multiples of 4 (the GEMMs' 4x4 register tiles): NP
// tokens, DP channels.
#include <algorithm>
#include <cstdint>
#include <string>

#include "common/macros.h"
#include "common/tile_math.h"
#include "common/window_attention.h"

namespace fastctx {

// Queries per step of a block: the whole window up to 64 tokens, else 32.
constexpr int64_t kWindowMaxWholeWindow = 64;
constexpr int64_t kWindowQueryBlock = 32;
// The backward's dK/dV accumulators (acc_t, global memory, one [2][NP][DP]
// slice per block) are bounded by launching the windows in chunks.
constexpr int64_t kWindowKvWorkspaceBytes = int64_t(64) << 20;

FASTCTX_HOST_DEVICE int64_t window_round4(int64_t v) { return (v + 3) / 4 * 4; }

// Byte offsets of a block's dynamic shared memory. The token rows (int64) and
// region labels (int) of the window come first; every acc_t array starts on a
// 16-byte boundary and holds a multiple of 4 elements (16-byte vector loads).
struct WindowSmemLayout {
  int64_t rows, labels;     // int64[NP], int[NP]
  int64_t k, v;             // forward: Kt [DP][NP], V [NP][DP]; backward: Kt, Vt [DP][NP]
  int64_t q, dout;          // Qs [bq][DP] (pre-scaled queries), dO [bq][DP] (backward)
  int64_t p, ds;            // P [bq][NP], dP then dS [bq][NP] (backward)
  int64_t pad_q, table;     // backward: pad_qkv's q gradient [DP], the table gradient [round4(entries)]
  int64_t bytes;
};

FASTCTX_HOST_DEVICE WindowSmemLayout window_smem_layout(bool backward, int64_t NP, int64_t DP, int64_t bq,
                                                         int64_t entries, int64_t acc_size) {
  WindowSmemLayout s;
  s.rows = 0;
  s.labels = NP * 8;
  int64_t at = NP * 12;  // NP % 4 == 0: a multiple of 16
  const auto take = [&](int64_t elems) {
    const int64_t o = at;
    at += elems * acc_size;
    return o;
  };
  s.k = take(DP * NP);
  s.v = take(DP * NP);
  s.q = take(bq * DP);
  s.dout = backward ? take(bq * DP) : at;
  s.p = take(bq * NP);
  s.ds = backward ? take(bq * NP) : at;
  s.pad_q = backward ? take(DP) : at;
  s.table = backward ? take(window_round4(entries)) : at;
  s.bytes = at;
  return s;
}

struct WindowAttentionPlan {
  WindowGeometry g;
  int64_t N = 0, NP = 0, d = 0, DP = 0, bq = 0, heads = 0, C = 0;
  int64_t windows = 0;       // B * nWh * nWw
  int64_t entries = 0;       // bias table rows (2Wh-1)(2Ww-1)
  bool vec = false;          // 4-channel vector accesses: d % 4 == 0 and 16-byte aligned tensors
  int64_t fwd_smem_bytes = 0, bwd_smem_bytes = 0;
  // Backward: per-(window, head) partials of the cross-window sums, [windows][heads][slot]
  // with slot = table entries (if a table) + 3d (if pad_qkv), reduced by window_attention_sum_kernel.
  int64_t table_slot = 0, slot = 0, partial_elems = 0;
  int64_t chunk_windows = 0;  // windows per backward launch
  int64_t kv_elems = 0;       // dK/dV workspace (acc_t): chunk_windows * heads * 2 * NP * DP
  Grid3 fwd_grid;             // window_attention_fwd_kernel: windows * heads
  Grid3 sum_grid;             // window_attention_sum_kernel: heads * slot
  std::string error;          // non-empty: the call is beyond the kernels (the message says how to split it)

  // The backward launch covering windows [w0, w0 + chunk_windows).
  Grid3 bwd_grid(int64_t w0) const {
    return Grid3{std::min(chunk_windows, windows - w0) * heads, 1, 1};
  }
};

// acc_size: bytes of the accumulation type; aligned16: every tensor base the
// kernels read or write with vectors is 16-byte aligned. kv_workspace_bytes
// caps the backward's dK/dV workspace (the tests make it small to get chunks).
inline WindowAttentionPlan window_attention_plan(int64_t B, int64_t H, int64_t W, int64_t C, int64_t heads,
                                                 int64_t Wh, int64_t Ww, int64_t sh, int64_t sw, bool has_table,
                                                 bool has_pad, int acc_size, bool aligned16,
                                                 int64_t kv_workspace_bytes = kWindowKvWorkspaceBytes) {
  WindowAttentionPlan p;
  p.g = window_geometry(H, W, Wh, Ww, sh, sw);
  p.heads = heads;
  p.C = C;
  p.d = C / heads;
  p.N = Wh * Ww;
  p.NP = window_round4(p.N);
  p.DP = window_round4(p.d);
  p.bq = p.NP <= kWindowMaxWholeWindow ? p.NP : kWindowQueryBlock;
  p.windows = B * p.g.nWh * p.g.nWw;
  p.entries = (2 * Wh - 1) * (2 * Ww - 1);
  p.vec = aligned16 && p.d % 4 == 0;
  p.fwd_smem_bytes = window_smem_layout(false, p.NP, p.DP, p.bq, p.entries, acc_size).bytes;
  p.bwd_smem_bytes = window_smem_layout(true, p.NP, p.DP, p.bq, p.entries, acc_size).bytes;
  p.table_slot = has_table ? p.entries : 0;
  p.slot = p.table_slot + (has_pad ? 3 * p.d : 0);
  p.partial_elems = p.windows * heads * p.slot;
  const int64_t kv_per_window = heads * 2 * p.NP * p.DP;
  p.chunk_windows = std::max<int64_t>(1, std::min(p.windows, kv_workspace_bytes / (kv_per_window * acc_size)));
  p.kv_elems = p.chunk_windows * kv_per_window;
  p.fwd_grid = Grid3{p.windows * heads, 1, 1};
  p.sum_grid = Grid3{std::max<int64_t>(1, tile_ceil_div(heads * p.slot, kThreads)), 1, 1};
  // Token offsets are int64; the kernels' int indices cover one window's tiles only.
  if (p.N > 1024 || p.d > 1024) {
    p.error = "window of " + std::to_string(p.N) + " tokens with head_dim " + std::to_string(p.d) +
              " is beyond the CUDA kernels (N <= 1024, head_dim <= 1024; shared memory limits them further)";
  }
  if (p.error.empty()) p.error = grid_limit_error("window_attention", p.fwd_grid, 0, B);
  return p;
}

// The kernels' parameters (WindowAttentionParams<scalar_t, acc_t> of
// window_attention_kernel.cuh) that the plan and the inputs give, filled alike
// by the extension and the emulation driver; table, pad: nullptr when absent.
// Each launch sets its own out, grad, grad_qkv, kv, partial and window_begin.
template <typename Params, typename scalar_t>
Params window_attention_params(const WindowAttentionPlan& plan, const scalar_t* qkv, const scalar_t* table,
                               const scalar_t* pad, double scale) {
  using acc_t = decltype(Params::scale);
  Params p{};
  p.qkv = qkv;
  p.table = table;
  p.pad = pad;
  p.g = plan.g;
  p.C = plan.C;
  p.heads = static_cast<int>(plan.heads);
  p.d = static_cast<int>(plan.d);
  p.N = static_cast<int>(plan.N);
  p.NP = static_cast<int>(plan.NP);
  p.DP = static_cast<int>(plan.DP);
  p.bq = static_cast<int>(plan.bq);
  p.entries = static_cast<int>(plan.entries);
  p.table_slot = static_cast<int>(plan.table_slot);
  p.slot = static_cast<int>(plan.slot);
  p.scale = static_cast<acc_t>(scale);
  p.vec = plan.vec;
  return p;
}

}  // namespace fastctx
