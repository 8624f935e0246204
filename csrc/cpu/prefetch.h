#pragma once
// Software prefetch of memory the hardware prefetchers do not follow.
//
// The kernels read tiles made of many short runs far apart (an NCHW tile's
// channel rows, a window's token rows): more streams than the hardware
// prefetchers track. Prefetching the next tile all at once helps little: a
// core has a few dozen line-fill buffers, so a burst of hundreds of prefetches
// stalls until all but the last few dozen have arrived, much the same wait as
// the loads themselves. SpreadPrefetch issues such a tile a few lines at a
// time from points spread over the compute of the tile before, so the misses
// overlap that compute; it fetches into L2 (prefetcht1), which holds the next
// tile without evicting the current one's L1 working set (window attention
// on ULLMC's windows, AVX-512 EPYC: forward 13.3-13.8 ms with prefetcht0,
// 12.4-12.7 ms with prefetcht1).
// PrefetchNow fetches into L1 at once: for the few lines needed next.
#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastctx {
namespace cpu {

// The 64-byte lines holding bytes [p, p + bytes), bytes > 0.
struct LineSpan {
  const char* first;
  int64_t lines;
};
inline LineSpan line_span(const void* p, int64_t bytes) {
  const auto first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const auto last = (reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes) - 1) & ~uintptr_t(63);
  return {reinterpret_cast<const char*>(first), static_cast<int64_t>((last - first) / 64 + 1)};
}

// The lines of bytes [p, p + bytes), prefetched into L1 at once (to be written
// if `write`): SpreadPrefetch::add's interface, so that code listing lines
// serves either.
struct PrefetchNow {
  void add(const void* p, int64_t bytes, bool write) const {
    if (bytes <= 0) return;
    const LineSpan span = line_span(p, bytes);
    for (int64_t i = 0; i < span.lines; ++i) {
      if (write) {
        __builtin_prefetch(span.first + i * 64, 1, 3);
      } else {
        __builtin_prefetch(span.first + i * 64, 0, 3);
      }
    }
  }
};

// Lines added (runs of bytes), then issued `step_` at a time by step() from
// the points a caller planned, into L2; issue_rest() issues what is left.
class SpreadPrefetch {
 public:
  // Forgets what was added and not issued.
  void clear() {
    runs_.clear();
    run_ = 0;
    line_ = 0;
    total_ = 0;
    issued_ = 0;
    step_ = 0;
  }
  // Adds the lines of bytes [p, p + bytes), to be written if `write`.
  void add(const void* p, int64_t bytes, bool write) {
    if (bytes <= 0) return;
    const LineSpan span = line_span(p, bytes);
    runs_.push_back({span.first, span.lines, write});
    total_ += span.lines;
  }
  // Adds `rows` runs of row_bytes, stride_bytes apart from p.
  void add_rows(const void* p, int64_t rows, int64_t row_bytes, int64_t stride_bytes, bool write) {
    const char* row = static_cast<const char*>(p);
    for (int64_t r = 0; r < rows; ++r, row += stride_bytes) add(row, row_bytes, write);
  }
  // Spreads the lines not yet issued over `points` calls of step().
  void plan(int64_t points) {
    const int64_t left = total_ - issued_;
    step_ = points > 0 ? (left + points - 1) / points : left;
  }
  void step() {
    if (issued_ < total_) issue(step_);
  }
  // Prefetches the next `count` lines not yet prefetched (all that are left if fewer).
  void issue(int64_t count) {
    count = std::min(count, total_ - issued_);
    issued_ += count;
    while (count > 0) {
      const Run& r = runs_[run_];
      const int64_t n = std::min(count, r.lines - line_);
      const char* line = r.first + line_ * 64;
      if (r.write) {
        for (int64_t i = 0; i < n; ++i) __builtin_prefetch(line + i * 64, 1, 2);
      } else {
        for (int64_t i = 0; i < n; ++i) __builtin_prefetch(line + i * 64, 0, 2);
      }
      count -= n;
      line_ += n;
      if (line_ == r.lines) {
        line_ = 0;
        ++run_;
      }
    }
  }
  void issue_rest() { issue(total_ - issued_); }

 private:
  struct Run {
    const char* first;  // first line
    int64_t lines;
    bool write;
  };
  std::vector<Run> runs_;
  size_t run_ = 0;
  int64_t line_ = 0, total_ = 0, issued_ = 0, step_ = 0;
};

}  // namespace cpu
}  // namespace fastctx
