#pragma once
// Launch plan of the class_attention kernels: plain C++, called by the
// extension (class_attention.cu) and by the CPU emulation
// (tests/cuda_emu/class_attention.cpp). Tile geometry: ClassTile in
// class_gather_launch.h.
#include <cstdint>
#include <string>

#include "common/tile_math.h"
#include "cuda/class_gather_launch.h"

namespace fastctx {

// Shared memory of the attention kernels, in acc_t elements: the [KP][tile]
// scores / attention and the union of the staging areas (the forward's logits
// form stages no query).
template <int KP>
constexpr int class_attention_smem_elems(bool backward, bool query) {
  using G = ClassTile<KP>;
  if (!backward) return G::TILE + (query ? class_smem_max(G::GEMM, G::MIX) : G::MIX);
  return G::TILE + class_smem_max(class_smem_max(G::GEMM, G::MIX), class_smem_max(G::RED, 2 * G::COLSUM));
}

inline int64_t class_attention_smem_bytes(int KP, bool backward, bool query, int acc_size) {
  const int elems = KP == 32    ? class_attention_smem_elems<32>(backward, query)
                    : KP == 64  ? class_attention_smem_elems<64>(backward, query)
                    : KP == 128 ? class_attention_smem_elems<128>(backward, query)
                                : class_attention_smem_elems<256>(backward, query);
  return static_cast<int64_t>(acc_size) * elems;
}

struct ClassAttentionPlan {
  int KP = 0;           // padded classes: the kernel instantiation
  bool query = false;   // query form (else logits)
  int64_t tiles = 0;    // pixel tiles per image
  int64_t parts = 0;    // backward: blocks per image, each a contiguous tile range with its own slot
  bool vec = false;     // 4-pixel vector accesses: N % 4 == 0 and 16-byte aligned maps
  int64_t fwd_smem_bytes = 0, bwd_smem_bytes = 0;
  int64_t slot_elems = 0;  // backward partials (acc_t): [B, parts, K, Cv + Cq]
  Grid3 fwd_grid;          // class_attention_fwd_kernel: (pixel tiles; image)
  Grid3 bwd_grid;          // class_attention_bwd_kernel: (slots; image)
  Grid3 sum_grid;          // class_attention_sum_kernel: 1-D over B * K * (Cv + Cq)
  std::string error;       // non-empty: the call is beyond the kernels (the message says why / how to split)
};

// Cq = 0 for the logits form. elem_size: bytes of a data element; acc_size: of
// the accumulation type. sm_count (the device's multiprocessors) sizes the
// backward's tile ranges.
inline ClassAttentionPlan class_attention_plan(int64_t B, int64_t K, int64_t Cq, int64_t Cv, int64_t N, int elem_size,
                                               int acc_size, bool aligned16, int64_t sm_count) {
  ClassAttentionPlan p;
  p.error = class_k_error(K);
  if (!p.error.empty()) return p;
  p.KP = class_padded(K);
  p.query = Cq > 0;
  p.tiles = tile_ceil_div(N, kClassTile);
  p.vec = aligned16 && N % 4 == 0;
  p.fwd_smem_bytes = class_attention_smem_bytes(p.KP, false, p.query, acc_size);
  p.bwd_smem_bytes = class_attention_smem_bytes(p.KP, true, p.query, acc_size);
  // The maps the backward reads per image: grad and the query (or the logits).
  const int64_t input_bytes = N * (Cv + (p.query ? Cq : K)) * elem_size;
  p.parts = class_pixel_chunks(p.tiles, 1, B, sm_count, input_bytes, K * (Cv + Cq) * acc_size);
  p.slot_elems = B * p.parts * K * (Cv + Cq);
  p.fwd_grid = Grid3{p.tiles, B, 1};
  p.bwd_grid = Grid3{p.parts, B, 1};
  p.sum_grid = Grid3{tile_ceil_div(B * K * (Cv + Cq), kThreads), 1, 1};
  if (p.error.empty()) p.error = grid_limit_error("class_attention_fwd", p.fwd_grid, 1, B);
  if (p.error.empty()) p.error = grid_limit_error("class_attention_bwd", p.bwd_grid, 1, B);
  if (p.error.empty()) p.error = grid_limit_error("class_attention_bwd (sum)", p.sum_grid, 0, B);
  return p;
}

}  // namespace fastctx
