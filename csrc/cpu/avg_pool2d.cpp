// CPU avg_pool2d forward and backward.
//
// The work split is max_pool2d's (cpu/max_pool2d.cpp): NCHW forward runs one task per output
// row, with the interior outputs in a vectorised loop over ow and the border outputs through
// the scalar window sum shared with CUDA (avg_window_sum); channels_last runs one task per
// output pixel over contiguous channels (float outputs of 16 MiB or more with non-temporal
// stores: forward_pixels_streamed).  The backward scatters grad/divisor over each
// window in a fixed serial order per plane (NCHW) or per (image, channel block)
// (channels_last): deterministic, no atomics.  Sums accumulate in float for half types.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "avg_pool2d.h"
#include "avx512.h"
#include "cpu/fresh_memory.h"
#include "cpu/pool_loops.h"

namespace convrnn {
namespace {

using at::Tensor;

// Window sums of n interior outputs of one row (every column tap inside the image).
template <typename T, int SW>
CONVRNN_CPU_CLONES void avg_row_interior(const T* __restrict plane, int64_t W, int64_t hstart, Taps th, int64_t c0,
                                         int64_t n, int64_t sw_runtime, int64_t kw, acc_t<T>* __restrict sum) {
  const int64_t sw = SW > 0 ? SW : sw_runtime;
  for (int64_t i = 0; i < n; ++i) sum[i] = 0;
  for (int64_t t = th.lo; t < th.hi; ++t) {
    for (int64_t u = 0; u < kw; ++u) {
      const T* __restrict src = plane + (hstart + t) * W + c0 + u;
      for (int64_t i = 0; i < n; ++i) sum[i] += static_cast<acc_t<T>>(src[i * sw]);
    }
  }
}

// The backward's mirror: adds share[i] to every tap of n interior windows of one row.
template <typename A, int SW>
CONVRNN_CPU_CLONES void avg_row_scatter(A* __restrict acc, int64_t W, int64_t hstart, Taps th, int64_t c0, int64_t n,
                                        int64_t sw_runtime, int64_t kw, const A* __restrict share) {
  const int64_t sw = SW > 0 ? SW : sw_runtime;
  for (int64_t t = th.lo; t < th.hi; ++t) {
    for (int64_t u = 0; u < kw; ++u) {
      A* __restrict dst = acc + (hstart + t) * W + c0 + u;
      for (int64_t i = 0; i < n; ++i) dst[i * sw] += share[i];
    }
  }
}

template <typename T>
void forward_nchw(const T* x, T* y, const Pool2d& g, const AvgOpts& o) {
  using A = acc_t<T>;
  const Taps in = interior_outputs(g.W, g.OW, g.kw, g.sw, g.pw, 1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.OW * g.kh * g.kw));
  with_col_stride(g.sw, [&](auto sw_c) {
    constexpr int SW = decltype(sw_c)::value;
    at::parallel_for(0, g.N * g.C * g.OH, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> sum(g.OW);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t plane = r / g.OH, hstart = (r % g.OH) * g.sh - g.ph;
        const T* xp = x + plane * g.H * g.W;
        const Taps th = window_taps<int64_t>(hstart, g.H, g.kh, 1);
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          if (ow == in.lo && in.hi > in.lo) {
            avg_row_interior<T, SW>(xp, g.W, hstart, th, in.lo * g.sw - g.pw, in.hi - in.lo, g.sw, g.kw, &sum[ow]);
            ow = in.hi - 1;
            continue;
          }
          const int64_t wstart = ow * g.sw - g.pw;
          sum[ow] = avg_window_sum<T, int64_t>(xp, g.W, 1, hstart, wstart, th, window_taps<int64_t>(wstart, g.W, g.kw, 1));
        }
        T* yr = y + r * g.OW;
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          yr[ow] = static_cast<T>(sum[ow] / static_cast<A>(divisor_at(g, o, hstart, ow * g.sw - g.pw)));
        }
      }
    });
  });
}

template <typename T>
void backward_nchw(const T* go, T* gi, const Pool2d& g, const AvgOpts& o) {
  using A = acc_t<T>;
  constexpr bool direct = std::is_same<T, A>::value;
  const int64_t HW = g.H * g.W;
  const Taps in = interior_outputs(g.W, g.OW, g.kw, g.sw, g.pw, 1);
  with_col_stride(g.sw, [&](auto sw_c) {
    constexpr int SW = decltype(sw_c)::value;
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> share(g.OW), local(direct ? 0 : HW);
      for (int64_t p = begin; p < end; ++p) {
        A* acc = direct ? reinterpret_cast<A*>(gi + p * HW) : local.data();
        std::fill(acc, acc + HW, A(0));
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          const int64_t hstart = oh * g.sh - g.ph;
          const Taps th = window_taps<int64_t>(hstart, g.H, g.kh, 1);
          const T* gr = go + (p * g.OH + oh) * g.OW;
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            share[ow] = avg_grad_share(static_cast<A>(gr[ow]), divisor_at(g, o, hstart, ow * g.sw - g.pw));
          }
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            if (ow == in.lo && in.hi > in.lo) {
              avg_row_scatter<A, SW>(acc, g.W, hstart, th, in.lo * g.sw - g.pw, in.hi - in.lo, g.sw, g.kw, &share[ow]);
              ow = in.hi - 1;
              continue;
            }
            const int64_t wstart = ow * g.sw - g.pw;
            const Taps tw = window_taps<int64_t>(wstart, g.W, g.kw, 1);
            for (int64_t t = th.lo; t < th.hi; ++t) {
              for (int64_t u = tw.lo; u < tw.hi; ++u) acc[(hstart + t) * g.W + wstart + u] += share[ow];
            }
          }
        }
        if (!direct) {
          for (int64_t i = 0; i < HW; ++i) gi[p * HW + i] = static_cast<T>(acc[i]);
        }
      }
    });
  });
}

// channels_last: y[c] = (sum over the window of one output pixel) / div, for all C channels,
// in blocks of kChannelBlock whose sums stay in registers.
template <typename T>
CONVRNN_CPU_CLONES void avg_pixel_channels(const T* __restrict img, int64_t W, int64_t C, int64_t hstart, Taps th,
                                           int64_t wstart, Taps tw, int64_t div, T* __restrict y) {
  using A = acc_t<T>;
  A sum[kChannelBlock];
  for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
    const int64_t m = std::min(kChannelBlock, C - c0);
    for (int64_t c = 0; c < m; ++c) sum[c] = 0;
    for (int64_t t = th.lo; t < th.hi; ++t) {
      for (int64_t u = tw.lo; u < tw.hi; ++u) {
        const T* __restrict src = img + ((hstart + t) * W + wstart + u) * C + c0;
        for (int64_t c = 0; c < m; ++c) sum[c] += static_cast<A>(src[c]);
      }
    }
    for (int64_t c = 0; c < m; ++c) y[c0 + c] = static_cast<T>(sum[c] / static_cast<A>(div));
  }
}

#if CONVRNN_HAVE_AVX512
// Output pixels [begin, end) of a float channels_last forward (C a multiple of 16, y 64-byte
// aligned) with non-temporal stores: the same sums in the same order as avg_pixel_channels (so
// the same bits), written past the caches.  For outputs too large to stay cached for their
// reader, where a normal store first reads each line for ownership: VGG's 2x2/2 layer reads
// 102.8 MB and writes 25.7 MB, and the line reads add 25.7 MB more.
CONVRNN_AVX512 void forward_pixels_streamed(const float* x, float* y, const Pool2d& g, const AvgOpts& o,
                                            int64_t begin, int64_t end) {
  const int64_t C = g.C;
  for (int64_t q = begin; q < end; ++q) {
    const auto [n, hstart, wstart] = pixel_window(g, q);
    const Taps th = window_taps<int64_t>(hstart, g.H, g.kh, 1), tw = window_taps<int64_t>(wstart, g.W, g.kw, 1);
    const __m512 div = _mm512_set1_ps(static_cast<float>(divisor_at(g, o, hstart, wstart)));
    const float* img = x + n * g.H * g.W * C;
    float* out = y + q * C;
    int64_t c0 = 0;
    for (; c0 + 64 <= C; c0 += 64) {
      __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t t = th.lo; t < th.hi; ++t) {
        for (int64_t u = tw.lo; u < tw.hi; ++u) {
          const float* src = img + ((hstart + t) * g.W + wstart + u) * C + c0;
          s0 = _mm512_add_ps(s0, _mm512_loadu_ps(src));
          s1 = _mm512_add_ps(s1, _mm512_loadu_ps(src + 16));
          s2 = _mm512_add_ps(s2, _mm512_loadu_ps(src + 32));
          s3 = _mm512_add_ps(s3, _mm512_loadu_ps(src + 48));
        }
      }
      _mm512_stream_ps(out + c0, _mm512_div_ps(s0, div));
      _mm512_stream_ps(out + c0 + 16, _mm512_div_ps(s1, div));
      _mm512_stream_ps(out + c0 + 32, _mm512_div_ps(s2, div));
      _mm512_stream_ps(out + c0 + 48, _mm512_div_ps(s3, div));
    }
    for (; c0 < C; c0 += 16) {
      __m512 s0 = _mm512_setzero_ps();
      for (int64_t t = th.lo; t < th.hi; ++t) {
        for (int64_t u = tw.lo; u < tw.hi; ++u) {
          s0 = _mm512_add_ps(s0, _mm512_loadu_ps(img + ((hstart + t) * g.W + wstart + u) * C + c0));
        }
      }
      _mm512_stream_ps(out + c0, _mm512_div_ps(s0, div));
    }
  }
  _mm_sfence();  // the streamed lines are visible before the task ends
}
#endif

template <typename T>
void forward_channels_last(const T* x, T* y, const Pool2d& g, const AvgOpts& o) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.C * g.kh * g.kw));
#if CONVRNN_HAVE_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (streams(y, g.C, g.N * g.OH * g.OW * g.C)) {
      note_streamed();
      at::parallel_for(0, g.N * g.OH * g.OW, grain,
                       [&](int64_t begin, int64_t end) { forward_pixels_streamed(x, y, g, o, begin, end); });
      return;
    }
  }
#endif
  at::parallel_for(0, g.N * g.OH * g.OW, grain, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const auto [n, hstart, wstart] = pixel_window(g, q);
      avg_pixel_channels<T>(x + n * g.H * g.W * g.C, g.W, g.C, hstart, window_taps<int64_t>(hstart, g.H, g.kh, 1),
                            wstart, window_taps<int64_t>(wstart, g.W, g.kw, 1), divisor_at(g, o, hstart, wstart),
                            y + q * g.C);
    }
  });
}

// channels_last: spreads grad/divisor of one output pixel over the taps th x tw of its window
// for channels [0, nc), adding into (ADD) or writing (tiled windows) dst, whose pixels are
// `stride` elements apart.
template <typename T, typename D, bool ADD>
CONVRNN_CPU_CLONES void spread_pixel_channels(const T* __restrict go, D* __restrict dst, int64_t W, int64_t stride,
                                              int64_t nc, int64_t hstart, Taps th, int64_t wstart, Taps tw,
                                              int64_t div) {
  using A = acc_t<T>;
  A share[kChannelBlock];
  for (int64_t c0 = 0; c0 < nc; c0 += kChannelBlock) {
    const int64_t m = std::min(kChannelBlock, nc - c0);
    for (int64_t c = 0; c < m; ++c) share[c] = avg_grad_share(static_cast<A>(go[c0 + c]), div);
    for (int64_t t = th.lo; t < th.hi; ++t) {
      for (int64_t u = tw.lo; u < tw.hi; ++u) {
        D* __restrict d = dst + ((hstart + t) * W + wstart + u) * stride + c0;
        for (int64_t c = 0; c < m; ++c) {
          if (ADD) {
            d[c] += static_cast<D>(share[c]);
          } else {
            d[c] = static_cast<D>(share[c]);
          }
        }
      }
    }
  }
}

#if CONVRNN_HAVE_AVX512
// Output pixels [begin, end) of a float channels_last backward over tiled windows (C a multiple
// of 16, gi 64-byte aligned): spread_pixel_channels's shares (the same bits), each written to the
// pixel's whole window with non-temporal stores.
CONVRNN_AVX512 void spread_pixels_streamed(const float* go, float* gi, const Pool2d& g, const AvgOpts& o,
                                           int64_t begin, int64_t end) {
  const int64_t C = g.C;
  for (int64_t q = begin; q < end; ++q) {
    const auto [n, hstart, wstart] = pixel_window(g, q);  // tiled: no padding
    const __m512 div = _mm512_set1_ps(static_cast<float>(divisor_at(g, o, hstart, wstart)));
    float* img = gi + n * g.H * g.W * C;
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const __m512 share = _mm512_div_ps(_mm512_loadu_ps(go + q * C + c0), div);
      for (int64_t t = 0; t < g.kh; ++t) {
        for (int64_t u = 0; u < g.kw; ++u) _mm512_stream_ps(img + ((hstart + t) * g.W + wstart + u) * C + c0, share);
      }
    }
  }
  _mm_sfence();
}
#endif

template <typename T>
void backward_channels_last(const T* go, T* gi, const Pool2d& g, const AvgOpts& o) {
  using A = acc_t<T>;
  constexpr bool direct = std::is_same<T, A>::value;
  const int64_t HW = g.H * g.W;
#if CONVRNN_HAVE_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (tiles_exactly(g) && streams(gi, g.C, g.N * HW * g.C)) {
      note_streamed();
      at::parallel_for(0, g.N * g.OH * g.OW, 64,
                       [&](int64_t begin, int64_t end) { spread_pixels_streamed(go, gi, g, o, begin, end); });
      return;
    }
  }
#endif
  if (tiles_exactly(g)) {  // each output pixel writes its own window, all channels
    at::parallel_for(0, g.N * g.OH * g.OW, 64, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const auto [n, hstart, wstart] = pixel_window(g, q);  // tiled: no padding
        spread_pixel_channels<T, T, false>(go + q * g.C, gi + n * HW * g.C, g.W, g.C, g.C, hstart, Taps{0, g.kh},
                                           wstart, Taps{0, g.kw}, divisor_at(g, o, hstart, wstart));
      }
    });
    return;
  }
  const int64_t block = std::min<int64_t>(g.C, kChannelBlock), blocks = (g.C + block - 1) / block;
  at::parallel_for(0, g.N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> local(direct ? 0 : HW * block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * block, nc = std::min(block, g.C - c0);
      A* acc = direct ? reinterpret_cast<A*>(gi + n * HW * g.C + c0) : local.data();
      const int64_t astride = direct ? g.C : nc;
      for (int64_t pix = 0; pix < HW; ++pix) std::fill(acc + pix * astride, acc + pix * astride + nc, A(0));
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t hstart = oh * g.sh - g.ph;
        const Taps th = window_taps<int64_t>(hstart, g.H, g.kh, 1);
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t wstart = ow * g.sw - g.pw;
          spread_pixel_channels<T, A, true>(go + ((n * g.OH + oh) * g.OW + ow) * g.C + c0, acc, g.W, astride, nc,
                                            hstart, th, wstart, window_taps<int64_t>(wstart, g.W, g.kw, 1),
                                            divisor_at(g, o, hstart, wstart));
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

Tensor avg_pool2d_cpu(const Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                      std::optional<int64_t> divisor_override) {
  const Pool2d g = pool2d_geometry("avg_pool2d", input, kernel_size, stride, padding, {1, 1}, ceil_mode);
  const AvgOpts o = avg_opts("avg_pool2d", count_include_pad, divisor_override);
  const Tensor x = input.contiguous(kernel_format(g));
  Tensor out = pool2d_empty(g, g.output_sizes(), x.options());
  if (out.numel() == 0) return out;
  populate_pages(out);
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.avg_pool2d", [&] {
    if (is_channels_last(g)) {
      forward_channels_last<scalar_t>(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, o);
    } else {
      forward_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, o);
    }
  });
  return out;
}

Tensor avg_pool2d_backward_cpu(const Tensor& grad_output, const Tensor& input, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                               bool count_include_pad, std::optional<int64_t> divisor_override) {
  const Pool2d g =
      pool2d_backward_geometry("avg_pool2d_backward", grad_output, input, kernel_size, stride, padding, {1, 1}, ceil_mode);
  const AvgOpts o = avg_opts("avg_pool2d_backward", count_include_pad, divisor_override);
  const Tensor go = grad_output.contiguous(kernel_format(g));
  Tensor grad_input = empty_populated(input.sizes(), input.options().memory_format(kernel_format(g)));
  if (grad_input.numel() == 0) return grad_input;
  CONVRNN_DISPATCH_FLOATING(go.scalar_type(), "convrnn.avg_pool2d_backward", [&] {
    if (is_channels_last(g)) {
      backward_channels_last<scalar_t>(go.const_data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(), g, o);
    } else {
      backward_nchw<scalar_t>(go.const_data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(), g, o);
    }
  });
  return grad_input;
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CPU, m) {
  m.impl("avg_pool2d", &convrnn::avg_pool2d_cpu);
  m.impl("avg_pool2d_backward", &convrnn::avg_pool2d_backward_cpu);
}
