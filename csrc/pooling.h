// Pooling arithmetic shared by the CPU and CUDA kernels of max_pool2d and avg_pool2d:
// output sizes (torch's ceil_mode rule), the taps of a window that fall inside the image,
// the average divisor, and the geometry that the host wrappers validate once.
#pragma once

#include "common.h"

namespace convrnn {

// Output length of one pooled dimension, as torch's pooling_output_shape:
// floor-or-ceil((in + 2p - d(k-1) - 1) / s) + 1, and in ceil mode the last window must start
// inside the input or its left padding.
CONVRNN_HD int64_t pool_output_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  int64_t out = div_floor<int64_t>(in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0), s) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) {
    --out;
  }
  return out;
}

// Window of output position o along one dimension starts at o*s - p; its taps are
// start + t*d for t in [0, k).  Taps [lo, hi) are those inside [0, in).
struct Taps {
  int64_t lo, hi;
};

template <typename I>
CONVRNN_HD Taps window_taps(I start, I in, I k, I d) {
  I lo, hi;
  if (d == 1) {  // no divisions: the common case, and per pixel in channels_last kernels
    lo = start < 0 ? -start : 0;
    hi = in - start;
  } else {
    lo = start < 0 ? div_ceil<I>(-start, d) : 0;
    hi = div_ceil<I>(in - start, d);
  }
  hi = hi < k ? hi : k;
  return {lo, hi < lo ? lo : hi};
}

// A window can hold no in-image tap at all (a dilated kernel straddling a small image):
// its max is -inf, its index points outside the image (as torch's), and it passes no
// gradient back.
CONVRNN_HD bool has_taps(Taps th, Taps tw) {
  return th.hi > th.lo && tw.hi > tw.lo;
}

// Output positions [lo, hi) along one dimension whose windows (extent = d(k-1) + 1)
// contain input position i: the gather form of the backward, as torch's CUDA kernels.
template <typename I>
CONVRNN_HD Taps covering_outputs(I i, I p, I extent, I s, I out) {
  const I lo = (i + p < extent) ? I(0) : (i + p - extent) / s + 1;
  const I hi = (i + p) / s + 1;
  return {lo, hi < out ? hi : out};
}

// Averaging window along one dimension (no dilation): torch counts the taps inside the
// padded input (count_include_pad) or inside the input itself.
CONVRNN_HD int64_t avg_window_count(int64_t start, int64_t in, int64_t k, int64_t p, bool include_pad) {
  int64_t end = start + k;
  if (include_pad) {
    int64_t e = end < in + p ? end : in + p;
    return e - start;
  }
  int64_t s = start > 0 ? start : 0;
  int64_t e = end < in ? end : in;
  return e - s;
}

// Output positions [lo, hi) along one dimension whose windows are entirely inside the input,
// so their loops need no bounds checks (the CPU kernels vectorise over them).
CONVRNN_HD Taps interior_outputs(int64_t in, int64_t out, int64_t k, int64_t s, int64_t p, int64_t d) {
  int64_t lo = div_ceil<int64_t>(p, s);
  int64_t hi = div_floor<int64_t>(in - 1 + p - d * (k - 1), s) + 1;
  lo = lo < out ? lo : out;
  hi = hi < out ? hi : out;
  return {lo, hi < lo ? lo : hi};
}

struct Pool2d {
  int64_t N, C, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  bool batched;
  at::MemoryFormat format;

  std::vector<int64_t> output_sizes() const {
    return batched ? std::vector<int64_t>{N, C, OH, OW} : std::vector<int64_t>{C, OH, OW};
  }
};

// The layout the kernels run in: the input's suggested memory format for 4-D input,
// contiguous (C, H, W) for unbatched input.
inline at::MemoryFormat kernel_format(const Pool2d& g) {
  return g.batched ? g.format : at::MemoryFormat::Contiguous;
}

inline bool is_channels_last(const Pool2d& g) {
  return kernel_format(g) == at::MemoryFormat::ChannelsLast;
}

// Windows that tile the input exactly (stride == kernel, no padding or dilation, sizes
// divisible): every input element lies in exactly one window, so a backward can write each
// window whole instead of zero-filling grad_input and scattering into it.
inline bool tiles_exactly(const Pool2d& g) {
  return g.kh == g.sh && g.kw == g.sw && g.ph == 0 && g.pw == 0 && g.dh == 1 && g.dw == 1 && g.H == g.OH * g.kh &&
         g.W == g.OW * g.kw;
}

// Validates input and arguments for pooling op `op` (messages name the op and the argument)
// and returns the geometry.  Padding is bounded by half the kernel, as torch does.
Pool2d pool2d_geometry(const char* op, const at::Tensor& input, at::IntArrayRef kernel_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       bool ceil_mode);

// The backward's checks: grad_output matches the forward's output for `input`.
Pool2d pool2d_backward_geometry(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, bool ceil_mode);

// Allocates a pooled output/gradient for the geometry in the input's memory format.
at::Tensor pool2d_empty(const Pool2d& g, std::vector<int64_t> sizes, const at::TensorOptions& opts);

}  // namespace convrnn
