#pragma once
// Launch plan of the gla_context kernels: plain C++, called by the extension
// (gla_context.cu) and by the CPU emulation (tests/cuda_emu/gla_context.cpp).
//
// Groups sharing a register-block width KJ (gla_k_per_thread) share a launch:
// one kernel instantiation per width keeps the register allocation of each
// tight (a kernel switching between all widths at run time needs about twice
// the registers of any one of them). The default scales (1, 2, 3, 6) take
// three launches; the extension runs them concurrently, largest first.
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "common/tile_math.h"

namespace fastctx {

constexpr int kGlaMaxGroups = 16;
// Largest S_g: the [S_g x tile] affinity (and, backward, its gradient) live in
// shared memory; 192 rows fit the sm_80 per-block limit in fp32.
constexpr int kGlaMaxGroupSize = 192;
constexpr int kGlaChanChunk = 32;  // channels staged per step of the logit GEMMs
constexpr int kGlaOutChunk = 64;   // output channels per step of the mixing GEMMs (8 warps x 8)
constexpr int kGlaMaxKChunk = 64;  // k rows per chunk (8 warps x at most 8)
constexpr int kGlaFwdTile = 128;   // pixels per forward tile (4 per lane)
constexpr int kGlaBwdTile = 64;    // pixels per backward tile (2 per lane)
constexpr int kGlaPad = 4;         // row padding of tiles read across lanes (keeps 16-byte alignment)
static_assert(kGlaOutChunk == 8 * kWarps && kGlaMaxKChunk == 8 * kWarps, "warp split of the GEMMs");

// The register-block widths the kernels are instantiated for: 8 warps share a
// group's k (affinity) rows, each thread holding KJ consecutive rows, so one
// k chunk covers 8 * KJ rows (larger groups loop over 64-row chunks).
constexpr int kGlaWidths[] = {8, 5, 4, 2, 1};

inline int gla_k_per_thread(int64_t group_size) {
  return group_size <= 8 ? 1 : group_size <= 16 ? 2 : group_size <= 32 ? 4 : group_size <= 40 ? 5 : 8;
}

// Largest group a width serves.
inline int64_t gla_max_group_size(int kj) {
  return kj == 1 ? 8 : kj == 2 ? 16 : kj == 4 ? 32 : kj == 5 ? 40 : kGlaMaxGroupSize;
}

// Rows a per-tile [k][pixel] buffer must hold for a group: the group size
// rounded up to whole k chunks, because a warp may read (and then discard)
// the padding rows of its last chunk. Monotone in group_size, so sizing the
// buffer for the launch's largest group covers every group of the launch.
inline int64_t gla_padded_rows(int64_t group_size) {
  const int64_t chunk = 8 * static_cast<int64_t>(gla_k_per_thread(group_size));
  return tile_ceil_div(group_size, chunk) * chunk;
}

// Shared memory (acc_t elements) of a block whose largest group has s rows.
// Forward: the affinity tile plus the larger of the two staging layouts (see
// fwd_tile). Backward: A and dL tiles plus staging (see bwd_tile).
inline int64_t gla_smem_elems(bool backward, int64_t s) {
  const int64_t chunk = 8 * static_cast<int64_t>(gla_k_per_thread(s));
  if (!backward) {
    return gla_padded_rows(s) * kGlaFwdTile +
           std::max<int64_t>(kGlaChanChunk * (kGlaFwdTile + chunk + kGlaPad), s * (kGlaOutChunk + kGlaPad));
  }
  return 2 * gla_padded_rows(s) * kGlaBwdTile +
         std::max<int64_t>(kGlaChanChunk * (kGlaBwdTile + chunk + kGlaPad),
                           2 * kGlaOutChunk * (kGlaBwdTile + kGlaPad) +
                               std::min<int64_t>(s, kGlaMaxKChunk) * (kGlaOutChunk + kGlaPad));
}

// The largest dynamic shared memory any launch of the (direction, KJ, acc_t)
// instantiation can need: what its limit is raised to, once.
inline int64_t gla_max_smem_bytes(bool backward, int kj, int acc_size) {
  return acc_size * gla_smem_elems(backward, gla_max_group_size(kj));
}

// The groups of one launch, by launch slot = blockIdx.y. Passed by value as a
// kernel argument and only read with compile-time indices, so nothing is
// copied to local memory.
struct GroupTable {
  int count;
  int group[kGlaMaxGroups];   // group index g (its channel slice of x / z)
  int size[kGlaMaxGroups];    // S_g
  int offset[kGlaMaxGroups];  // o_g: first row in weight / bias / pooled
};

struct GlaLaunch {
  int kj = 0;              // register-block width: the kernel instantiation
  GroupTable table{};      // this launch's groups, largest first
  int rows_alloc = 0;      // rows of the shared affinity tile (gla_padded_rows of the largest group)
  int64_t smem_bytes = 0;  // dynamic shared memory per block
  Grid3 grid;              // (pixel tiles, or backward tile ranges; groups of the launch; images)
};

struct GlaPlan {
  int64_t S_tot = 0;  // sum of the group sizes
  int64_t tiles = 0;  // pixel tiles per image
  bool vec = false;   // 4-pixel vector accesses: N % 4 == 0 and 16-byte aligned data pointers
  std::vector<GlaLaunch> launches;
  // Backward: `nblk` blocks share an image's tiles, each a contiguous range of
  // them (every range non-empty) and a partial slice of grad_weight /
  // grad_pooled [S_tot][C] and grad_bias [S_tot], summed in a fixed order by
  // sum_partials_kernel.
  int64_t nblk = 0;
  int64_t part_elems = 0;       // elements of each [B, nblk, S_tot, C] partial of grad_weight / grad_pooled
  int64_t part_bias_elems = 0;  // elements of the [B, nblk, S_tot] partial of grad_bias
  Grid3 sum_weight_grid, sum_pooled_grid, sum_bias_grid;
  std::string error;  // non-empty: the call is beyond the kernels (the message says why / how to split)
};

// sizes: the G group sizes; C: channels per group; N: pixels per image.
// `sm_count` (the device's multiprocessors) sizes the backward's tile ranges.
inline GlaPlan gla_context_plan(bool backward, const int64_t* sizes, int64_t G, int64_t B, int64_t C, int64_t N,
                                int acc_size, bool aligned16, int64_t sm_count) {
  GlaPlan p;
  if (G < 1 || G > kGlaMaxGroups) {
    p.error = "expected between 1 and " + std::to_string(kGlaMaxGroups) + " groups, got " + std::to_string(G);
    return p;
  }
  std::vector<int64_t> offset(G);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t s = sizes[g];
    if (s < 1 || s > kGlaMaxGroupSize) {
      p.error = "group " + std::to_string(g) + " has " + std::to_string(s) +
                " rows; the CUDA kernels keep a group's [rows x pixel tile] affinity in shared memory and "
                "support 1 to " + std::to_string(kGlaMaxGroupSize) +
                " rows per group (use the triton or reference backend for larger groups)";
      return p;
    }
    offset[g] = p.S_tot;
    p.S_tot += s;
  }
  if (p.S_tot * C > INT32_MAX) {
    p.error = "expected S_tot * C < 2^31 (32-bit indices into weight and pooled), got " +
              std::to_string(p.S_tot * C);
    return p;
  }
  p.vec = aligned16 && N % 4 == 0;
  p.tiles = tile_ceil_div(N, backward ? kGlaBwdTile : kGlaFwdTile);
  // Backward blocks per image and group: enough for a few waves; each walks a
  // contiguous range of tiles, so partial memory stays ~B * nblk * S_tot * C.
  p.nblk = backward ? std::min<int64_t>(p.tiles, std::max<int64_t>(1, tile_ceil_div(8 * sm_count, G * B))) : 0;

  for (const int kj : kGlaWidths) {
    std::vector<int> members;
    for (int g = 0; g < G; ++g)
      if (gla_k_per_thread(sizes[g]) == kj) members.push_back(g);
    if (members.empty()) continue;
    // Largest groups first within a launch: blocks are scheduled in
    // blockIdx.y order, so the long ones start early.
    std::stable_sort(members.begin(), members.end(), [&](int a, int b) { return sizes[a] > sizes[b]; });
    GlaLaunch l;
    l.kj = kj;
    l.table.count = static_cast<int>(members.size());
    for (size_t i = 0; i < members.size(); ++i) {
      const int g = members[i];
      l.table.group[i] = g;
      l.table.size[i] = static_cast<int>(sizes[g]);
      l.table.offset[i] = static_cast<int>(offset[g]);
    }
    const int64_t largest = sizes[members.front()];
    l.rows_alloc = static_cast<int>(gla_padded_rows(largest));
    l.smem_bytes = acc_size * gla_smem_elems(backward, largest);
    l.grid = Grid3{backward ? p.nblk : p.tiles, l.table.count, B};
    if (p.error.empty()) p.error = grid_limit_error(backward ? "gla_context_bwd" : "gla_context_fwd", l.grid, 2, B);
    p.launches.push_back(l);
  }
  if (backward) {
    p.part_elems = B * p.nblk * p.S_tot * C;
    p.part_bias_elems = B * p.nblk * p.S_tot;
    p.sum_weight_grid = Grid3{tile_ceil_div(p.S_tot * C, 32), 1, 1};
    p.sum_pooled_grid = Grid3{tile_ceil_div(p.S_tot * C, 32), B, 1};
    p.sum_bias_grid = Grid3{tile_ceil_div(p.S_tot, 32), B, 1};
  }
  return p;
}

// Calls f(std::integral_constant<int, KJ>()) for the instantiation of width kj.
template <typename F>
void gla_dispatch_width(int kj, F&& f) {
  switch (kj) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

}  // namespace fastctx
