// Loop helpers shared by the CPU pooling kernels.
#pragma once

#include <type_traits>

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

// channels_last backward work split: one task per (image, block of channels), so no two
// tasks touch the same grad_input element and each task scatters in a fixed order.
constexpr int64_t kChannelBlock = 64;

}  // namespace convrnn
