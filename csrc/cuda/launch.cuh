// Launch helpers shared by the CUDA kernels: grid sizing for grid-stride loops and the
// choice of 32- or 64-bit index arithmetic.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "cuda/grid_stride.cuh"

namespace convrnn {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 16;  // grid-stride loops cover the rest

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

// Calls f with a zero of the index type: int32_t when every linear index (plus one grid
// stride of kernels doing up to items_per_thread elements a thread, so the loop counter
// cannot overflow) fits, else int64_t.  32-bit division is several times cheaper, and index
// decomposition is most of a pooling kernel's arithmetic.
template <typename F>
void with_index_type(int64_t max_index, F&& f, int64_t items_per_thread = 1) {
  if (max_index + items_per_thread * kMaxBlocks * kThreads < std::numeric_limits<int32_t>::max()) {
    f(int32_t(0));
  } else {
    f(int64_t(0));
  }
}


}  // namespace convrnn
