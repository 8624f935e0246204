#pragma once
// Index maths of window_attention (contract: docs/kernels.md, "window_attention"),
// shared by the CPU backend and the CUDA kernels: where a window's token sits in
// the [B, H, W, 3C] token layout, its shift region, and the bias table row of a
// pair of tokens. Nothing here is ever materialised as a tensor.
#include <cstdint>

#include "macros.h"

namespace fastctx {

struct WindowGeometry {
  int64_t H, W;      // token map
  int64_t Wh, Ww;    // window
  int64_t sh, sw;    // cyclic shift, 0 <= s < window
  int64_t Hp, Wp;    // map padded at bottom/right to whole windows
  int64_t nWh, nWw;  // windows per column, per row
};

FASTCTX_HOST_DEVICE WindowGeometry window_geometry(int64_t H, int64_t W, int64_t Wh, int64_t Ww,
                                                   int64_t sh, int64_t sw) {
  WindowGeometry g;
  g.H = H;
  g.W = W;
  g.Wh = Wh;
  g.Ww = Ww;
  g.sh = sh;
  g.sw = sw;
  g.nWh = (H + Wh - 1) / Wh;
  g.nWw = (W + Ww - 1) / Ww;
  g.Hp = g.nWh * Wh;
  g.Wp = g.nWw * Ww;
  return g;
}

// Coordinate in the padded map of coordinate `rolled` of the rolled map:
// (rolled + shift) mod padded, for 0 <= rolled < padded and 0 <= shift < padded.
FASTCTX_HOST_DEVICE int64_t window_source(int64_t rolled, int64_t shift, int64_t padded) {
  const int64_t p = rolled + shift;
  return p >= padded ? p - padded : p;
}

// Swin's region (0, 1, 2) of rolled coordinate `rolled` along one axis: mmseg's
// slices (0:-window, -window:-shift, -shift:) of the padded map.
FASTCTX_HOST_DEVICE int window_region(int64_t rolled, int64_t window, int64_t shift, int64_t padded) {
  return rolled < padded - window ? 0 : rolled < padded - shift ? 1 : 2;
}

// A window's token: its row in the [B*H*W] token rows (-1: a padded token) and
// its region label (row region * 3 + column region; tokens with different
// labels get -100 added to their logit when the map is shifted).
struct WindowToken {
  int64_t row;
  int label;
};

// Token t = i*Ww + j of window `window` (row-major over batch, window rows, window columns).
FASTCTX_HOST_DEVICE WindowToken window_token(const WindowGeometry& g, int64_t window, int64_t t) {
  const int64_t per_image = g.nWh * g.nWw;
  const int64_t b = window / per_image, wi = window % per_image;
  const int64_t r = (wi / g.nWw) * g.Wh + t / g.Ww;  // rolled row
  const int64_t c = (wi % g.nWw) * g.Ww + t % g.Ww;  // rolled column
  const int64_t y = window_source(r, g.sh, g.Hp), x = window_source(c, g.sw, g.Wp);
  WindowToken token;
  token.row = y < g.H && x < g.W ? (b * g.H + y) * g.W + x : -1;
  token.label = window_region(r, g.Wh, g.sh, g.Hp) * 3 + window_region(c, g.Ww, g.sw, g.Wp);
  return token;
}

// Row of the [(2Wh-1)(2Ww-1), heads] bias table of query token t and key token u.
FASTCTX_HOST_DEVICE int64_t window_table_index(int64_t t, int64_t u, int64_t Wh, int64_t Ww) {
  return (t / Ww - u / Ww + Wh - 1) * (2 * Ww - 1) + (t % Ww - u % Ww + Ww - 1);
}

}  // namespace fastctx
