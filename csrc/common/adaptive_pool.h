#pragma once
// Bin edges of adaptive average pooling, bit-for-bit PyTorch's:
//   bin i of `out` bins over `in` elements covers [floor(i*in/out), ceil((i+1)*in/out)).
// Neighbouring bins overlap when `in` is not a multiple of `out` (in=33, out=6:
// [0,6), [5,11), ...).
#include <cstdint>

#include "macros.h"

namespace fastctx {

FASTCTX_HOST_DEVICE int64_t adaptive_bin_start(int64_t i, int64_t in, int64_t out) {
  return (i * in) / out;
}

FASTCTX_HOST_DEVICE int64_t adaptive_bin_end(int64_t i, int64_t in, int64_t out) {
  return ((i + 1) * in + out - 1) / out;
}

// First and one-past-last bin whose range contains input element `p`
// (used by the backward, which scatters each bin's gradient to its inputs).
FASTCTX_HOST_DEVICE int64_t adaptive_first_bin(int64_t p, int64_t in, int64_t out) {
  // end(i) > p  <=>  (i+1)*in > p*out  <=>  i >= floor(p*out/in).
  return (p * out) / in;
}

FASTCTX_HOST_DEVICE int64_t adaptive_last_bin(int64_t p, int64_t in, int64_t out) {
  // start(i) <= p  <=>  i*in < (p+1)*out  <=>  i <= floor(((p+1)*out - 1) / in).
  const int64_t last = ((p + 1) * out - 1) / in;
  return (last < out - 1 ? last : out - 1) + 1;
}

}  // namespace fastctx
