// Loop helpers shared by the CPU pooling kernels.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "avx512.h"
#include "pooling.h"

namespace convrnn {

// Calls f with the column stride as a compile-time constant for the common strides 1 and 2,
// so the vectorised row loops load stride-2 columns with shuffles, not gathers (0 means
// "use the runtime stride").
template <typename F>
void with_col_stride(int64_t sw, F&& f) {
  if (sw == 1) {
    f(std::integral_constant<int, 1>());
  } else if (sw == 2) {
    f(std::integral_constant<int, 2>());
  } else {
    f(std::integral_constant<int, 0>());
  }
}

// Row loops run in chunks of kChunk outputs with compile-time length, the last chunk shifted
// back to end at the row's end (overlapping its predecessor), so every output goes through
// one vectorised fixed-length loop with its accumulators in registers and no scalar tail:
// rows here are short (27 to 56 outputs), and a scalar tail cost more than the vector body.
// Only for rows of at least kChunk outputs, and only for work that may be done twice.
constexpr int64_t kChunk = 16;

inline int64_t chunk_start(int64_t i0, int64_t n) {
  return i0 + kChunk <= n ? i0 : n - kChunk;
}

// Channels_last output pixel q = (n * OH + oh) * OW + ow: its image n and its window's first tap
// (hstart, wstart) = (oh * sh - ph, ow * sw - pw).
struct PixelWindow {
  int64_t n, hstart, wstart;
};
inline PixelWindow pixel_window(const Pool2d& g, int64_t q) {
  return {q / (g.OH * g.OW), (q / g.OW) % g.OH * g.sh - g.ph, q % g.OW * g.sw - g.pw};
}

// channels_last backward work split: one task per (image, block of channels), so no two
// tasks touch the same grad_input element and each task scatters in a fixed order.
constexpr int64_t kChannelBlock = 64;

// Non-temporal stores for large float channels_last outputs and gradients of the pooling ops
// (avg_pool2d's forward and tiled backward, max_pool2d's tiled backward): from kStreamedBytes,
// half the last-level cache, an output is mostly evicted before its reader comes, and a normal
// store first reads each line for ownership (VGG's 2x2/2 layer: 25.7 MB of output, 102.8 MB of
// gradient, each read once more that way).  The streamed loops compute the same values in the
// same order as the plain ones: the same bits.  streamed_mode(): 1 on, 0 off;
// CONVRNN_POOL2D_STREAMED when first asked, convrnn::_pool2d_streamed (cpu/pool_streamed.cpp).
constexpr int64_t kStreamedBytes = int64_t(16) << 20;
std::atomic<int>& streamed_mode();
void note_streamed();

#if CONVRNN_HAVE_AVX512
// Whether a float tensor of n elements at y, C channels_last channels, is written streamed.
inline bool streams(const void* y, int64_t C, int64_t n) {
  return C % 16 == 0 && reinterpret_cast<std::uintptr_t>(y) % 64 == 0 && n * int64_t(sizeof(float)) >= kStreamedBytes &&
         cpu_has_avx512f() && streamed_mode().load(std::memory_order_relaxed) != 0;
}
#endif

}  // namespace convrnn
