// The switch of the pooling ops' streamed stores (cpu/pool_loops.h, streams).
#include <torch/library.h>

#include <atomic>
#include <cstdint>

#include "cpu/pool_loops.h"
#include "switches.h"

namespace convrnn {
namespace {

std::atomic<int64_t> streamed_runs{0};  // calls that streamed their output

}  // namespace

std::atomic<int>& streamed_mode() {
  static std::atomic<int> mode{env_mode("CONVRNN_POOL2D_STREAMED", 1)};
  return mode;
}

void note_streamed() {
  streamed_runs.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace convrnn

TORCH_LIBRARY_FRAGMENT(convrnn, m) {
  // mode -1 asks, 0 off, 1 on; returns (mode before, calls that streamed so far)
  m.def("_pool2d_streamed(int mode=-1) -> (int, int)", [](int64_t mode) {
    return convrnn::switch_op("_pool2d_streamed", convrnn::streamed_mode(), convrnn::streamed_runs, mode, 1);
  });
}
