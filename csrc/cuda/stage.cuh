// Staging a tile's elements from global into shared memory with several loads in flight per
// thread.  A plain loop `for (i = tid; i < n; i += step) smem[i] = load(i)` compiles (nvcc,
// sm_90, 4x unrolled) into a chain where each shared store waits for its own global load
// before the next load issues: a depthwise tile's 9-14 elements a thread cost ~8 memory
// latencies before the block's barrier (SASS of dw_tile_cl_kernel, session 7).  Here a
// thread issues U loads into registers, then stores them: one latency per U elements.
// No ATen: the kernel headers that use it also compile on the host (tests/native).
#pragma once

namespace convrnn {

// For i = first, first + step, ... < count: store(i, value(i)), U value() calls (global
// loads) issued before their U stores.
template <int U, typename Value, typename Store>
__device__ __forceinline__ void stage_batched(int first, int count, int step, Value&& value, Store&& store) {
  using V = decltype(value(0));
  for (int base = first; base < count; base += U * step) {
    V v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * step;
      v[u] = i < count ? value(i) : V(0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * step;
      if (i < count) store(i, v[u]);
    }
  }
}

}  // namespace convrnn
