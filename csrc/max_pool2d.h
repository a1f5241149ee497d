// max_pool2d arithmetic shared by the CPU and CUDA kernels: the scan of one window.
#pragma once

#include "pooling.h"

namespace convrnn {

// Max and argmax of the window whose first tap is (hstart, wstart), over taps th x tw that
// lie inside the image.  Element (ih, iw) of the plane is data[(ih*W + iw) * cstride]
// (cstride = 1 for NCHW, C for channels_last).  Taps are scanned in row-major order with
// max_takes, so ties keep the first maximum, a NaN wins and the last NaN is the argmax, and
// an all -inf window returns its first in-image tap: torch's rules.  The argmax is the flat
// index ih*W + iw, torch's index convention.
template <typename T, typename index_t>
CONVRNN_HD void max_window(const T* data, index_t W, index_t cstride, index_t hstart, index_t wstart, Taps th,
                           Taps tw, index_t dh, index_t dw, acc_t<T>& best, index_t& arg) {
  using A = acc_t<T>;
  best = -static_cast<A>(INFINITY);
  arg = (hstart + static_cast<index_t>(th.lo) * dh) * W + wstart + static_cast<index_t>(tw.lo) * dw;
  for (index_t t = th.lo; t < th.hi; ++t) {
    const index_t row = (hstart + t * dh) * W + wstart;
    for (index_t u = tw.lo; u < tw.hi; ++u) {
      const index_t idx = row + u * dw;
      const A v = static_cast<A>(data[idx * cstride]);
      if (max_takes(v, best)) {
        best = v;
        arg = idx;
      }
    }
  }
}

// Windows that tile the input exactly (stride == kernel, no padding or dilation, sizes
// divisible): every input element lies in exactly one window, so the backward can write
// each window whole (gradient at the argmax, zeros elsewhere) instead of zero-fill + scatter.
inline bool tiles_exactly(const Pool2d& g) {
  return g.kh == g.sh && g.kw == g.sw && g.ph == 0 && g.pw == 0 && g.dh == 1 && g.dw == 1 && g.H == g.OH * g.kh &&
         g.W == g.OW * g.kw;
}

}  // namespace convrnn
