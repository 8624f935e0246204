#pragma once
// Launch plan of the encoding kernels: plain C++, called by the extension
// (encoding.cu) and by the CPU emulation (tests/cuda_emu/encoding.cpp). Also
// the tile geometry and shared-memory layout of encoding_tile_kernel, which
// the plan sizes and the kernel indexes with.
#include <algorithm>
#include <cstdint>
#include <string>

#include "common/tile_math.h"

namespace fastctx {

// Codewords the kernels hold per pixel row (one or two per lane of a warp).
constexpr int kEncMaxCodes = 64;

// Tile geometry for KP padded codewords (32 or 64). Every 4x4 register tile
// product uses all 256 threads: TN * KP = KP * DC3 = TN3 * DC3 = 4096.
template <int KP, bool BWD>
struct EncTile {
  static constexpr int TN = 4096 / KP;   // pixels per tile
  // Channels per logits chunk: the backward accumulates S and G (twice the
  // registers), so it stages half as many channels of x per chunk (same FMAs
  // per barrier, half the prefetch registers).
  static constexpr int DC1 = BWD ? 16 : 32;
  static constexpr int DC3 = 4096 / KP;  // channels per aggregation chunk (Dp is a multiple)
  static constexpr int TN3 = KP;         // pixels per aggregation step
  static constexpr int SUB3 = TN / TN3;  // aggregation steps per chunk
  // Row strides of the shared tiles: +4 keeps rows 16-byte aligned for the
  // vector reads and shifts consecutive rows by 4 banks, which makes the
  // transposing stores (8 x 4 lane blocks) conflict-free.
  static constexpr int XS_LD = TN + 4;   // x' [DC1][TN] and the assignment [rows][TN]
  static constexpr int CS_LD = KP + 4;   // c'^T, dE^T [DC1][KP]
  static constexpr int X3_LD = DC3 + 4;  // x' [TN3][DC3], [dE ; c'] [2KP][DC3]
  static constexpr int X1_ELEMS = DC1 * TN / kThreads;
  static constexpr int X3_ELEMS = TN3 * DC3 / kThreads;
  static constexpr int XR = X1_ELEMS > X3_ELEMS ? X1_ELEMS : X3_ELEMS;
  static constexpr int XQ = kThreads / TN;  // threads per pixel for ||x'||^2
  static_assert(TN % 32 == 0 && DC3 % 32 == 0 && TN3 % 8 == 0 && TN % TN3 == 0, "tile shape");
};

// Shared-memory layout (in acc_t elements; every offset a multiple of 4).
template <int KP, bool BWD>
struct EncSmem {
  using G = EncTile<KP, BWD>;
  static constexpr int ROWS = BWD ? 2 * KP : KP;  // [A ; V] rows of the per-tile assignment
  static constexpr int ST = ROWS * G::XS_LD;
  static constexpr int P1 = G::DC1 * G::XS_LD + 2 * (BWD ? 2 : 1) * G::DC1 * G::CS_LD;
  static constexpr int P3 = G::TN3 * G::X3_LD + (BWD ? 2 * KP * G::X3_LD : 0);
  static constexpr int RED = (BWD ? 3 : 1) * kWarps * KP;
  static constexpr int R1 = P1 > P3 ? (P1 > RED ? P1 : RED) : (P3 > RED ? P3 : RED);
  static constexpr int XNQ = G::XQ * G::TN;
  static constexpr int OFF_R1 = ST;
  static constexpr int OFF_XNQ = OFF_R1 + R1;
  static constexpr int OFF_CN = OFF_XNQ + XNQ;
  static constexpr int OFF_SC = OFF_CN + KP;
  static constexpr int OFF_GK = OFF_SC + KP;
  static constexpr int OFF_VROW = OFF_GK + (BWD ? KP : 0);
  static constexpr int TOTAL = OFF_VROW + (BWD ? G::TN : 0);
};

// Padded codeword count: the tile kernel is instantiated for 32 and 64.
inline int encoding_padded_codes(int64_t K) {
  return K <= 32 ? 32 : 64;
}

// Dynamic shared memory of encoding_tile_kernel<KP, BWD> (a constant of the
// instantiation: the limit is raised to it once).
inline int64_t encoding_tile_smem_bytes(int KP, bool backward, int acc_size) {
  const int elems = KP == 32 ? (backward ? EncSmem<32, true>::TOTAL : EncSmem<32, false>::TOTAL)
                             : (backward ? EncSmem<64, true>::TOTAL : EncSmem<64, false>::TOTAL);
  return static_cast<int64_t>(acc_size) * elems;
}

// One call's kernels, sizes and buffers. Workspace and partials are acc_t
// (float, or double for double data) buffers; the offsets are in elements.
struct EncodingPlan {
  int64_t KP = 0;     // padded codewords (32 | 64)
  int64_t Dp = 0;     // channels padded to the aggregation chunk
  int64_t tiles = 0;  // pixel tiles per image
  int64_t parts = 0;  // tile-kernel blocks (and partial slots) per image
  int64_t smem_bytes = 0;
  // Workspace: c' [KP, Dp] | c'^T [Dp, KP] | (backward: dE [B, KP, Dp] | dE^T [B, Dp, KP])
  //            | mean [Dp] | ||c'||^2 [KP] | (backward: dE.c' [B, KP])
  int64_t ws_elems = 0, ws_cpk = 0, ws_cpt = 0, ws_gkd = 0, ws_gt = 0, ws_mean = 0, ws_cn = 0, ws_gk = 0;
  // Partials of the B * parts tile blocks: [B*parts, KP, Dp] | colsum(A) [B*parts, KP]
  //            | (backward: colsum(V) [B*parts, KP] | sum dL*dist [B*parts, KP])
  int64_t part_elems = 0, part_a = 0, part_v = 0, part_s = 0;
  int64_t flag_bytes = 0;  // uint8 [B, N]: the pixels the tile kernel leaves to the fixup kernel
  Grid3 prep_grid;       // encoding_prep_kernel for the codewords (one matrix)
  Grid3 prep_grad_grid;  // backward: encoding_prep_kernel for dE (B matrices)
  Grid3 norms_grid;      // encoding_norms_kernel (32 threads per block)
  Grid3 tile_grid;       // encoding_tile_kernel and encoding_fixup_kernel (the same blocks)
  Grid3 reduce_grid;     // encoding_{fwd,bwd}_reduce_kernel
  bool vec_out = false;  // backward: 4-wide grad_x stores (runs of 4 elements, 16-byte aligned)
  std::string error;     // non-empty: the call is beyond the kernels (the message says why / how to split)
};

// x: [B, D, N] when channels_first else [B, N, D], x_bytes = its size.
// sm_count and blocks_per_sm (the tile kernel's occupancy at smem_bytes) size
// `parts`: one full wave of resident blocks over the batch, at most one per
// tile (every block owns >= 1 tile and writes its whole slot), and few enough
// that the partials stay under half the size of x.
inline EncodingPlan encoding_plan(bool backward, int64_t B, int64_t N, int64_t D, int64_t K, bool channels_first,
                                  int acc_size, int64_t x_bytes, bool grad_x_aligned16, int64_t sm_count,
                                  int64_t blocks_per_sm) {
  EncodingPlan p;
  if (K < 1 || K > kEncMaxCodes) {
    p.error = "expected 1 <= K <= " + std::to_string(kEncMaxCodes) +
              " codewords (the CUDA kernel keeps a row of K assignments per warp), got K = " + std::to_string(K);
    return p;
  }
  p.KP = encoding_padded_codes(K);
  const int64_t dc3 = 4096 / p.KP;
  p.Dp = tile_ceil_div(D, dc3) * dc3;
  // The tile kernel indexes within one image in 32 bits (addresses in 64).
  if (N > INT32_MAX - 4096 || p.Dp > (int64_t(1) << 24)) {
    p.error = "expected at most 2^31 - 4097 pixels and 2^24 channels per image (32-bit indices within an "
              "image), got N = " + std::to_string(N) + ", D = " + std::to_string(D);
    return p;
  }
  p.tiles = tile_ceil_div(N, 4096 / p.KP);
  p.smem_bytes = encoding_tile_smem_bytes(static_cast<int>(p.KP), backward, acc_size);

  const int64_t wave = std::max<int64_t>(1, sm_count * std::max<int64_t>(blocks_per_sm, 1));
  p.parts = std::min<int64_t>(p.tiles, tile_ceil_div(wave, std::max<int64_t>(B, 1)));
  const int64_t slot_bytes = std::max<int64_t>(B, 1) * p.KP * (p.Dp + 3) * acc_size;
  p.parts = std::max<int64_t>(1, std::min<int64_t>(p.parts, x_bytes / 2 / slot_bytes));

  const int64_t cdim = p.Dp * p.KP;
  p.ws_cpk = 0;
  p.ws_cpt = cdim;
  p.ws_gkd = 2 * cdim;
  p.ws_gt = p.ws_gkd + (backward ? B * cdim : 0);
  p.ws_mean = p.ws_gt + (backward ? B * cdim : 0);
  p.ws_cn = p.ws_mean + p.Dp;
  p.ws_gk = p.ws_cn + p.KP;
  p.ws_elems = p.ws_gk + (backward ? B * p.KP : 0);

  const int64_t blocks = B * p.parts;
  p.part_a = blocks * cdim;
  p.part_v = p.part_a + blocks * p.KP;
  p.part_s = p.part_v + (backward ? blocks * p.KP : 0);
  p.part_elems = p.part_s + (backward ? blocks * p.KP : 0);
  p.flag_bytes = B * N;

  p.prep_grid.x = p.Dp / 32;
  p.prep_grad_grid.x = backward ? B * (p.Dp / 32) : 0;
  p.norms_grid.x = (backward ? 1 + B : 1) * p.KP;
  p.tile_grid.x = blocks;
  p.reduce_grid.x = (backward ? K : B * K) * tile_ceil_div(D, kThreads);
  const int64_t run = channels_first ? N : D;  // length of grad_x's contiguous runs
  p.vec_out = backward && grad_x_aligned16 && run % 4 == 0;

  const char* name = backward ? "encoding_bwd" : "encoding_fwd";
  for (const Grid3* g : {&p.prep_grad_grid, &p.norms_grid, &p.tile_grid, &p.reduce_grid}) {
    if (p.error.empty()) p.error = grid_limit_error(name, *g, 0, B);
  }
  return p;
}

}  // namespace fastctx
