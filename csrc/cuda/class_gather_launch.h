#pragma once
// Launch plan of the class_gather kernels: plain C++, called by the extension
// (class_gather.cu) and by the CPU emulation (tests/cuda_emu/class_gather.cpp).
// Also the tile geometry of the class-context kernels (ClassTile), which
// class_attention's kernels and plan use too.
//
// Every kernel works on pixel tiles of kClassTile pixels holding all the
// classes of the tile, padded to KP = 32, 64, 128 or 256 rows (one kernel
// instantiation per KP), so K <= kClassMaxK.
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/tile_math.h"

namespace fastctx {

constexpr int kClassMaxK = 256;
constexpr int kClassTile = 32;            // pixels per tile: 8 lanes x 4 pixels
constexpr int kClassLd = kClassTile + 4;  // row stride of [row][pixel] shared tiles: 16-byte rows, 4 banks apart
constexpr int kClassMixChannels = 128;    // output channels per step of class_mix (32 lanes x 4)
constexpr int kClassMixRows = 32;         // class rows staged per step of class_mix

// Padded class count: the kernels are instantiated for 32, 64, 128 and 256.
inline int class_padded(int64_t K) {
  return K <= 32 ? 32 : K <= 64 ? 64 : K <= 128 ? 128 : 256;
}

// Tile geometry for KP padded classes. Sizes of shared-memory regions are in
// acc_t elements.
template <int KP>
struct ClassTile {
  static_assert(KP == 32 || KP == 64 || KP == 128 || KP == 256, "padded class counts");
  // class_rows_gemm (S = coef . X over channels): threads are 32 (classes) x 8
  // (pixels), each KP / 32 classes x 4 pixels; CC channels per staged chunk,
  // so every chunk is 16 channels x 32 FMAs (or more) per thread.
  static constexpr int GEMM_KT = KP / 32;
  static constexpr int CC = 4096 / KP > 64 ? 64 : 4096 / KP;
  static constexpr int GEMM = CC * (KP + 1) + CC * kClassLd;  // coef^T [CC][KP + 1] + data [CC][kClassLd]
  // class_pixel_reduce (R += P . X^T over the tile's pixels): each thread 4
  // classes x 8 channels, so a step covers RED_CB = 8192 / KP channels.
  static constexpr int RED_KT = 4, RED_CT = 8;
  static constexpr int RED_TK = KP / RED_KT;        // threads along the classes
  static constexpr int RED_TC = kThreads / RED_TK;  // threads along the channels
  static constexpr int RED_CB = RED_TC * RED_CT;
  static constexpr int RED = RED_CB * kClassLd;  // data [RED_CB][kClassLd]
  static constexpr int TILE = KP * kClassLd;     // one [KP][pixel] tile (weights, scores, attention)
  static constexpr int MIX = kClassMixRows * kClassMixChannels;  // class_mix's coefficient rows
  static constexpr int COLSUM = 32 * kClassLd;                   // per-thread-row partial sums over classes
  static_assert(RED_TK * RED_TC == kThreads && RED_TC >= 4, "reduction thread grid");
};

// Largest of a list of sizes.
constexpr int class_smem_max(int a, int b) {
  return a > b ? a : b;
}

// Shared memory of the gather kernels, in acc_t elements. Forward: the
// weights tile, a feats tile and the per-class rescale factors of the online
// softmax. Backward: the weights tile and the union of the staging areas.
template <int KP>
constexpr int class_gather_smem_elems(bool backward) {
  using G = ClassTile<KP>;
  return backward ? G::TILE + class_smem_max(G::GEMM, class_smem_max(G::COLSUM, G::MIX)) : G::TILE + G::RED + KP;
}

// The dynamic shared memory of an instantiation (a constant of it: the limit
// is raised to it once).
inline int64_t class_gather_smem_bytes(int KP, bool backward, int acc_size) {
  const int elems = KP == 32    ? class_gather_smem_elems<32>(backward)
                    : KP == 64  ? class_gather_smem_elems<64>(backward)
                    : KP == 128 ? class_gather_smem_elems<128>(backward)
                                : class_gather_smem_elems<256>(backward);
  return static_cast<int64_t>(acc_size) * elems;
}

// Channels per step of class_pixel_reduce: ClassTile<KP>::RED_CB.
inline int class_reduce_channels(int KP) {
  return 8192 / KP;
}
static_assert(ClassTile<32>::RED_CB == 8192 / 32 && ClassTile<256>::RED_CB == 8192 / 256, "class_reduce_channels");

// Pixel chunks per image of a kernel whose blocks own contiguous tile ranges
// and write one acc_t partial slot of `slot_elems` each: enough blocks for
// about four per SM, but at most as many slots as keep them within the size of
// the inputs they sum (`input_bytes` per image), unless that would leave SMs
// idle; at most one chunk per tile, so every block owns >= 1 tile.
inline int64_t class_pixel_chunks(int64_t tiles, int64_t blocks_per_chunk, int64_t B, int64_t sm_count,
                                  int64_t input_bytes, int64_t slot_bytes) {
  const int64_t per_chunk = std::max<int64_t>(1, blocks_per_chunk * B);
  const int64_t want = tile_ceil_div(4 * std::max<int64_t>(sm_count, 1), per_chunk);
  const int64_t floor = tile_ceil_div(std::max<int64_t>(sm_count, 1), per_chunk);
  const int64_t by_memory = input_bytes / std::max<int64_t>(slot_bytes, 1);
  return std::clamp<int64_t>(std::min(want, std::max(floor, by_memory)), 1, std::max<int64_t>(tiles, 1));
}

// Dispatches f(std::integral_constant<int, KP>()) for a padded class count.
template <typename F>
void class_dispatch_padded(int KP, F&& f) {
  switch (KP) {
    case 32: f(std::integral_constant<int, 32>()); break;
    case 64: f(std::integral_constant<int, 64>()); break;
    case 128: f(std::integral_constant<int, 128>()); break;
    default: f(std::integral_constant<int, 256>()); break;
  }
}

// Empty when K is within the kernels, else why not.
inline std::string class_k_error(int64_t K) {
  if (K >= 1 && K <= kClassMaxK) return std::string();
  return "expected 1 <= K <= " + std::to_string(kClassMaxK) +
         " classes (the CUDA kernels hold every class of a pixel tile in shared memory), got K = " +
         std::to_string(K);
}

struct ClassGatherPlan {
  int KP = 0;             // padded classes: the kernel instantiation
  int64_t tiles = 0;      // pixel tiles per image
  int64_t cblocks = 0;    // forward: channel blocks of ClassTile<KP>::RED_CB channels
  int64_t parts = 0;      // forward: pixel chunks per image, one partial slot each
  bool vec = false;       // 4-pixel vector accesses: N % 4 == 0 and 16-byte aligned maps
  int64_t fwd_smem_bytes = 0, bwd_smem_bytes = 0;
  // Forward partials (acc_t): weighted feature sums [B, parts, K, C], then the
  // per-class sums of weights and (ocr) their shifts, [B, parts, K] each.
  int64_t part_elems = 0, part_sum = 0, part_shift = 0;
  // Backward workspace (acc_t): G' = grad (ocr) or grad / mass (paper) [B, K, C],
  // then offset_k = G'_k . centre_k [B, K].
  int64_t ws_elems = 0, ws_offset = 0;
  Grid3 fwd_grid;    // class_gather_fwd_kernel: (channel block fastest, then chunk; image)
  Grid3 merge_grid;  // class_gather_merge_kernel: 1-D, kThreads channels of one (image, class) per block
  Grid3 prep_grid;   // class_gather_prep_kernel: 1-D, one warp per (image, class)
  Grid3 bwd_grid;    // class_gather_bwd_kernel: (pixel tiles; image)
  std::string error;  // non-empty: the call is beyond the kernels (the message says why / how to split)
};

// elem_size: bytes of a data element; acc_size: of the accumulation type.
// sm_count (the device's multiprocessors) sizes the forward's pixel chunks.
inline ClassGatherPlan class_gather_plan(int64_t B, int64_t C, int64_t K, int64_t N, int elem_size, int acc_size,
                                         bool aligned16, int64_t sm_count) {
  ClassGatherPlan p;
  p.error = class_k_error(K);
  if (!p.error.empty()) return p;
  p.KP = class_padded(K);
  p.tiles = tile_ceil_div(N, kClassTile);
  p.vec = aligned16 && N % 4 == 0;
  p.fwd_smem_bytes = class_gather_smem_bytes(p.KP, false, acc_size);
  p.bwd_smem_bytes = class_gather_smem_bytes(p.KP, true, acc_size);
  p.cblocks = tile_ceil_div(C, class_reduce_channels(p.KP));
  p.parts = class_pixel_chunks(p.tiles, p.cblocks, B, sm_count, N * C * elem_size, K * C * acc_size);
  p.part_elems = B * p.parts * K * C;
  p.part_sum = p.part_elems;
  p.part_shift = p.part_sum + B * p.parts * K;
  p.part_elems = p.part_shift + B * p.parts * K;
  p.ws_offset = B * K * C;
  p.ws_elems = p.ws_offset + B * K;
  p.fwd_grid = Grid3{p.cblocks * p.parts, B, 1};
  p.merge_grid = Grid3{B * K * tile_ceil_div(C, kThreads), 1, 1};
  p.prep_grid = Grid3{tile_ceil_div(B * K, kWarps), 1, 1};
  p.bwd_grid = Grid3{p.tiles, B, 1};
  if (p.error.empty()) p.error = grid_limit_error("class_gather_fwd", p.fwd_grid, 1, B);
  if (p.error.empty()) p.error = grid_limit_error("class_gather_fwd (merge)", p.merge_grid, 0, B);
  if (p.error.empty()) p.error = grid_limit_error("class_gather_bwd", p.bwd_grid, 1, B);
  return p;
}

}  // namespace fastctx
