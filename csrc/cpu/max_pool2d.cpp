// CPU max_pool2d forward and backward.
//
// NCHW: the forward is one task per output row (plane, oh).  Outputs whose windows lie
// inside the image ("interior", most of them) run max_row_interior: a branch-free loop over
// ow that the compiler vectorises, templated on the column stride so that stride-2 loads
// become shuffles rather than gathers.  The few border outputs use the scalar window scan
// that the CUDA kernel also runs (max_window).
// channels_last: one task per output pixel; the loops run over the contiguous channels.
// Backward saves nothing but the input: it recomputes each window's argmax with the same
// functions and adds grad_output there, in a fixed serial order per plane (NCHW) or per
// (image, channel block) (channels_last), so it is deterministic without atomics.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu/pool_loops.h"
#include "max_pool2d.h"

namespace convrnn {
namespace {

using at::Tensor;

// Output columns [0, n) of one row, all taps inside the image: best[i] / arg[i] become the
// max / argmax over the window starting at row `hstart`, column c0 + i*sw.  Taps are
// visited in row-major order and combined with max_takes, so the result equals max_window.
template <typename T, int SW, bool WITH_ARG>
CONVRNN_CPU_CLONES void max_row_interior(const T* __restrict plane, int64_t W, int64_t hstart, Taps th, int64_t dh,
                                         int64_t c0, int64_t n, int64_t sw_runtime, int64_t kw, int64_t dw,
                                         acc_t<T>* __restrict best, int64_t* __restrict arg) {
  using A = acc_t<T>;
  const int64_t sw = SW > 0 ? SW : sw_runtime;
  const int64_t first = (hstart + th.lo * dh) * W + c0;
  for (int64_t i = 0; i < n; ++i) {
    best[i] = -static_cast<A>(INFINITY);
    if (WITH_ARG) arg[i] = first + i * sw;
  }
  for (int64_t t = th.lo; t < th.hi; ++t) {
    for (int64_t u = 0; u < kw; ++u) {
      const int64_t base = (hstart + t * dh) * W + c0 + u * dw;
      const T* __restrict src = plane + base;
      for (int64_t i = 0; i < n; ++i) {
        const A v = static_cast<A>(src[i * sw]);
        const bool take = v > best[i] || v != v;
        best[i] = take ? v : best[i];
        if (WITH_ARG) arg[i] = take ? base + i * sw : arg[i];
      }
    }
  }
}

// Max (and argmax) over every output column of output row oh of one plane.
template <typename T, int SW, bool WITH_ARG>
void max_row(const T* plane, const Pool2d& g, int64_t oh, acc_t<T>* best, int64_t* arg) {
  const int64_t hstart = oh * g.sh - g.ph;
  const Taps th = window_taps<int64_t>(hstart, g.H, g.kh, g.dh);
  const Taps in = interior_outputs(g.W, g.OW, g.kw, g.sw, g.pw, g.dw);
  auto border = [&](int64_t ow) {
    const int64_t wstart = ow * g.sw - g.pw;
    int64_t a;
    max_window<T, int64_t>(plane, g.W, 1, hstart, wstart, th, window_taps<int64_t>(wstart, g.W, g.kw, g.dw), g.dh, g.dw,
                           best[ow], a);
    if (WITH_ARG) arg[ow] = a;
  };
  for (int64_t ow = 0; ow < in.lo; ++ow) border(ow);
  if (in.hi > in.lo) {
    max_row_interior<T, SW, WITH_ARG>(plane, g.W, hstart, th, g.dh, in.lo * g.sw - g.pw, in.hi - in.lo, g.sw, g.kw,
                                      g.dw, best + in.lo, WITH_ARG ? arg + in.lo : nullptr);
  }
  for (int64_t ow = in.hi; ow < g.OW; ++ow) border(ow);
}

template <typename T>
void forward_nchw(const T* x, T* y, int64_t* idx, const Pool2d& g) {
  using A = acc_t<T>;
  const int64_t rows = g.N * g.C * g.OH;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.OW * g.kh * g.kw));
  with_col_stride(g.sw, [&](auto sw_c) {
    constexpr int SW = decltype(sw_c)::value;
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> best(g.OW);
      std::vector<int64_t> arg(idx ? g.OW : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t plane = r / g.OH, oh = r % g.OH;
        const T* xp = x + plane * g.H * g.W;
        if (idx) {
          max_row<T, SW, true>(xp, g, oh, best.data(), arg.data());
          std::copy(arg.begin(), arg.end(), idx + r * g.OW);
        } else {
          max_row<T, SW, false>(xp, g, oh, best.data(), nullptr);
        }
        T* yr = y + r * g.OW;
        for (int64_t i = 0; i < g.OW; ++i) yr[i] = static_cast<T>(best[i]);
      }
    });
  });
}

// Tiled windows (tiles_exactly): output row oh writes its kh input rows whole.
template <typename T, int SW>
CONVRNN_CPU_CLONES void tiled_row_backward(const T* __restrict go, const int64_t* __restrict arg, T* __restrict gi,
                                           int64_t W, int64_t oh, int64_t OW, int64_t kh, int64_t sw_runtime) {
  const int64_t sw = SW > 0 ? SW : sw_runtime;  // == kw
  for (int64_t t = 0; t < kh; ++t) {
    for (int64_t u = 0; u < sw; ++u) {
      const int64_t base = (oh * kh + t) * W + u;
      T* __restrict dst = gi + base;
      for (int64_t i = 0; i < OW; ++i) dst[i * sw] = arg[i] == base + i * sw ? go[i] : static_cast<T>(0);
    }
  }
}

template <typename T>
void backward_nchw(const T* go, const T* x, T* gi, const Pool2d& g) {
  using A = acc_t<T>;
  constexpr bool direct = std::is_same<T, A>::value;
  const int64_t HW = g.H * g.W;
  const bool tiled = tiles_exactly(g);
  std::vector<char> col_has_tap(g.OW);
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    const Taps tw = window_taps<int64_t>(ow * g.sw - g.pw, g.W, g.kw, g.dw);
    col_has_tap[ow] = tw.hi > tw.lo;
  }
  with_col_stride(g.sw, [&](auto sw_c) {
    constexpr int SW = decltype(sw_c)::value;
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> best(g.OW), local(direct || tiled ? 0 : HW);
      std::vector<int64_t> arg(g.OW);
      for (int64_t p = begin; p < end; ++p) {
        const T* gop = go + p * g.OH * g.OW;
        if (tiled) {
          for (int64_t oh = 0; oh < g.OH; ++oh) {
            max_row<T, SW, true>(x + p * HW, g, oh, best.data(), arg.data());
            tiled_row_backward<T, SW>(gop + oh * g.OW, arg.data(), gi + p * HW, g.W, oh, g.OW, g.kh, g.sw);
          }
          continue;
        }
        A* acc = direct ? reinterpret_cast<A*>(gi + p * HW) : local.data();
        std::fill(acc, acc + HW, A(0));
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          const Taps th = window_taps<int64_t>(oh * g.sh - g.ph, g.H, g.kh, g.dh);
          if (th.hi <= th.lo) continue;  // no in-image tap: no gradient (see has_taps)
          max_row<T, SW, true>(x + p * HW, g, oh, best.data(), arg.data());
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            if (col_has_tap[ow]) acc[arg[ow]] += static_cast<A>(gop[oh * g.OW + ow]);
          }
        }
        if (!direct) {
          for (int64_t i = 0; i < HW; ++i) gi[p * HW + i] = static_cast<T>(acc[i]);
        }
      }
    });
  });
}

// channels_last: max (and argmax) over the window of one output pixel for channels [0, nc)
// of an NHWC image; element (ih, iw, c) is img[(ih*W + iw)*C + c].
template <typename T, bool WITH_ARG>
CONVRNN_CPU_CLONES void max_pixel_channels(const T* __restrict img, int64_t W, int64_t C, int64_t nc, int64_t hstart,
                                           Taps th, int64_t dh, int64_t wstart, Taps tw, int64_t dw,
                                           acc_t<T>* __restrict best, int64_t* __restrict arg) {
  using A = acc_t<T>;
  const int64_t first = (hstart + th.lo * dh) * W + wstart + tw.lo * dw;
  for (int64_t c = 0; c < nc; ++c) {
    best[c] = -static_cast<A>(INFINITY);
    if (WITH_ARG) arg[c] = first;
  }
  for (int64_t t = th.lo; t < th.hi; ++t) {
    for (int64_t u = tw.lo; u < tw.hi; ++u) {
      const int64_t pix = (hstart + t * dh) * W + wstart + u * dw;
      const T* __restrict src = img + pix * C;
      for (int64_t c = 0; c < nc; ++c) {
        const A v = static_cast<A>(src[c]);
        const bool take = v > best[c] || v != v;
        best[c] = take ? v : best[c];
        if (WITH_ARG) arg[c] = take ? pix : arg[c];
      }
    }
  }
}

template <typename T>
void forward_channels_last(const T* x, T* y, int64_t* idx, const Pool2d& g) {
  using A = acc_t<T>;
  const int64_t pixels = g.N * g.OH * g.OW;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.C * g.kh * g.kw));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> best(g.C);
    std::vector<int64_t> arg(idx ? g.C : 0);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / (g.OH * g.OW), oh = (q / g.OW) % g.OH, ow = q % g.OW;
      const int64_t hstart = oh * g.sh - g.ph, wstart = ow * g.sw - g.pw;
      const Taps th = window_taps<int64_t>(hstart, g.H, g.kh, g.dh), tw = window_taps<int64_t>(wstart, g.W, g.kw, g.dw);
      const T* img = x + n * g.H * g.W * g.C;
      if (idx) {
        max_pixel_channels<T, true>(img, g.W, g.C, g.C, hstart, th, g.dh, wstart, tw, g.dw, best.data(), arg.data());
        std::copy(arg.begin(), arg.end(), idx + q * g.C);
      } else {
        max_pixel_channels<T, false>(img, g.W, g.C, g.C, hstart, th, g.dh, wstart, tw, g.dw, best.data(), nullptr);
      }
      for (int64_t c = 0; c < g.C; ++c) y[q * g.C + c] = static_cast<T>(best[c]);
    }
  });
}

template <typename T>
void backward_channels_last(const T* go, const T* x, T* gi, const Pool2d& g) {
  using A = acc_t<T>;
  constexpr bool direct = std::is_same<T, A>::value;
  const int64_t HW = g.H * g.W, block = std::min<int64_t>(g.C, kChannelBlock);
  const int64_t blocks = (g.C + block - 1) / block;
  at::parallel_for(0, g.N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> best(block), local(direct ? 0 : HW * block);
    std::vector<int64_t> arg(block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * block, nc = std::min(block, g.C - c0);
      A* acc = direct ? reinterpret_cast<A*>(gi + n * HW * g.C + c0) : local.data();
      const int64_t astride = direct ? g.C : nc;
      for (int64_t pix = 0; pix < HW; ++pix) std::fill(acc + pix * astride, acc + pix * astride + nc, A(0));
      const T* img = x + n * HW * g.C + c0;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t hstart = oh * g.sh - g.ph;
        const Taps th = window_taps<int64_t>(hstart, g.H, g.kh, g.dh);
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t wstart = ow * g.sw - g.pw;
          const Taps tw = window_taps<int64_t>(wstart, g.W, g.kw, g.dw);
          if (!has_taps(th, tw)) continue;
          max_pixel_channels<T, true>(img, g.W, g.C, nc, hstart, th, g.dh, wstart, tw, g.dw, best.data(), arg.data());
          const T* gop = go + ((n * g.OH + oh) * g.OW + ow) * g.C + c0;
          for (int64_t c = 0; c < nc; ++c) acc[arg[c] * astride + c] += static_cast<A>(gop[c]);
        }
      }
      if (!direct) {
        for (int64_t pix = 0; pix < HW; ++pix) {
          for (int64_t c = 0; c < nc; ++c) gi[(n * HW + pix) * g.C + c0 + c] = static_cast<T>(acc[pix * nc + c]);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> max_pool2d_cpu(const Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode,
                                          bool return_indices) {
  const Pool2d g = pool2d_geometry("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode);
  const Tensor x = input.contiguous(kernel_format(g));
  Tensor out = pool2d_empty(g, g.output_sizes(), x.options());
  Tensor indices = return_indices ? pool2d_empty(g, g.output_sizes(), x.options().dtype(at::kLong))
                                  : at::empty({0}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, indices};
  int64_t* idx = return_indices ? indices.data_ptr<int64_t>() : nullptr;
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.max_pool2d", [&] {
    if (is_channels_last(g)) {
      forward_channels_last<scalar_t>(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx, g);
    } else {
      forward_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx, g);
    }
  });
  return {out, indices};
}

Tensor max_pool2d_backward_cpu(const Tensor& grad_output, const Tensor& input, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               bool ceil_mode) {
  const Pool2d g =
      pool2d_backward_geometry("max_pool2d_backward", grad_output, input, kernel_size, stride, padding, dilation, ceil_mode);
  const auto fmt = kernel_format(g);
  const Tensor x = input.contiguous(fmt);
  const Tensor go = grad_output.contiguous(fmt);
  Tensor grad_input = at::empty(input.sizes(), x.options().memory_format(fmt));
  if (grad_input.numel() == 0) return grad_input;
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.max_pool2d_backward", [&] {
    if (is_channels_last(g)) {
      backward_channels_last<scalar_t>(go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                       grad_input.data_ptr<scalar_t>(), g);
    } else {
      backward_nchw<scalar_t>(go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              grad_input.data_ptr<scalar_t>(), g);
    }
  });
  return grad_input;
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CPU, m) {
  m.impl("max_pool2d", &convrnn::max_pool2d_cpu);
  m.impl("max_pool2d_backward", &convrnn::max_pool2d_backward_cpu);
}
