// avg_pool2d arithmetic shared by the CPU and CUDA kernels: window sums and the divisor.
#pragma once

#include "pooling.h"

namespace convrnn {

// The divisor of the window whose first tap is (hstart, wstart): divisor_override when
// given (non-zero), else the product of avg_window_count over both dimensions.
CONVRNN_HD int64_t avg_divisor(int64_t hstart, int64_t wstart, int64_t H, int64_t W, int64_t kh, int64_t kw,
                               int64_t ph, int64_t pw, bool count_include_pad, int64_t divisor_override) {
  if (divisor_override != 0) return divisor_override;
  return avg_window_count(hstart, H, kh, ph, count_include_pad) * avg_window_count(wstart, W, kw, pw, count_include_pad);
}

// Sum over the in-image taps th x tw of the window starting at (hstart, wstart); element
// (ih, iw) is data[(ih*W + iw) * cstride], as in max_window.
template <typename T, typename index_t>
CONVRNN_HD acc_t<T> avg_window_sum(const T* data, index_t W, index_t cstride, index_t hstart, index_t wstart, Taps th,
                                   Taps tw) {
  acc_t<T> sum = 0;
  for (index_t t = th.lo; t < th.hi; ++t) {
    const index_t row = (hstart + t) * W + wstart;
    for (index_t u = tw.lo; u < tw.hi; ++u) sum += static_cast<acc_t<T>>(data[(row + u) * cstride]);
  }
  return sum;
}

struct AvgOpts {
  bool count_include_pad;
  int64_t divisor_override;  // 0: none
};

CONVRNN_HD int64_t divisor_at(const Pool2d& g, const AvgOpts& o, int64_t hstart, int64_t wstart) {
  return avg_divisor(hstart, wstart, g.H, g.W, g.kh, g.kw, g.ph, g.pw, o.count_include_pad, o.divisor_override);
}

// Host-side check of the avg-only options.
inline AvgOpts avg_opts(const char* op, bool count_include_pad, std::optional<int64_t> divisor_override) {
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0, "convrnn.", op,
              ": divisor_override must be non-zero (or None), but got 0");
  return {count_include_pad, divisor_override.value_or(0)};
}

// The backward's gradient share of every tap of the window of output (oh, ow).
template <typename A>
CONVRNN_HD A avg_grad_share(A grad_out, int64_t divisor) {
  return grad_out / static_cast<A>(divisor);
}

}  // namespace convrnn
