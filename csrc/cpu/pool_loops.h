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

// channels_last backward work split: one task per (image, block of channels), so no two
// tasks touch the same grad_input element and each task scatters in a fixed order.
constexpr int64_t kChannelBlock = 64;

}  // namespace convrnn
