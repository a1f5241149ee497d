// CPU max_pool2d forward and backward.
//
// NCHW forward: one task per output row (plane, oh).  Outputs whose windows lie inside the
// image ("interior", most of them) run max_row_interior: a branch-free loop over ow that the
// compiler vectorises, templated on the column stride so that stride-2 loads become shuffles
// rather than gathers.  The few border outputs use the scalar window scan that the CUDA
// kernel also runs (max_window).
// channels_last forward: one task per output pixel; the loops run over contiguous channels.
// When autograd needs it, the forward saves each window's argmax as a tap number (one byte,
// see max_pool2d.h).  The backward reads those instead of the input:
//  - windows that tile the input (tiles_exactly) write each window whole, the gradient at
//    the argmax and zeros elsewhere, in parallel over rows / pixels: no zero fill, no scatter;
//  - otherwise grad_input is zeroed and the gradients scattered in a fixed serial order per
//    plane (NCHW) or per (image, channel block) (channels_last): deterministic, no atomics.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "avx512.h"

#include "cpu/fresh_memory.h"
#include "cpu/pool_loops.h"
#include "max_pool2d.h"

namespace convrnn {
namespace {

using at::Tensor;

// Output columns [0, n) of one row, every tap inside the image: best[i] / tap[i] become the
// max / tap-number argmax of the window starting at row hstart, column c0 + i*sw.  Taps are
// visited in row-major order and combined with max_takes, so the result equals max_window.
// (Chunking this loop as tiled_row_backward is kept GCC from using full-width vectors for
// the strided loads: 3x slower.  The long loop with a masked epilogue is what vectorises.)
template <typename T, int SW, bool WITH_TAP>
CONVRNN_CPU_CLONES void max_row_interior(const T* __restrict plane, int64_t W, int64_t hstart, Taps th, int64_t dh,
                                         int64_t c0, int64_t n, int64_t sw_runtime, int64_t kw, int64_t dw,
                                         acc_t<T>* __restrict best, int32_t* __restrict tap) {
  using A = acc_t<T>;
  const int64_t sw = SW > 0 ? SW : sw_runtime;
  for (int64_t i = 0; i < n; ++i) {
    best[i] = -static_cast<A>(INFINITY);
    if (WITH_TAP) tap[i] = static_cast<int32_t>(th.lo * kw);
  }
  for (int64_t t = th.lo; t < th.hi; ++t) {
    for (int64_t u = 0; u < kw; ++u) {
      const T* __restrict src = plane + (hstart + t * dh) * W + c0 + u * dw;
      const int32_t id = static_cast<int32_t>(t * kw + u);
      for (int64_t i = 0; i < n; ++i) {
        const A v = static_cast<A>(src[i * sw]);
        const bool take = v > best[i] || v != v;
        best[i] = take ? v : best[i];
        if (WITH_TAP) tap[i] = take ? id : tap[i];
      }
    }
  }
}

#ifdef CONVRNN_HAVE_AVX512  // cpu/avx512.h
#define CONVRNN_HAVE_AVX512_S2 1
// float, column stride 2, AVX-512: the scan above for 16 outputs at a time, with their max
// and tap in registers across all taps instead of in memory (the long loop above loads and
// stores both for every tap).  The 16 stride-2 columns come from two overlapping loads and
// one two-source permute; the loads end exactly at the last column used, never past it.
// Rows of n >= 16 outputs; the last chunk is shifted back to end at n (chunk_start).  Its
// own target attribute (not target_clones): called only where the CPU has AVX-512.
template <bool WITH_TAP>
__attribute__((target("avx512f"))) void max_row_interior_f32_s2_avx512(const float* plane, int64_t W, int64_t hstart,
                                                                       Taps th, int64_t dh, int64_t c0, int64_t n,
                                                                       int64_t kw, int64_t dw, float* best,
                                                                       int32_t* tap) {
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t s = chunk_start(i0, n);
    __m512 b = _mm512_set1_ps(-INFINITY);
    __m512i tp = _mm512_set1_epi32(static_cast<int32_t>(th.lo * kw));
    for (int64_t t = th.lo; t < th.hi; ++t) {
      const float* row = plane + (hstart + t * dh) * W + c0 + 2 * s;
      for (int64_t u = 0; u < kw; ++u) {
        const __m512 lo = _mm512_loadu_ps(row + u * dw);       // columns 0..15
        const __m512 hi = _mm512_loadu_ps(row + u * dw + 15);  // columns 15..30
        const __m512 v = _mm512_permutex2var_ps(lo, evens, hi);
        const __mmask16 take = _mm512_cmp_ps_mask(v, b, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        b = _mm512_mask_blend_ps(take, b, v);
        if (WITH_TAP) tp = _mm512_mask_blend_epi32(take, tp, _mm512_set1_epi32(static_cast<int32_t>(t * kw + u)));
      }
    }
    _mm512_storeu_ps(best + s, b);
    if (WITH_TAP) _mm512_storeu_si512(tap + s, tp);
  }
}

#endif

// Max (and tap) over every output column of output row oh of one plane.
template <typename T, int SW, bool WITH_TAP>
void max_row(const T* plane, const Pool2d& g, int64_t oh, acc_t<T>* best, int32_t* tap) {
  const int64_t hstart = oh * g.sh - g.ph;
  const Taps th = window_taps<int64_t>(hstart, g.H, g.kh, g.dh);
  const Taps in = interior_outputs(g.W, g.OW, g.kw, g.sw, g.pw, g.dw);
  auto border = [&](int64_t ow) {
    const int64_t wstart = ow * g.sw - g.pw;
    int64_t t;
    max_window<T, int64_t>(plane, g.W, 1, hstart, wstart, th, window_taps<int64_t>(wstart, g.W, g.kw, g.dw), g.kw,
                           g.dh, g.dw, best[ow], t);
    if (WITH_TAP) tap[ow] = static_cast<int32_t>(t);
  };
  for (int64_t ow = 0; ow < in.lo; ++ow) border(ow);
#ifdef CONVRNN_HAVE_AVX512_S2
  if (std::is_same<T, float>::value && SW == 2 && in.hi - in.lo >= kChunk && cpu_has_avx512f()) {
    max_row_interior_f32_s2_avx512<WITH_TAP>(reinterpret_cast<const float*>(plane), g.W, hstart, th, g.dh,
                                             in.lo * g.sw - g.pw, in.hi - in.lo, g.kw, g.dw,
                                             reinterpret_cast<float*>(best) + in.lo, WITH_TAP ? tap + in.lo : nullptr);
  } else
#endif
  if (in.hi > in.lo) {
    max_row_interior<T, SW, WITH_TAP>(plane, g.W, hstart, th, g.dh, in.lo * g.sw - g.pw, in.hi - in.lo, g.sw, g.kw,
                                      g.dw, best + in.lo, WITH_TAP ? tap + in.lo : nullptr);
  }
  for (int64_t ow = in.hi; ow < g.OW; ++ow) border(ow);
}

// out[i] = tap[i] as a tap_t, or no_tap() where the window has no tap (!ok, or !col_ok[i] where
// given).  A loop of its own, with its pointers __restrict: written inline, the uint8 stores
// (which may alias anything) made GCC reload the geometry and the pointers for every element and
// left the loop scalar, 55% of a channels_last forward's samples (the ResNet stem, AVX2).
template <typename tap_t>
CONVRNN_CPU_CLONES void store_taps(const int32_t* __restrict tap, bool ok, const char* __restrict col_ok,
                                   tap_t* __restrict out, int64_t n) {
  const tap_t none = no_tap<tap_t>();
  if (!ok) {
    for (int64_t i = 0; i < n; ++i) out[i] = none;
  } else if (col_ok == nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<tap_t>(tap[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = col_ok[i] ? static_cast<tap_t>(tap[i]) : none;
  }
}

// Which output columns have at least one in-image tap (the same for every row).
std::vector<char> columns_with_taps(const Pool2d& g) {
  std::vector<char> has(g.OW);
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    const Taps tw = window_taps<int64_t>(ow * g.sw - g.pw, g.W, g.kw, g.dw);
    has[ow] = tw.hi > tw.lo;
  }
  return has;
}

template <typename T, typename tap_t>
void forward_nchw(const T* x, T* y, int64_t* idx, tap_t* taps, const Pool2d& g) {
  using A = acc_t<T>;
  const bool with_tap = idx != nullptr || taps != nullptr;
  const std::vector<char> col_ok = columns_with_taps(g);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.OW * g.kh * g.kw));
  with_col_stride(g.sw, [&](auto sw_c) {
    constexpr int SW = decltype(sw_c)::value;
    at::parallel_for(0, g.N * g.C * g.OH, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> best(g.OW);
      std::vector<int32_t> tap(with_tap ? g.OW : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t plane = r / g.OH, oh = r % g.OH, hstart = oh * g.sh - g.ph;
        const T* xp = x + plane * g.H * g.W;
        if (with_tap) {
          max_row<T, SW, true>(xp, g, oh, best.data(), tap.data());
        } else {
          max_row<T, SW, false>(xp, g, oh, best.data(), nullptr);
        }
        for (int64_t i = 0; i < g.OW; ++i) y[r * g.OW + i] = static_cast<T>(best[i]);
        if (taps != nullptr) {
          const Taps th = window_taps<int64_t>(hstart, g.H, g.kh, g.dh);
          store_taps<tap_t>(tap.data(), th.hi > th.lo, col_ok.data(), taps + r * g.OW, g.OW);
        }
        if (idx != nullptr) {
          for (int64_t i = 0; i < g.OW; ++i) {
            idx[r * g.OW + i] = tap_index<int64_t>(tap[i], hstart, i * g.sw - g.pw, g.kw, g.dh, g.dw, g.W);
          }
        }
      }
    });
  });
}

// Tiled windows: output row oh writes its kh input rows whole.  Each iteration stores all
// kw columns of one window, so for kw = 2 the stores interleave into full vectors.
template <typename T, int KW, typename tap_t, int64_t V>
CONVRNN_INLINE void tiled_chunk(const T* __restrict go, const tap_t* __restrict taps, T* __restrict dst, int64_t i0,
                        int64_t len, int32_t id0, int64_t kw) {
  const int64_t m = V > 0 ? V : len;
  for (int64_t j = 0; j < m; ++j) {  // 32-bit tap arithmetic: as many lanes as the floats
    const T g = go[i0 + j];
    const int32_t rel = static_cast<int32_t>(taps[i0 + j]) - id0;
    for (int32_t u = 0; u < static_cast<int32_t>(kw); ++u) dst[(i0 + j) * kw + u] = rel == u ? g : static_cast<T>(0);
  }
}

template <typename T, int KW, typename tap_t>
CONVRNN_CPU_CLONES void tiled_row_backward(const T* __restrict go, const tap_t* __restrict taps, T* __restrict gi,
                                           int64_t W, int64_t oh, int64_t OW, int64_t kh, int64_t kw_runtime) {
  const int64_t kw = KW > 0 ? KW : kw_runtime;
  for (int64_t t = 0; t < kh; ++t) {
    T* __restrict dst = gi + (oh * kh + t) * W;
    const int32_t id0 = static_cast<int32_t>(t * kw);
    if (OW < kChunk) {
      tiled_chunk<T, KW, tap_t, 0>(go, taps, dst, 0, OW, id0, kw);
      continue;
    }
    for (int64_t i0 = 0; i0 < OW; i0 += kChunk) {
      tiled_chunk<T, KW, tap_t, kChunk>(go, taps, dst, chunk_start(i0, OW), kChunk, id0, kw);
    }
  }
}

// Tiled windows, channels_last: an output pixel writes its window (first tap (hstart, wstart),
// pixel_window), all channels.
template <typename T, typename tap_t>
CONVRNN_CPU_CLONES void tiled_pixel_backward(const T* __restrict go, const tap_t* __restrict taps, T* __restrict img,
                                             int64_t W, int64_t C, int64_t hstart, int64_t wstart, int64_t kh,
                                             int64_t kw) {
  for (int64_t t = 0; t < kh; ++t) {
    for (int64_t u = 0; u < kw; ++u) {
      T* __restrict dst = img + ((hstart + t) * W + wstart + u) * C;
      const tap_t id = static_cast<tap_t>(t * kw + u);
      for (int64_t c = 0; c < C; ++c) {
        const T g = go[c];
        dst[c] = taps[c] == id ? g : static_cast<T>(0);
      }
    }
  }
}

// Non-tiled windows: adds grad_output of n outputs to their argmax taps, serially so the
// order is fixed.  Output i's window starts at plane offset first + i*step and its gradient
// goes to acc[(first + i*step + off[tap]) * acc_stride + i*acc_inc]: NCHW walks a row of
// outputs (step = sw), channels_last walks the channels of one pixel (acc_inc = 1).
template <typename T, typename tap_t>
void scatter_add(const T* __restrict go, const tap_t* __restrict taps, acc_t<T>* __restrict acc, int64_t n,
                 int64_t first, int64_t step, int64_t acc_stride, int64_t acc_inc, const int64_t* __restrict off) {
  for (int64_t i = 0; i < n; ++i) {
    const tap_t t = taps[i];
    if (t != no_tap<tap_t>()) {
      acc[(first + i * step + off[t]) * acc_stride + i * acc_inc] += static_cast<acc_t<T>>(go[i]);
    }
  }
}

// Offset of each tap number from its window's first tap, in elements of the plane.
std::vector<int64_t> tap_offsets(const Pool2d& g) {
  std::vector<int64_t> off(g.kh * g.kw);
  for (int64_t t = 0; t < g.kh; ++t) {
    for (int64_t u = 0; u < g.kw; ++u) off[t * g.kw + u] = t * g.dh * g.W + u * g.dw;
  }
  return off;
}

template <typename T, typename tap_t>
void backward_nchw(const T* go, const tap_t* taps, T* gi, const Pool2d& g) {
  using A = acc_t<T>;
  constexpr bool direct = std::is_same<T, A>::value;
  const int64_t HW = g.H * g.W;
  if (tiles_exactly(g)) {
    with_col_stride(g.sw, [&](auto sw_c) {
      constexpr int SW = decltype(sw_c)::value;
      at::parallel_for(0, g.N * g.C * g.OH, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          tiled_row_backward<T, SW, tap_t>(go + r * g.OW, taps + r * g.OW, gi + (r / g.OH) * HW, g.W, r % g.OH, g.OW,
                                           g.kh, g.sw);
        }
      });
    });
    return;
  }
  const std::vector<int64_t> off = tap_offsets(g);
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> local(direct ? 0 : HW);
    for (int64_t p = begin; p < end; ++p) {
      A* acc = direct ? reinterpret_cast<A*>(gi + p * HW) : local.data();
      std::fill(acc, acc + HW, A(0));
      const T* gop = go + p * g.OH * g.OW;
      const tap_t* tp = taps + p * g.OH * g.OW;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        scatter_add<T, tap_t>(gop + oh * g.OW, tp + oh * g.OW, acc, g.OW, (oh * g.sh - g.ph) * g.W - g.pw, g.sw, 1, 0,
                              off.data());
      }
      if (!direct) {
        for (int64_t i = 0; i < HW; ++i) gi[p * HW + i] = static_cast<T>(acc[i]);
      }
    }
  });
}

// channels_last: max (and tap) over the window of one output pixel for channels [0, nc) of
// an NHWC image; element (ih, iw, c) is img[(ih*W + iw)*C + c].
template <typename T, bool WITH_TAP>
CONVRNN_CPU_CLONES void max_pixel_channels(const T* __restrict img, int64_t W, int64_t C, int64_t nc, int64_t hstart,
                                           Taps th, int64_t dh, int64_t wstart, Taps tw, int64_t dw, int64_t kw,
                                           acc_t<T>* __restrict best, int32_t* __restrict tap) {
  using A = acc_t<T>;
  for (int64_t c = 0; c < nc; ++c) {
    best[c] = -static_cast<A>(INFINITY);
    if (WITH_TAP) tap[c] = static_cast<int32_t>(th.lo * kw + tw.lo);
  }
  for (int64_t t = th.lo; t < th.hi; ++t) {
    for (int64_t u = tw.lo; u < tw.hi; ++u) {
      const T* __restrict src = img + ((hstart + t * dh) * W + wstart + u * dw) * C;
      const int32_t id = static_cast<int32_t>(t * kw + u);
      for (int64_t c = 0; c < nc; ++c) {
        const A v = static_cast<A>(src[c]);
        const bool take = v > best[c] || v != v;
        best[c] = take ? v : best[c];
        if (WITH_TAP) tap[c] = take ? id : tap[c];
      }
    }
  }
}

template <typename T, typename tap_t>
void forward_channels_last(const T* x, T* y, int64_t* idx, tap_t* taps, const Pool2d& g) {
  using A = acc_t<T>;
  const bool with_tap = idx != nullptr || taps != nullptr;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.C * g.kh * g.kw));
  at::parallel_for(0, g.N * g.OH * g.OW, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> best(g.C);
    std::vector<int32_t> tap(with_tap ? g.C : 0);
    for (int64_t q = begin; q < end; ++q) {
      const auto [n, hstart, wstart] = pixel_window(g, q);
      const Taps th = window_taps<int64_t>(hstart, g.H, g.kh, g.dh), tw = window_taps<int64_t>(wstart, g.W, g.kw, g.dw);
      const T* img = x + n * g.H * g.W * g.C;
      if (with_tap) {
        max_pixel_channels<T, true>(img, g.W, g.C, g.C, hstart, th, g.dh, wstart, tw, g.dw, g.kw, best.data(),
                                    tap.data());
      } else {
        max_pixel_channels<T, false>(img, g.W, g.C, g.C, hstart, th, g.dh, wstart, tw, g.dw, g.kw, best.data(),
                                     nullptr);
      }
      for (int64_t c = 0; c < g.C; ++c) y[q * g.C + c] = static_cast<T>(best[c]);
      if (taps != nullptr) store_taps<tap_t>(tap.data(), has_taps(th, tw), nullptr, taps + q * g.C, g.C);
      if (idx != nullptr) {
        for (int64_t c = 0; c < g.C; ++c) {
          idx[q * g.C + c] = tap_index<int64_t>(tap[c], hstart, wstart, g.kw, g.dh, g.dw, g.W);
        }
      }
    }
  });
}

#ifdef CONVRNN_HAVE_AVX512
// Output pixels [begin, end) of a float channels_last backward over tiled windows (C a multiple of
// 16, gi 64-byte aligned): tiled_pixel_backward's values (the gradient at the argmax tap, +0
// elsewhere: the same bits), written with non-temporal stores (cpu/pool_loops.h, streams).  (GCC
// 12 warns about the _mm512_undefined inside _mm512_cvtepu8_epi32.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <typename tap_t>
CONVRNN_AVX512 void tiled_pixels_streamed(const float* go, const tap_t* taps, float* gi, const Pool2d& g,
                                          int64_t begin, int64_t end) {
  const int64_t C = g.C;
  for (int64_t q = begin; q < end; ++q) {
    const auto [n, hstart, wstart] = pixel_window(g, q);  // tiled: no padding
    float* img = gi + n * g.H * g.W * C;
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const __m512 grad = _mm512_loadu_ps(go + q * C + c0);
      const tap_t* tp = taps + q * C + c0;
      __m512i tap;
      if constexpr (sizeof(tap_t) == 1) {
        tap = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tp)));
      } else {
        static_assert(sizeof(tap_t) == 4, "taps are uint8 or int32");
        tap = _mm512_loadu_si512(tp);
      }
      for (int64_t t = 0; t < g.kh; ++t) {
        for (int64_t u = 0; u < g.kw; ++u) {
          const __mmask16 at = _mm512_cmpeq_epi32_mask(tap, _mm512_set1_epi32(static_cast<int>(t * g.kw + u)));
          _mm512_stream_ps(img + ((hstart + t) * g.W + wstart + u) * C + c0, _mm512_maskz_mov_ps(at, grad));
        }
      }
    }
  }
  _mm_sfence();
}
#pragma GCC diagnostic pop
#endif

template <typename T, typename tap_t>
void backward_channels_last(const T* go, const tap_t* taps, T* gi, const Pool2d& g) {
  using A = acc_t<T>;
  constexpr bool direct = std::is_same<T, A>::value;
  const int64_t HW = g.H * g.W;
#ifdef CONVRNN_HAVE_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (tiles_exactly(g) && streams(gi, g.C, g.N * HW * g.C)) {
      note_streamed();
      at::parallel_for(0, g.N * g.OH * g.OW, 64,
                       [&](int64_t begin, int64_t end) { tiled_pixels_streamed<tap_t>(go, taps, gi, g, begin, end); });
      return;
    }
  }
#endif
  if (tiles_exactly(g)) {  // each output pixel writes its own window, all channels
    at::parallel_for(0, g.N * g.OH * g.OW, 64, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const auto [n, hstart, wstart] = pixel_window(g, q);  // tiled: no padding
        tiled_pixel_backward<T, tap_t>(go + q * g.C, taps + q * g.C, gi + n * HW * g.C, g.W, g.C, hstart, wstart, g.kh,
                                       g.kw);
      }
    });
    return;
  }
  const std::vector<int64_t> off = tap_offsets(g);
  // whole pixels (all channels) a task where the images alone give every thread several tasks:
  // two tasks writing 64 and 32 of a pixel's 96 channels (AlexNet) share its cache lines
  const bool whole = g.N >= 4 * at::get_num_threads();
  const int64_t block = whole ? g.C : std::min<int64_t>(g.C, kChannelBlock), blocks = (g.C + block - 1) / block;
  at::parallel_for(0, g.N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> local(direct ? 0 : HW * block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * block, nc = std::min(block, g.C - c0);
      A* acc = direct ? reinterpret_cast<A*>(gi + n * HW * g.C + c0) : local.data();
      const int64_t astride = direct ? g.C : nc;
      for (int64_t pix = 0; pix < HW; ++pix) std::fill(acc + pix * astride, acc + pix * astride + nc, A(0));
      for (int64_t q = n * g.OH * g.OW; q < (n + 1) * g.OH * g.OW; ++q) {
        const int64_t first = ((q / g.OW) % g.OH * g.sh - g.ph) * g.W + q % g.OW * g.sw - g.pw;
        scatter_add<T, tap_t>(go + q * g.C + c0, taps + q * g.C + c0, acc, nc, first, 0, astride, 1, off.data());
      }
      if (!direct) {
        for (int64_t pix = 0; pix < HW; ++pix) {
          for (int64_t c = 0; c < nc; ++c) gi[(n * HW + pix) * g.C + c0 + c] = static_cast<T>(acc[pix * nc + c]);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> max_pool2d_cpu(const Tensor& input, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode, bool return_indices,
                                                  bool save_argmax) {
  const Pool2d g = pool2d_geometry("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode);
  const Tensor x = input.contiguous(kernel_format(g));
  Tensor out = pool2d_empty(g, g.output_sizes(), x.options());
  Tensor indices = return_indices ? pool2d_empty(g, g.output_sizes(), x.options().dtype(at::kLong))
                                  : at::empty({0}, x.options().dtype(at::kLong));
  Tensor argmax = empty_argmax(g, x.options(), save_argmax);
  if (out.numel() == 0) return {out, indices, argmax};
  for (const Tensor* t : {&out, &indices, &argmax}) populate_pages(*t);
  int64_t* idx = return_indices ? indices.data_ptr<int64_t>() : nullptr;
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.max_pool2d", [&] {
    with_tap_type(g, [&](auto tap_zero) {
      using tap_t = decltype(tap_zero);
      tap_t* taps = save_argmax ? static_cast<tap_t*>(argmax.data_ptr()) : nullptr;
      if (is_channels_last(g)) {
        forward_channels_last<scalar_t>(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx, taps, g);
      } else {
        forward_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx, taps, g);
      }
    });
  });
  return {out, indices, argmax};
}

Tensor max_pool2d_backward_cpu(const Tensor& grad_output, const Tensor& input, const Tensor& argmax,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2d g =
      max_pool2d_backward_geometry(grad_output, input, argmax, kernel_size, stride, padding, dilation, ceil_mode);
  const auto fmt = kernel_format(g);
  const Tensor go = grad_output.contiguous(fmt);
  const Tensor am = argmax.contiguous(fmt);
  Tensor grad_input = empty_populated(input.sizes(), input.options().memory_format(fmt));
  if (grad_input.numel() == 0) return grad_input;
  CONVRNN_DISPATCH_FLOATING(go.scalar_type(), "convrnn.max_pool2d_backward", [&] {
    with_tap_type(g, [&](auto tap_zero) {
      using tap_t = decltype(tap_zero);
      const tap_t* taps = static_cast<const tap_t*>(am.const_data_ptr());
      if (is_channels_last(g)) {
        backward_channels_last<scalar_t>(go.const_data_ptr<scalar_t>(), taps, grad_input.data_ptr<scalar_t>(), g);
      } else {
        backward_nchw<scalar_t>(go.const_data_ptr<scalar_t>(), taps, grad_input.data_ptr<scalar_t>(), g);
      }
    });
  });
  return grad_input;
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CPU, m) {
  m.impl("max_pool2d", &convrnn::max_pool2d_cpu);
  m.impl("max_pool2d_backward", &convrnn::max_pool2d_backward_cpu);
}
