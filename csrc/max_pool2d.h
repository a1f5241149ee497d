// max_pool2d arithmetic shared by the CPU and CUDA kernels: the scan of one window, and the
// argmax the forward saves for the backward.
//
// The saved argmax of a window is its tap number t*kw + u (row-major), one byte per output
// when the window has fewer than 255 taps (int32 otherwise), and no_tap() for a window with
// no in-image tap.  The backward reads it instead of the input: for the 2x2/2 VGG pool that
// is 1 byte per output against 16 bytes of input.
#pragma once

#include "pooling.h"

namespace convrnn {

template <typename tap_t>
CONVRNN_HD tap_t no_tap() {
  return static_cast<tap_t>(-1);
}

inline bool byte_taps(const Pool2d& g) {
  return g.kh * g.kw < 255;
}

// Calls f with a zero of the saved-argmax type for this window size.
template <typename F>
void with_tap_type(const Pool2d& g, F&& f) {
  if (byte_taps(g)) {
    f(uint8_t(0));
  } else {
    f(int32_t(0));
  }
}

// Max and tap-number argmax of the window whose first tap is (hstart, wstart), over taps
// th x tw that lie inside the image.  Element (ih, iw) of the plane is
// data[(ih*W + iw) * cstride] (cstride = 1 for NCHW, C for channels_last).  Taps are
// scanned in row-major order with max_takes, so ties keep the first maximum, a NaN wins and
// the last NaN is the argmax, and an all -inf (or empty) window returns its first tap
// (th.lo, tw.lo): torch's rules.
template <typename T, typename index_t>
CONVRNN_HD void max_window(const T* data, index_t W, index_t cstride, index_t hstart, index_t wstart, Taps th,
                           Taps tw, index_t kw, index_t dh, index_t dw, acc_t<T>& best, index_t& tap) {
  using A = acc_t<T>;
  best = -static_cast<A>(INFINITY);
  tap = static_cast<index_t>(th.lo) * kw + static_cast<index_t>(tw.lo);
  for (index_t t = th.lo; t < th.hi; ++t) {
    const index_t row = (hstart + t * dh) * W + wstart;
    for (index_t u = tw.lo; u < tw.hi; ++u) {
      const A v = static_cast<A>(data[(row + u * dw) * cstride]);
      if (max_takes(v, best)) {
        best = v;
        tap = t * kw + u;
      }
    }
  }
}

// torch's flat index ih*W + iw of tap number `tap` of the window starting at (hstart, wstart).
template <typename index_t>
CONVRNN_HD index_t tap_index(index_t tap, index_t hstart, index_t wstart, index_t kw, index_t dh, index_t dw,
                             index_t W) {
  const index_t t = tap / kw;
  return (hstart + t * dh) * W + wstart + (tap - t * kw) * dw;
}

inline at::ScalarType argmax_dtype(const Pool2d& g) {
  return byte_taps(g) ? at::kByte : at::kInt;
}

// The forward's argmax output: pooled-size in the output's format when wanted, else empty.
at::Tensor empty_argmax(const Pool2d& g, const at::TensorOptions& opts, bool wanted);

// The backward's checks (pool2d_backward_geometry's, and the saved argmax) and geometry.
Pool2d max_pool2d_backward_geometry(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& argmax,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool ceil_mode);

}  // namespace convrnn
