// CPU conv2d forward and backward: direct convolution, no im2col buffer, no GEMM call.
//
// Layout.  The kernels work in NHWC: the input is copied once into a zero-padded NHWC
// buffer xpad (N, H+2ph, W+2pw, C) (a view, no copy, for channels_last input without
// padding), so that no tap ever needs a bounds test; outputs are computed in NHWC and turned
// into NCHW by one copy when g.format asks for it.  Half types are converted to float32
// copies, run through the float kernels and converted back.
//
// One engine, "rows of pixels times a tap list", runs all three passes:
//   out[pix][o] = sum_t sum_l in[pix*in_ps + tap_in[t] + l] * Wpk[tap_w[t]][l][o]
// with the output channels o in blocks of up to 64 (4 AVX-512 vectors).  The float32
// AVX-512 micro-kernel keeps PB pixels x NV vectors of accumulators in registers (6 x 4,
// 8 x 3, 12 x 2, 12 x 1), broadcasts one input value per pixel and multiplies it with NV
// weight vectors.  Where the taps of one filter row are contiguous in memory (groups == 1,
// column dilation 1) the S taps and the C channels of a row fold into one reduction of
// length S*C (this is what makes the 1- and 3-channel first layers run at full width).
//  - forward: in = xpad, in_ps = sw*C, out = y; weights packed per group as
//    [k-block][r][s][c][64]; bias initialises the accumulators.
//  - backward data: the same engine with C and K swapped: in = grad_output copied into a
//    zero-padded NHWC buffer, weights packed as [c-block][r][S-1-s][k][64].  Input pixels
//    are processed by phase ((i+ph) mod sh, (j+pw) mod sw): every pixel of one phase has the
//    same valid taps, so a register block of same-phase pixels (output stride sw*C, input
//    stride K) needs no per-pixel test.  Every grad_input element is written exactly once.
//  - backward weight: acc[CB input values][NV output-channel vectors] summed over the Q
//    pixels of one output row, added into a per-chunk partial of the packed weight shape.
//    The N*P output rows are cut into a number of chunks fixed by the shape alone (at most
//    8); chunks run in parallel, each summing its rows in order, and the partials are then
//    added in chunk order: the result does not depend on the threads.  The bias gradient
//    is reduced the same way.
// Depthwise convolutions (groups == C, one output per channel) vectorise over channels
// instead (per-tap weight vectors, 6 pixels x 4 vectors of 16 channels); with a channel
// multiplier > 1 they go through the general engine (Cg = 1).
// Work split: forward tasks are output rows (n, p); backward-data tasks are input rows
// (n, i); backward-weight tasks are the chunks.  float64 and CPUs without AVX-512 run
// portable versions of the same micro-kernels (plain loops the compiler vectorises).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "avx512.h"
#include "conv2d.h"

namespace convrnn {
namespace {

using at::Tensor;

constexpr int kLanes = 16;     // width of a packed channel group (one float AVX-512 vector)
constexpr int kBlock = 64;     // output channels per register block (4 vectors)
constexpr int kMaxChunks = 8;  // weight-gradient partials

// Output modes of the engine: start from the bias (or zero) and store; start from out (a
// later reduction chunk) and store; start from zero and add to out pixel by pixel in order
// (the outputs of a block's pixels may overlap: backward data for small C).
enum { kStore = 0, kAccumulate = 1, kScatterAdd = 2 };

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A channel block: channels [o0, o0 + valid) of a group, packed `width` (multiple of 16) wide.
struct Block {
  int64_t o0, valid, width;
};

std::vector<Block> channel_blocks(int64_t n) {
  std::vector<Block> b;
  for (int64_t o0 = 0; o0 < n; o0 += kBlock) {
    const int64_t v = std::min<int64_t>(kBlock, n - o0);
    b.push_back({o0, v, round_up(v, kLanes)});
  }
  return b;
}

// Size of one group's packed weights: blocks of 64 (the last narrower) x taps x L.
int64_t packed_group_size(int64_t n, int64_t taps_x_len) { return round_up(n, kLanes) * taps_x_len; }

// A tap list: input offsets (elements) and packed-weight tap indices.
struct TapList {
  std::vector<int64_t> in, w;
  int64_t L = 0;  // reduction length per tap
  int size() const { return static_cast<int>(in.size()); }
};

// ----------------------------------------------------------------------------------------
// Portable micro-kernels (any T; float without AVX-512, double).

// The engine works on lists of pixels: pixel q reads the input at xp[q] + xoff and writes
// the output at op[q] + ooff.  out[q][o] for q < npix, o < valid of one block (packed width
// `width`): the taps' l in [0, L) of a reduction whose weights are Lw long per tap; ACC: add
// to out, else start from the bias (or zero).
template <typename T>
CONVRNN_CPU_CLONES void fwd_pixels_generic(const T* const* xp, int64_t xoff, const int64_t* tin, const int64_t* tw,
                                           int nt, int64_t L, int64_t Lw, const T* __restrict w, int64_t width,
                                           int64_t valid, T* const* op, int64_t ooff, int64_t npix,
                                           const T* __restrict bias, int mode) {
  constexpr int PB = 4;
  const bool accumulate = mode == 1;
  if (mode == 2) bias = nullptr;
  T acc[PB][kBlock];
  for (int64_t q0 = 0; q0 < npix; q0 += PB) {
    const int pb = static_cast<int>(std::min<int64_t>(PB, npix - q0));
    for (int p = 0; p < PB; ++p)
      for (int64_t o = 0; o < width; ++o)
        acc[p][o] = (p < pb && o < valid) ? (accumulate ? op[q0 + p][ooff + o] : bias != nullptr ? bias[o] : T(0))
                                          : T(0);
    for (int t = 0; t < nt; ++t) {
      const T* wt = w + tw[t] * Lw * width;
      for (int64_t l = 0; l < L; ++l) {
        const T* wr = wt + l * width;
        for (int p = 0; p < pb; ++p) {
          const T xv = xp[q0 + p][xoff + tin[t] + l];
          for (int64_t o = 0; o < width; ++o) acc[p][o] += xv * wr[o];
        }
      }
    }
    for (int p = 0; p < pb; ++p)
      for (int64_t o = 0; o < valid; ++o) {
        if (mode == 2) {
          op[q0 + p][ooff + o] += acc[p][o];
        } else {
          op[q0 + p][ooff + o] = acc[p][o];
        }
      }
  }
}

// part[l][o] += sum_q x[q*x_ps + l] * go[q*go_ps + o] for l < L, o < valid.
template <typename T>
CONVRNN_CPU_CLONES void wgt_rows_generic(const T* __restrict x, int64_t x_ps, int64_t x_rs, int64_t L,
                                         const T* __restrict go, int64_t go_ps, int64_t go_rs, int64_t width,
                                         int64_t valid, int64_t nrows, int64_t npix, T* __restrict part) {
  for (int64_t j = 0; j < nrows * npix; ++j) {
    const int64_t row = j / npix, q = j % npix;
    const T* xq = x + row * x_rs + q * x_ps;
    const T* gq = go + row * go_rs + q * go_ps;
    for (int64_t l = 0; l < L; ++l) {
      const T xv = xq[l];
      T* pr = part + l * width;
      for (int64_t o = 0; o < valid; ++o) pr[o] += xv * gq[o];
    }
  }
}

// Depthwise over a pixel list: op[q][ooff + c] = (bias) + sum_t xp[q][xoff + tin[t] + c] * w[tw[t]*wstride + c].
template <typename T>
CONVRNN_CPU_CLONES void dw_pixels_generic(const T* const* xp, int64_t xoff, const int64_t* tin, const int64_t* tw,
                                          int nt, const T* __restrict w, int64_t wstride, int64_t nc, T* const* op,
                                          int64_t ooff, int64_t npix, const T* __restrict bias) {
  for (int64_t q = 0; q < npix; ++q) {
    T* __restrict o = op[q] + ooff;
    for (int64_t c = 0; c < nc; ++c) o[c] = bias != nullptr ? bias[c] : T(0);
    for (int t = 0; t < nt; ++t) {
      const T* __restrict x = xp[q] + xoff + tin[t];
      const T* __restrict wt = w + tw[t] * wstride;
      for (int64_t c = 0; c < nc; ++c) o[c] += x[c] * wt[c];
    }
  }
}

// Depthwise weight gradient: part[tw[t]*wstride + c] += sum_q go[q*go_ps + c] * x[q*x_ps + tin[t] + c].
template <typename T>
CONVRNN_CPU_CLONES void dw_wgt_rows_generic(const T* __restrict x, int64_t x_ps, const int64_t* tin,
                                            const int64_t* tw, int nt, const T* __restrict go, int64_t go_ps,
                                            int64_t nc, int64_t npix, T* __restrict part, int64_t wstride) {
  for (int64_t q = 0; q < npix; ++q) {
    for (int t = 0; t < nt; ++t) {
      const T* xq = x + q * x_ps + tin[t];
      const T* gq = go + q * go_ps;
      T* pr = part + tw[t] * wstride;
      for (int64_t c = 0; c < nc; ++c) pr[c] += gq[c] * xq[c];
    }
  }
}

// ----------------------------------------------------------------------------------------
// float32 AVX-512 micro-kernels.

#ifdef CONVRNN_HAVE_AVX512  // cpu/avx512.h: CONVRNN_AVX512, cpu_has_avx512f, lane_mask, transpose16
#define CONVRNN_CONV_AVX512 1

// PB pixels x NV vectors; `last` masks the final vector's loads and stores.
template <int PB, int NV, int MODE>
CONVRNN_AVX512 void fwd_block_avx512(const float* const* xp, int64_t xoff, const int64_t* tin, const int64_t* tw,
                                     int nt, int64_t L, int64_t Lw, const float* __restrict w, float* const* op,
                                     int64_t ooff, const float* __restrict bias, __mmask16 last) {
  __m512 acc[PB][NV];
  if (MODE == kAccumulate) {
#pragma GCC unroll 16
    for (int p = 0; p < PB; ++p)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v)
        acc[p][v] = v < NV - 1 ? _mm512_loadu_ps(op[p] + ooff + 16 * v)
                               : _mm512_maskz_loadu_ps(last, op[p] + ooff + 16 * v);
  } else {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __m512 b = (bias == nullptr || MODE == kScatterAdd) ? _mm512_setzero_ps()
                       : v < NV - 1    ? _mm512_loadu_ps(bias + 16 * v)
                                       : _mm512_maskz_loadu_ps(last, bias + 16 * v);
#pragma GCC unroll 16
      for (int p = 0; p < PB; ++p) acc[p][v] = b;
    }
  }
  const int64_t wstep = Lw * NV * 16;
  for (int t = 0; t < nt; ++t) {
    const float* x[PB];
#pragma GCC unroll 16
    for (int p = 0; p < PB; ++p) x[p] = xp[p] + xoff + tin[t];
    const float* wt = w + tw[t] * wstep;
    for (int64_t l = 0; l < L; ++l) {
      __m512 wv[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wt + l * NV * 16 + 16 * v);
#pragma GCC unroll 16
      for (int p = 0; p < PB; ++p) {
        const __m512 xb = _mm512_set1_ps(x[p][l]);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[p][v] = _mm512_fmadd_ps(xb, wv[v], acc[p][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < PB; ++p) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      float* dst = op[p] + ooff + 16 * v;
      if (MODE == kScatterAdd) {
        if (v < NV - 1) {
          _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), acc[p][v]));
        } else {
          _mm512_mask_storeu_ps(dst, last, _mm512_add_ps(_mm512_maskz_loadu_ps(last, dst), acc[p][v]));
        }
      } else if (v < NV - 1) {
        _mm512_storeu_ps(dst, acc[p][v]);
      } else {
        _mm512_mask_storeu_ps(dst, last, acc[p][v]);
      }
    }
  }
}

template <int NV, int PB, int ACC>
CONVRNN_AVX512 void fwd_pixels_nv(const float* const* xp, int64_t xoff, const int64_t* tin, const int64_t* tw, int nt,
                                  int64_t L, int64_t Lw, const float* w, float* const* op, int64_t ooff, int64_t npix,
                                  const float* bias, __mmask16 last) {
  int64_t q = 0;
  for (; q + PB <= npix; q += PB)
    fwd_block_avx512<PB, NV, ACC>(xp + q, xoff, tin, tw, nt, L, Lw, w, op + q, ooff, bias, last);
#define CONVRNN_FWD_TAIL(pb)                                                                                    \
  if (pb < PB && npix - q >= pb) {                                                                              \
    fwd_block_avx512<(pb < PB ? pb : 1), NV, ACC>(xp + q, xoff, tin, tw, nt, L, Lw, w, op + q, ooff, bias, last); \
    q += pb;                                                                                                    \
  }
  CONVRNN_FWD_TAIL(8)
  CONVRNN_FWD_TAIL(4)
  CONVRNN_FWD_TAIL(2)
  CONVRNN_FWD_TAIL(1)
#undef CONVRNN_FWD_TAIL
}

template <int ACC>
CONVRNN_AVX512 void fwd_pixels_avx512(const float* const* xp, int64_t xoff, const int64_t* tin, const int64_t* tw,
                                      int nt, int64_t L, int64_t Lw, const float* w, int64_t width, int64_t valid,
                                      float* const* op, int64_t ooff, int64_t npix, const float* bias) {
  const __mmask16 last = lane_mask(valid - (width - 16));
  switch (width / 16) {
    case 4: fwd_pixels_nv<4, 6, ACC>(xp, xoff, tin, tw, nt, L, Lw, w, op, ooff, npix, bias, last); break;
    case 3: fwd_pixels_nv<3, 8, ACC>(xp, xoff, tin, tw, nt, L, Lw, w, op, ooff, npix, bias, last); break;
    case 2: fwd_pixels_nv<2, 12, ACC>(xp, xoff, tin, tw, nt, L, Lw, w, op, ooff, npix, bias, last); break;
    default: fwd_pixels_nv<1, 12, ACC>(xp, xoff, tin, tw, nt, L, Lw, w, op, ooff, npix, bias, last); break;
  }
}

// Weight gradient: CB reduction values x NV vectors, summed over npix pixels.
template <int CB, int NV>
CONVRNN_AVX512 void wgt_block_avx512(const float* __restrict x, int64_t x_ps, int64_t x_rs, const float* __restrict go,
                                     int64_t go_ps, int64_t go_rs, int64_t nrows, int64_t npix,
                                     float* __restrict part, __mmask16 last) {
  __m512 acc[CB][NV];
#pragma GCC unroll 32
  for (int i = 0; i < CB; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_loadu_ps(part + i * NV * 16 + 16 * v);
  for (int64_t row = 0; row < nrows; ++row) {
    const float* xr = x + row * x_rs;
    const float* gr = go + row * go_rs;
    for (int64_t q = 0; q < npix; ++q) {
      __m512 gv[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v)
        gv[v] = v < NV - 1 ? _mm512_loadu_ps(gr + q * go_ps + 16 * v) : _mm512_maskz_loadu_ps(last, gr + q * go_ps + 16 * v);
      const float* xq = xr + q * x_ps;
#pragma GCC unroll 32
      for (int i = 0; i < CB; ++i) {
        const __m512 xb = _mm512_set1_ps(xq[i]);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xb, gv[v], acc[i][v]);
      }
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < CB; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(part + i * NV * 16 + 16 * v, acc[i][v]);
}

template <int NV, int CB>
CONVRNN_AVX512 void wgt_rows_nv(const float* x, int64_t x_ps, int64_t x_rs, int64_t L, const float* go, int64_t go_ps,
                                int64_t go_rs, int64_t nrows, int64_t npix, float* part, __mmask16 last) {
  int64_t l = 0;
  for (; l + CB <= L; l += CB)
    wgt_block_avx512<CB, NV>(x + l, x_ps, x_rs, go, go_ps, go_rs, nrows, npix, part + l * NV * 16, last);
#define CONVRNN_WGT_TAIL(cb)                                                                     \
  if (cb < CB && L - l >= cb) {                                                                  \
    wgt_block_avx512<(cb < CB ? cb : 1), NV>(x + l, x_ps, x_rs, go, go_ps, go_rs, nrows, npix, part + l * NV * 16, last); \
    l += cb;                                                                                     \
  }
  CONVRNN_WGT_TAIL(16)
  CONVRNN_WGT_TAIL(8)
  CONVRNN_WGT_TAIL(4)
  CONVRNN_WGT_TAIL(2)
  CONVRNN_WGT_TAIL(1)
#undef CONVRNN_WGT_TAIL
}

CONVRNN_AVX512 void wgt_rows_avx512(const float* x, int64_t x_ps, int64_t x_rs, int64_t L, const float* go,
                                    int64_t go_ps, int64_t go_rs, int64_t width, int64_t valid, int64_t nrows,
                                    int64_t npix, float* part) {
  const __mmask16 last = lane_mask(valid - (width - 16));
  switch (width / 16) {
    case 4: wgt_rows_nv<4, 6>(x, x_ps, x_rs, L, go, go_ps, go_rs, nrows, npix, part, last); break;
    case 3: wgt_rows_nv<3, 8>(x, x_ps, x_rs, L, go, go_ps, go_rs, nrows, npix, part, last); break;
    case 2: wgt_rows_nv<2, 12>(x, x_ps, x_rs, L, go, go_ps, go_rs, nrows, npix, part, last); break;
    default: wgt_rows_nv<1, 24>(x, x_ps, x_rs, L, go, go_ps, go_rs, nrows, npix, part, last); break;
  }
}

// Depthwise: PB pixels x NV vectors of channels; one input load per FMA, weights per tap.
template <int PB, int NV>
CONVRNN_AVX512 void dw_block_avx512(const float* const* xp, int64_t xoff, const int64_t* tin, const int64_t* tw,
                                    int nt, const float* __restrict w, int64_t wstride, float* const* op,
                                    int64_t ooff, const float* __restrict bias, __mmask16 last) {
  __m512 acc[PB][NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const __m512 b = bias == nullptr ? _mm512_setzero_ps()
                     : v < NV - 1    ? _mm512_loadu_ps(bias + 16 * v)
                                     : _mm512_maskz_loadu_ps(last, bias + 16 * v);
#pragma GCC unroll 16
    for (int p = 0; p < PB; ++p) acc[p][v] = b;
  }
  const float* x[PB];
#pragma GCC unroll 16
  for (int p = 0; p < PB; ++p) x[p] = xp[p] + xoff;
  for (int t = 0; t < nt; ++t) {
    const float* wt = w + tw[t] * wstride;
    const int64_t off = tin[t];
    __m512 wv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wt + 16 * v);  // packed: padded to 16
#pragma GCC unroll 16
    for (int p = 0; p < PB; ++p) {
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const __m512 xv = v < NV - 1 ? _mm512_loadu_ps(x[p] + off + 16 * v)
                                     : _mm512_maskz_loadu_ps(last, x[p] + off + 16 * v);
        acc[p][v] = _mm512_fmadd_ps(xv, wv[v], acc[p][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < PB; ++p) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      if (v < NV - 1) {
        _mm512_storeu_ps(op[p] + ooff + 16 * v, acc[p][v]);
      } else {
        _mm512_mask_storeu_ps(op[p] + ooff + 16 * v, last, acc[p][v]);
      }
    }
  }
}

template <int NV, int PB>
CONVRNN_AVX512 void dw_pixels_nv(const float* const* xp, int64_t xoff, const int64_t* tin, const int64_t* tw, int nt,
                                 const float* w, int64_t wstride, float* const* op, int64_t ooff, int64_t npix,
                                 const float* bias, __mmask16 last) {
  int64_t q = 0;
  for (; q + PB <= npix; q += PB) dw_block_avx512<PB, NV>(xp + q, xoff, tin, tw, nt, w, wstride, op + q, ooff, bias, last);
  if (PB > 2 && npix - q >= 2) {
    dw_block_avx512<(PB > 2 ? 2 : 1), NV>(xp + q, xoff, tin, tw, nt, w, wstride, op + q, ooff, bias, last);
    q += 2;
  }
  for (; q < npix; ++q) dw_block_avx512<1, NV>(xp + q, xoff, tin, tw, nt, w, wstride, op + q, ooff, bias, last);
}

CONVRNN_AVX512 void dw_pixels_avx512(const float* const* xp, int64_t xoff, const int64_t* tin, const int64_t* tw,
                                     int nt, const float* w, int64_t wstride, int64_t nc, float* const* op,
                                     int64_t ooff, int64_t npix, const float* bias) {
  const int64_t width = round_up(nc, 16);
  const __mmask16 last = lane_mask(nc - (width - 16));
  switch (width / 16) {
    case 4: dw_pixels_nv<4, 6>(xp, xoff, tin, tw, nt, w, wstride, op, ooff, npix, bias, last); break;
    case 3: dw_pixels_nv<3, 8>(xp, xoff, tin, tw, nt, w, wstride, op, ooff, npix, bias, last); break;
    case 2: dw_pixels_nv<2, 12>(xp, xoff, tin, tw, nt, w, wstride, op, ooff, npix, bias, last); break;
    default: dw_pixels_nv<1, 12>(xp, xoff, tin, tw, nt, w, wstride, op, ooff, npix, bias, last); break;
  }
}

// Depthwise weight gradient for 16 channels: TB taps in registers over npix pixels.
template <int TB>
CONVRNN_AVX512 void dw_wgt_block_avx512(const float* __restrict x, int64_t x_ps, const int64_t* tin, const int64_t* tw,
                                        const float* __restrict go, int64_t go_ps, int64_t npix,
                                        float* __restrict part, int64_t wstride, __mmask16 m) {
  __m512 acc[TB];
#pragma GCC unroll 32
  for (int t = 0; t < TB; ++t) acc[t] = _mm512_loadu_ps(part + tw[t] * wstride);
  for (int64_t q = 0; q < npix; ++q) {
    const __m512 gv = _mm512_maskz_loadu_ps(m, go + q * go_ps);
    const float* xq = x + q * x_ps;
#pragma GCC unroll 32
    for (int t = 0; t < TB; ++t) acc[t] = _mm512_fmadd_ps(gv, _mm512_maskz_loadu_ps(m, xq + tin[t]), acc[t]);
  }
#pragma GCC unroll 32
  for (int t = 0; t < TB; ++t) _mm512_storeu_ps(part + tw[t] * wstride, acc[t]);
}

CONVRNN_AVX512 void dw_wgt_rows_avx512(const float* x, int64_t x_ps, const int64_t* tin, const int64_t* tw, int nt,
                                       const float* go, int64_t go_ps, int64_t nc, int64_t npix, float* part,
                                       int64_t wstride) {
  for (int64_t c = 0; c < nc; c += 16) {
    const __mmask16 m = lane_mask(nc - c);
    int t = 0;
    for (; t + 16 <= nt; t += 16)
      dw_wgt_block_avx512<16>(x + c, x_ps, tin + t, tw + t, go + c, go_ps, npix, part + c, wstride, m);
#define CONVRNN_DWW_TAIL(tb)                                                                             \
  if (nt - t >= tb) {                                                                                    \
    dw_wgt_block_avx512<tb>(x + c, x_ps, tin + t, tw + t, go + c, go_ps, npix, part + c, wstride, m);   \
    t += tb;                                                                                             \
  }
    CONVRNN_DWW_TAIL(9)
    CONVRNN_DWW_TAIL(8)
    CONVRNN_DWW_TAIL(4)
    CONVRNN_DWW_TAIL(2)
    CONVRNN_DWW_TAIL(1)
#undef CONVRNN_DWW_TAIL
  }
}
// Full 16 x 16 tiles of the layout copies below (the edges run the portable loops).
CONVRNN_AVX512 void nchw_rows_to_nhwc_avx512(const float* src, float* dst, int64_t C, int64_t H, int64_t W, int64_t h0,
                                             int64_t h1, int64_t Wp, int64_t left) {
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t c0 = 0; c0 < C; c0 += 16)
      for (int64_t w0 = 0; w0 < W; w0 += 16)
        transpose16(src + c0 * H * W + h * W + w0, H * W, dst + (h * Wp + left + w0) * C + c0, C,
                    static_cast<int>(std::min<int64_t>(16, C - c0)), static_cast<int>(std::min<int64_t>(16, W - w0)));
}

CONVRNN_AVX512 void nhwc_rows_to_nchw_avx512(const float* src, float* dst, int64_t C, int64_t H, int64_t W, int64_t h0,
                                             int64_t h1) {
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t c0 = 0; c0 < C; c0 += 16)
      for (int64_t w0 = 0; w0 < W; w0 += 16)
        transpose16(src + (h * W + w0) * C + c0, C, dst + c0 * H * W + h * W + w0, H * W,
                    static_cast<int>(std::min<int64_t>(16, W - w0)), static_cast<int>(std::min<int64_t>(16, C - c0)));
}
// NCHW depthwise, column stride 1: see dw_plane_forward / dw_plane_weight below.
CONVRNN_AVX512 void dw_plane_forward_avx512(const float* xp, int64_t Wp, const float* w, float bias, float* out,
                                            int64_t P, int64_t Q, int64_t R, int64_t S, int64_t sh, int64_t dh,
                                            int64_t dw) {
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t q0 = 0; q0 < Q; q0 += 64) {
      __mmask16 m[4];
      __m512 acc[4];
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        m[v] = lane_mask(std::max<int64_t>(0, Q - q0 - 16 * v));
        acc[v] = _mm512_set1_ps(bias);
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t s = 0; s < S; ++s) {
          const __m512 wv = _mm512_set1_ps(w[r * S + s]);
          const float* row = xp + (p * sh + r * dh) * Wp + q0 + s * dw;
#pragma GCC unroll 4
          for (int v = 0; v < 4; ++v) acc[v] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m[v], row + 16 * v), acc[v]);
        }
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(out + p * Q + q0 + 16 * v, m[v], acc[v]);
    }
  }
}

CONVRNN_AVX512 void dw_plane_weight_avx512(const float* xp, int64_t Wp, const float* go, float* acc, int64_t P,
                                           int64_t Q, int64_t R, int64_t S, int64_t sh, int64_t dh, int64_t dw) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t s = 0; s < S; ++s) {
      __m512 a = _mm512_loadu_ps(acc + (r * S + s) * 16);
      for (int64_t p = 0; p < P; ++p) {
        const float* row = xp + (p * sh + r * dh) * Wp + s * dw;
        const float* g = go + p * Q;
        for (int64_t q = 0; q < Q; q += 16) {
          const __mmask16 m = lane_mask(Q - q);
          a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, g + q), _mm512_maskz_loadu_ps(m, row + q), a);
        }
      }
      _mm512_storeu_ps(acc + (r * S + s) * 16, a);
    }
}
// 1x1 convolution on NCHW, per image: c[i][m] (+)= sum_l a[l][i] * b[l][m] for 6 rows i
// (a packed [l][6], rows >= mvalid are not stored) and 4 vectors of columns m (the
// pixels; `last` masks the 4th vector's loads and stores).
template <bool ACC>
CONVRNN_AVX512 void nchw1x1_block(const float* __restrict a, const float* __restrict b, int64_t ldb, int64_t L,
                                  float* __restrict c, int64_t ldc, const float* bias, int mvalid, int nvec,
                                  __mmask16 last) {
  constexpr int MB = 6, NV = 4;
  __m512 acc[MB][NV];
  __mmask16 m[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) m[v] = v < nvec - 1 ? __mmask16(0xFFFF) : v == nvec - 1 ? last : __mmask16(0);
#pragma GCC unroll 6
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[i][v] = ACC ? (i < mvalid ? _mm512_maskz_loadu_ps(m[v], c + i * ldc + 16 * v) : _mm512_setzero_ps())
                      : (bias != nullptr && i < mvalid ? _mm512_set1_ps(bias[i]) : _mm512_setzero_ps());
  for (int64_t l = 0; l < L; ++l) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(m[v], b + l * ldb + 16 * v);
#pragma GCC unroll 6
    for (int i = 0; i < MB; ++i) {
      const __m512 av = _mm512_set1_ps(a[l * MB + i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MB; ++i)
    if (i < mvalid)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(c + i * ldc + 16 * v, m[v], acc[i][v]);
}
#endif  // AVX-512

#ifdef CONVRNN_HAVE_AVX512
// ----------------------------------------------------------------------------------------
// The forward engine's micro-kernel in AVX2 + FMA (16 registers of 8 lanes), for x86-64 CPUs
// without AVX-512 (the Zen 3 of sessions 18-20: there the portable loop kept its accumulators
// in memory, a load and a store per FMA).  A block's width as strips of 16 channels; per
// strip, PB pixels x 2 vectors of accumulators (12 of the 16 registers at PB = 6), per (t, l)
// two weight loads and PB broadcasts for 2 PB FMAs, as cpu/panel_gemm.cpp's block_avx2.
// Every output element is the same sum as fwd_block_avx512's (its start, then t and l in
// order, one FMA each; kScatterAdd adds pixel by pixel in order): the same bits.
#define CONVRNN_CONV_AVX2 1

// Whether the float kernels with an AVX-512 and an AVX2 + FMA form run one of them here.
bool vector_forms_run() { return cpu_has_avx512f() || cpu_has_avx2_fma(); }

template <int PB, int MODE>
CONVRNN_AVX2 void fwd_strip_avx2(const float* const* xp, int64_t xoff, const int64_t* tin, const int64_t* tw,
                                     int nt, int64_t L, int64_t wstep, int64_t width, const float* __restrict w,
                                     float* const* op, int64_t ooff, const float* __restrict bias, bool full,
                                     __m256i m0, __m256i m1) {
  __m256 acc[PB][2];
#pragma GCC unroll 8
  for (int p = 0; p < PB; ++p) {
    const float* src = MODE == kAccumulate ? op[p] + ooff : bias;
    if ((MODE == kAccumulate || bias != nullptr) && MODE != kScatterAdd) {
      acc[p][0] = full ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, m0);
      acc[p][1] = full ? _mm256_loadu_ps(src + 8) : _mm256_maskload_ps(src + 8, m1);
    } else {
      acc[p][0] = _mm256_setzero_ps(), acc[p][1] = _mm256_setzero_ps();
    }
  }
  for (int t = 0; t < nt; ++t) {
    const float* x[PB];
#pragma GCC unroll 8
    for (int p = 0; p < PB; ++p) x[p] = xp[p] + xoff + tin[t];
    const float* wt = w + tw[t] * wstep;
    for (int64_t l = 0; l < L; ++l) {
      const __m256 w0 = _mm256_loadu_ps(wt + l * width), w1 = _mm256_loadu_ps(wt + l * width + 8);
#pragma GCC unroll 8
      for (int p = 0; p < PB; ++p) {
        const __m256 xb = _mm256_broadcast_ss(x[p] + l);
        acc[p][0] = _mm256_fmadd_ps(xb, w0, acc[p][0]);
        acc[p][1] = _mm256_fmadd_ps(xb, w1, acc[p][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < PB; ++p) {
    float* dst = op[p] + ooff;
    __m256 v0 = acc[p][0], v1 = acc[p][1];
    if (MODE == kScatterAdd) {
      v0 = _mm256_add_ps(full ? _mm256_loadu_ps(dst) : _mm256_maskload_ps(dst, m0), v0);
      v1 = _mm256_add_ps(full ? _mm256_loadu_ps(dst + 8) : _mm256_maskload_ps(dst + 8, m1), v1);
    }
    if (full) {
      _mm256_storeu_ps(dst, v0), _mm256_storeu_ps(dst + 8, v1);
    } else {
      _mm256_maskstore_ps(dst, m0, v0), _mm256_maskstore_ps(dst + 8, m1, v1);
    }
  }
}

// fwd_pixels_avx512's work, strip by strip: blocks of 6 pixels, then 4, 2, 1.
template <int MODE>
CONVRNN_AVX2 void fwd_pixels_avx2(const float* const* xp, int64_t xoff, const int64_t* tin, const int64_t* tw,
                                      int nt, int64_t L, int64_t Lw, const float* w, int64_t width, int64_t valid,
                                      float* const* op, int64_t ooff, int64_t npix, const float* bias) {
  const int64_t wstep = Lw * width;
  for (int64_t s = 0; 16 * s < valid; ++s) {
    const int64_t n = std::min<int64_t>(16, valid - 16 * s);
    const __m256i m0 = lane_mask8(n), m1 = lane_mask8(n - 8);
    const float* ws = w + 16 * s;
    const float* bs = bias != nullptr ? bias + 16 * s : nullptr;
    const int64_t os = ooff + 16 * s;
    const bool full = n == 16;
    int64_t q = 0;
    for (; q + 6 <= npix; q += 6) {
      fwd_strip_avx2<6, MODE>(xp + q, xoff, tin, tw, nt, L, wstep, width, ws, op + q, os, bs, full, m0, m1);
    }
    if (npix - q >= 4) {
      fwd_strip_avx2<4, MODE>(xp + q, xoff, tin, tw, nt, L, wstep, width, ws, op + q, os, bs, full, m0, m1);
      q += 4;
    }
    if (npix - q >= 2) {
      fwd_strip_avx2<2, MODE>(xp + q, xoff, tin, tw, nt, L, wstep, width, ws, op + q, os, bs, full, m0, m1);
      q += 2;
    }
    if (npix - q >= 1) {
      fwd_strip_avx2<1, MODE>(xp + q, xoff, tin, tw, nt, L, wstep, width, ws, op + q, os, bs, full, m0, m1);
    }
  }
}

// The weight gradient's micro-kernel in AVX2 + FMA (wgt_block_avx512's sums, strip by strip):
// CB reduction values x 2 vectors of a 16-channel strip (12 registers at CB = 6), per pixel two
// gradient loads (masked past `valid`) and CB broadcasts for 2 CB FMAs; part's rows are padded
// to the block's width, so its loads and stores are whole.
template <int CB>
CONVRNN_AVX2 void wgt_strip_avx2(const float* __restrict x, int64_t x_ps, int64_t x_rs, const float* __restrict go,
                                     int64_t go_ps, int64_t go_rs, int64_t nrows, int64_t npix, float* __restrict part,
                                     int64_t width, bool full, __m256i m0, __m256i m1) {
  __m256 acc[CB][2];
#pragma GCC unroll 8
  for (int i = 0; i < CB; ++i) {
    acc[i][0] = _mm256_loadu_ps(part + i * width), acc[i][1] = _mm256_loadu_ps(part + i * width + 8);
  }
  for (int64_t row = 0; row < nrows; ++row) {
    const float* xr = x + row * x_rs;
    const float* gr = go + row * go_rs;
    for (int64_t q = 0; q < npix; ++q) {
      const float* gq = gr + q * go_ps;
      const __m256 g0 = full ? _mm256_loadu_ps(gq) : _mm256_maskload_ps(gq, m0);
      const __m256 g1 = full ? _mm256_loadu_ps(gq + 8) : _mm256_maskload_ps(gq + 8, m1);
      const float* xq = xr + q * x_ps;
#pragma GCC unroll 8
      for (int i = 0; i < CB; ++i) {
        const __m256 xb = _mm256_broadcast_ss(xq + i);
        acc[i][0] = _mm256_fmadd_ps(xb, g0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(xb, g1, acc[i][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < CB; ++i) {
    _mm256_storeu_ps(part + i * width, acc[i][0]), _mm256_storeu_ps(part + i * width + 8, acc[i][1]);
  }
}

CONVRNN_AVX2 void wgt_rows_avx2(const float* x, int64_t x_ps, int64_t x_rs, int64_t L, const float* go,
                                    int64_t go_ps, int64_t go_rs, int64_t width, int64_t valid, int64_t nrows,
                                    int64_t npix, float* part) {
  for (int64_t s = 0; 16 * s < valid; ++s) {
    const int64_t n = std::min<int64_t>(16, valid - 16 * s);
    const __m256i m0 = lane_mask8(n), m1 = lane_mask8(n - 8);
    const bool full = n == 16;
    const float* gs = go + 16 * s;
    float* ps = part + 16 * s;
    int64_t l = 0;
    for (; l + 6 <= L; l += 6) {
      wgt_strip_avx2<6>(x + l, x_ps, x_rs, gs, go_ps, go_rs, nrows, npix, ps + l * width, width, full, m0, m1);
    }
    if (L - l >= 4) {
      wgt_strip_avx2<4>(x + l, x_ps, x_rs, gs, go_ps, go_rs, nrows, npix, ps + l * width, width, full, m0, m1);
      l += 4;
    }
    if (L - l >= 2) {
      wgt_strip_avx2<2>(x + l, x_ps, x_rs, gs, go_ps, go_rs, nrows, npix, ps + l * width, width, full, m0, m1);
      l += 2;
    }
    if (L - l >= 1) {
      wgt_strip_avx2<1>(x + l, x_ps, x_rs, gs, go_ps, go_rs, nrows, npix, ps + l * width, width, full, m0, m1);
    }
  }
}

// nchw1x1_block's sums on one strip of 16 columns (pixels): 6 rows x 2 vectors of accumulators,
// per l two loads of b (masked past the tile's pixels) and 6 broadcasts of the packed a.
template <bool ACC>
CONVRNN_AVX2 void nchw1x1_strip_avx2(const float* __restrict a, const float* __restrict b, int64_t ldb, int64_t L,
                                         float* __restrict c, int64_t ldc, const float* bias, int mvalid, bool full,
                                         __m256i m0, __m256i m1) {
  constexpr int MB = 6;
  __m256 acc[MB][2];
#pragma GCC unroll 6
  for (int i = 0; i < MB; ++i) {
    if (ACC && i < mvalid) {
      acc[i][0] = full ? _mm256_loadu_ps(c + i * ldc) : _mm256_maskload_ps(c + i * ldc, m0);
      acc[i][1] = full ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_maskload_ps(c + i * ldc + 8, m1);
    } else {
      acc[i][0] = acc[i][1] = !ACC && bias != nullptr && i < mvalid ? _mm256_set1_ps(bias[i]) : _mm256_setzero_ps();
    }
  }
  for (int64_t l = 0; l < L; ++l) {
    const float* bl = b + l * ldb;
    const __m256 b0 = full ? _mm256_loadu_ps(bl) : _mm256_maskload_ps(bl, m0);
    const __m256 b1 = full ? _mm256_loadu_ps(bl + 8) : _mm256_maskload_ps(bl + 8, m1);
#pragma GCC unroll 6
    for (int i = 0; i < MB; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + l * MB + i);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MB; ++i) {
    if (i >= mvalid) continue;
    if (full) {
      _mm256_storeu_ps(c + i * ldc, acc[i][0]), _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
    } else {
      _mm256_maskstore_ps(c + i * ldc, m0, acc[i][0]), _mm256_maskstore_ps(c + i * ldc + 8, m1, acc[i][1]);
    }
  }
}

// nchw1x1_block's work on nm (<= 64) columns as strips of 16.
template <bool ACC>
CONVRNN_AVX2 void nchw1x1_block_avx2(const float* a, const float* b, int64_t ldb, int64_t L, float* c, int64_t ldc,
                                         const float* bias, int mvalid, int64_t nm) {
  for (int64_t s = 0; 16 * s < nm; ++s) {
    const int n = static_cast<int>(std::min<int64_t>(16, nm - 16 * s));
    const __m256i m0 = lane_mask8(n), m1 = lane_mask8(n - 8);
    nchw1x1_strip_avx2<ACC>(a, b + 16 * s, ldb, L, c + 16 * s, ldc, bias, mvalid, n == 16, m0, m1);
  }
}
#endif  // AVX2

// ----------------------------------------------------------------------------------------
// Dispatch between the AVX-512 and portable micro-kernels.

// The reduction of one pass cut into chunks whose weights (per block) stay in L1: taps
// [t0, t1) and, within them, l in [l0, l1).  A pass without taps is one empty chunk (it
// writes zeros).
struct RChunk {
  int t0, t1;
  int64_t l0, l1;
};

std::vector<RChunk> reduction_chunks(const TapList& taps, int64_t width) {
  const int64_t lmax = std::max<int64_t>(16, (32 * 1024 / static_cast<int64_t>(sizeof(float))) / width);
  std::vector<RChunk> ch;
  const int nt = taps.size();
  if (nt == 0) return {{0, 0, 0, 0}};
  if (taps.L >= lmax) {
    const int64_t pieces = ceil_div(taps.L, lmax);
    for (int t = 0; t < nt; ++t)
      for (int64_t i = 0; i < pieces; ++i) ch.push_back({t, t + 1, i * taps.L / pieces, (i + 1) * taps.L / pieces});
  } else {
    const int per = static_cast<int>(std::max<int64_t>(1, lmax / taps.L));
    for (int t = 0; t < nt; t += per) ch.push_back({t, std::min(nt, t + per), 0, taps.L});
  }
  return ch;
}

// One reduction chunk of the engine over npix pixels of one block.
template <typename T>
void fwd_pixels(const T* const* xp, int64_t xoff, const TapList& taps, const RChunk& c, int mode, const T* w,
                const Block& b, T* const* op, int64_t ooff, int64_t npix, const T* bias) {
  if (npix <= 0) return;
  const int nt = c.t1 - c.t0;
  const int64_t L = c.l1 - c.l0;
  const T* wc = w + c.l0 * b.width;
#ifdef CONVRNN_CONV_AVX2  // AVX-512 where the CPU has it, else AVX2 + FMA (both forms have one signature)
  if (std::is_same<T, float>::value && vector_forms_run()) {
    auto f = mode == kAccumulate ? fwd_pixels_avx2<kAccumulate>
             : mode == kScatterAdd ? fwd_pixels_avx2<kScatterAdd>
                                   : fwd_pixels_avx2<kStore>;
#ifdef CONVRNN_CONV_AVX512
    if (cpu_has_avx512f()) {
      f = mode == kAccumulate ? fwd_pixels_avx512<kAccumulate>
          : mode == kScatterAdd ? fwd_pixels_avx512<kScatterAdd>
                                : fwd_pixels_avx512<kStore>;
    }
#endif
    f(reinterpret_cast<const float* const*>(xp), xoff + c.l0, taps.in.data() + c.t0, taps.w.data() + c.t0, nt, L,
      taps.L, reinterpret_cast<const float*>(wc), b.width, b.valid, reinterpret_cast<float* const*>(op), ooff, npix,
      reinterpret_cast<const float*>(bias));
    return;
  }
#endif
  fwd_pixels_generic<T>(xp, xoff + c.l0, taps.in.data() + c.t0, taps.w.data() + c.t0, nt, L, taps.L, wc, b.width,
                        b.valid, op, ooff, npix, bias, mode);
}

// Pixel tasks: each pass cuts its pixels into tasks of kTaskPixels (a multiple of every
// register block), so that only a pass's last pixels run a partial block.
constexpr int64_t kTaskPixels = 144;

template <typename T>
void wgt_rows(const T* x, int64_t x_ps, int64_t x_rs, int64_t L, const T* go, int64_t go_ps, int64_t go_rs,
              const Block& b, int64_t nrows, int64_t npix, T* part) {
#ifdef CONVRNN_CONV_AVX2  // AVX-512 where the CPU has it, else AVX2 + FMA
  if (std::is_same<T, float>::value && vector_forms_run()) {
    auto f = cpu_has_avx512f() ? wgt_rows_avx512 : wgt_rows_avx2;
    f(reinterpret_cast<const float*>(x), x_ps, x_rs, L, reinterpret_cast<const float*>(go), go_ps, go_rs, b.width,
      b.valid, nrows, npix, reinterpret_cast<float*>(part));
    return;
  }
#endif
  wgt_rows_generic<T>(x, x_ps, x_rs, L, go, go_ps, go_rs, b.width, b.valid, nrows, npix, part);
}

// pb[k] += sum over npix pixels of go[q*K + k].
template <typename T>
CONVRNN_CPU_CLONES void add_pixels(T* __restrict pb, const T* __restrict go, int64_t npix, int64_t K) {
  for (int64_t q = 0; q < npix; ++q)
    for (int64_t k = 0; k < K; ++k) pb[k] += go[q * K + k];
}

template <typename T>
void dw_pixels(const T* const* xp, int64_t xoff, const TapList& taps, const T* w, int64_t wstride, int64_t nc,
               T* const* op, int64_t ooff, int64_t npix, const T* bias) {
  if (npix <= 0) return;
#ifdef CONVRNN_CONV_AVX512
  if (std::is_same<T, float>::value && cpu_has_avx512f()) {
    dw_pixels_avx512(reinterpret_cast<const float* const*>(xp), xoff, taps.in.data(), taps.w.data(), taps.size(),
                     reinterpret_cast<const float*>(w), wstride, nc, reinterpret_cast<float* const*>(op), ooff, npix,
                     reinterpret_cast<const float*>(bias));
    return;
  }
#endif
  dw_pixels_generic<T>(xp, xoff, taps.in.data(), taps.w.data(), taps.size(), w, wstride, nc, op, ooff, npix, bias);
}

template <typename T>
void dw_wgt_rows(const T* x, int64_t x_ps, const TapList& taps, const T* go, int64_t go_ps, int64_t nc, int64_t npix,
                 T* part, int64_t wstride) {
  if (npix <= 0) return;
#ifdef CONVRNN_CONV_AVX512
  if (std::is_same<T, float>::value && cpu_has_avx512f()) {
    dw_wgt_rows_avx512(reinterpret_cast<const float*>(x), x_ps, taps.in.data(), taps.w.data(), taps.size(),
                       reinterpret_cast<const float*>(go), go_ps, nc, npix, reinterpret_cast<float*>(part), wstride);
    return;
  }
#endif
  dw_wgt_rows_generic<T>(x, x_ps, taps.in.data(), taps.w.data(), taps.size(), go, go_ps, nc, npix, part, wstride);
}

// ----------------------------------------------------------------------------------------
// Layouts.

// Depthwise with one output per channel: vectorised over channels.
bool depthwise_path(const Conv2d& g) { return g.depthwise() && g.Kg == 1; }

// Fold the S taps and C channels of a filter row into one reduction (contiguous in NHWC).
bool fold_forward(const Conv2d& g) { return g.groups == 1 && g.dw == 1; }
bool fold_backward_data(const Conv2d& g) { return g.groups == 1 && g.dw == 1 && g.sw == 1; }

// The taps of the forward and weight-gradient GEMMs over a padded NHWC image of row width
// Wp: one per filter row when the S taps and C channels of a row fold into one reduction of
// length S*C (fold), else one per (r, s) with reduction length Cg.
TapList image_taps(const Conv2d& g, int64_t Wp, bool fold) {
  TapList taps;
  if (fold) {
    taps.L = g.S * g.C;
    for (int64_t r = 0; r < g.R; ++r) {
      taps.in.push_back(r * g.dh * Wp * g.C);
      taps.w.push_back(r);
    }
  } else {
    taps.L = g.Cg;
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t s = 0; s < g.S; ++s) {
        taps.in.push_back((r * g.dh * Wp + s * g.dw) * g.C);
        taps.w.push_back(r * g.S + s);
      }
  }
  return taps;
}

// ---- layout copies (torch's copy_ of a permuted view runs ~1 GB/s here; these are tiled) ----

// Rows [0, nrows) of one NCHW image (C planes of H x W) into NHWC rows of a (Hp, Wp, C)
// buffer at (top, left): dst[(h+top)*Wp + left + w][c] = src[c][h][w].  16 x 16 tiles.
template <typename T>
CONVRNN_CPU_CLONES void nchw_rows_to_nhwc(const T* __restrict src, T* __restrict dst, int64_t C, int64_t H,
                                          int64_t W, int64_t h0, int64_t h1, int64_t Wp, int64_t left,
                                          bool skip_full) {
  constexpr int64_t TB = 16;
  for (int64_t h = h0; h < h1; ++h) {
    const T* s = src + h * W;
    T* d = dst + (h * Wp + left) * C;
    for (int64_t c0 = 0; c0 < C; c0 += TB) {
      const int64_t nc = std::min(TB, C - c0);
      for (int64_t w0 = 0; w0 < W; w0 += TB) {
        const int64_t nw = std::min(TB, W - w0);
        if (nc == TB && nw == TB) {
          if (skip_full) continue;
          for (int64_t w = 0; w < TB; ++w)
            for (int64_t c = 0; c < TB; ++c) d[(w0 + w) * C + c0 + c] = s[(c0 + c) * H * W + w0 + w];
        } else {
          for (int64_t w = 0; w < nw; ++w)
            for (int64_t c = 0; c < nc; ++c) d[(w0 + w) * C + c0 + c] = s[(c0 + c) * H * W + w0 + w];
        }
      }
    }
  }
}

// The reverse: dst[c][h][w] = src[h*W + w][c] for rows [h0, h1) of one image.
template <typename T>
CONVRNN_CPU_CLONES void nhwc_rows_to_nchw(const T* __restrict src, T* __restrict dst, int64_t C, int64_t H,
                                          int64_t W, int64_t h0, int64_t h1, bool skip_full) {
  constexpr int64_t TB = 16;
  for (int64_t h = h0; h < h1; ++h) {
    const T* s = src + h * W * C;
    T* d = dst + h * W;
    for (int64_t c0 = 0; c0 < C; c0 += TB) {
      const int64_t nc = std::min(TB, C - c0);
      for (int64_t w0 = 0; w0 < W; w0 += TB) {
        const int64_t nw = std::min(TB, W - w0);
        if (nc == TB && nw == TB) {
          if (skip_full) continue;
          for (int64_t c = 0; c < TB; ++c)
            for (int64_t w = 0; w < TB; ++w) d[(c0 + c) * H * W + w0 + w] = s[(w0 + w) * C + c0 + c];
        } else {
          for (int64_t c = 0; c < nc; ++c)
            for (int64_t w = 0; w < nw; ++w) d[(c0 + c) * H * W + w0 + w] = s[(w0 + w) * C + c0 + c];
        }
      }
    }
  }
}

// Scratch buffers for the layout copies, kept per calling thread between calls: a fresh
// tensor of this size is a fresh mmap whose pages fault on first touch (more than the copy
// itself costs).  One buffer per slot (at most kScratchBytes each; larger requests get a
// fresh tensor); a slot is used once per op call.  Never returned to the caller.  The cap
// bounds what a thread holds between calls to 4 x 64 MiB; every layer of the benchmark fits.
enum ScratchSlot { kScratchInput = 0, kScratchOutput = 1, kScratchGradOut = 2, kScratchGradOutW = 3, kScratchSlots = 4 };
constexpr int64_t kScratchBytes = int64_t(64) << 20;

Tensor scratch(int slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  thread_local Tensor cache[kScratchSlots];
  int64_t numel = 1;
  for (int64_t v : sizes) numel *= v;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
  if (bytes > kScratchBytes || bytes == 0) return at::empty(sizes, opts.memory_format(at::MemoryFormat::Contiguous));
  Tensor& c = cache[slot];
  if (!c.defined() || c.numel() < bytes) c = at::empty({bytes}, opts.dtype(at::kByte).memory_format(at::MemoryFormat::Contiguous));
  return c.narrow(0, 0, bytes).view(c10::typeMetaToScalarType(opts.dtype())).view(sizes);
}

// The layout copies' parallel split: rows [r0, r1) of image n, about 4096 elements a task
// (row_elems each), f(n, r0, r1) once per task.
template <typename F>
void for_row_tasks(int64_t N, int64_t rows, int64_t row_elems, const F& f) {
  const int64_t rows_per_task = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, row_elems));
  const int64_t tasks_per_image = ceil_div(rows, rows_per_task);
  at::parallel_for(0, N * tasks_per_image, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t r0 = (task % tasks_per_image) * rows_per_task;
      f(task / tasks_per_image, r0, std::min(rows, r0 + rows_per_task));
    }
  });
}

// A zero-padded NHWC copy (N, H+top+bottom, W+left+right, C) of a 4-D (N, C, H, W) tensor in
// dtype `dt` (a view without copy where the tensor is already NHWC and no padding is asked).
Tensor padded_nhwc(const Tensor& t, int64_t top, int64_t bottom, int64_t left, int64_t right, at::ScalarType dt,
                   int slot) {
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  Tensor src = t.to(dt);
  const bool cl = image_format(src) == at::MemoryFormat::ChannelsLast || src.is_contiguous(at::MemoryFormat::ChannelsLast);
  src = src.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (cl && top == 0 && bottom == 0 && left == 0 && right == 0) return src.permute({0, 2, 3, 1});
  const int64_t Hp = H + top + bottom, Wp = W + left + right;
  Tensor p = scratch(slot, {N, Hp, Wp, C}, src.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "convrnn.conv2d_layout", [&] {
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    scalar_t* d = p.data_ptr<scalar_t>();
    for_row_tasks(N, Hp, W * C, [&](int64_t n, int64_t r0, int64_t r1) {
      scalar_t* di = d + n * Hp * Wp * C;
      for (int64_t r = r0; r < r1; ++r) {  // zero the margins of these rows
        if (r < top || r >= top + H) {
          std::fill(di + r * Wp * C, di + (r + 1) * Wp * C, scalar_t(0));
        } else {
          std::fill(di + r * Wp * C, di + (r * Wp + left) * C, scalar_t(0));
          std::fill(di + (r * Wp + left + W) * C, di + (r + 1) * Wp * C, scalar_t(0));
        }
      }
      const int64_t h0 = std::max<int64_t>(r0 - top, 0), h1 = std::min<int64_t>(r1 - top, H);
      if (h1 <= h0) return;
      if (cl) {
        for (int64_t h = h0; h < h1; ++h)
          std::copy(s + (n * H + h) * W * C, s + (n * H + h + 1) * W * C, di + ((h + top) * Wp + left) * C);
      } else {
        bool fast = false;
#ifdef CONVRNN_CONV_AVX512
        if (std::is_same<scalar_t, float>::value && cpu_has_avx512f()) {
          nchw_rows_to_nhwc_avx512(reinterpret_cast<const float*>(s) + n * C * H * W,
                                   reinterpret_cast<float*>(di) + top * Wp * C, C, H, W, h0, h1, Wp, left);
          fast = true;
        }
#endif
        if (!fast) nchw_rows_to_nhwc<scalar_t>(s + n * C * H * W, di + top * Wp * C, C, H, W, h0, h1, Wp, left, false);
      }
    });
  });
  return p;
}

// An (N, C, H, W) result computed in NHWC (channels_last strides, compute dtype) in the
// layout g.format and dtype `out_dtype`.
Tensor to_format(const Tensor& nhwc, const Conv2d& g, at::ScalarType out_dtype) {
  if (g.format == at::MemoryFormat::ChannelsLast) return nhwc.to(out_dtype);
  const int64_t N = nhwc.size(0), C = nhwc.size(1), H = nhwc.size(2), W = nhwc.size(3);
  Tensor out = at::empty({N, C, H, W}, nhwc.options());
  AT_DISPATCH_FLOATING_TYPES(nhwc.scalar_type(), "convrnn.conv2d_layout", [&] {
    const scalar_t* s = nhwc.const_data_ptr<scalar_t>();
    scalar_t* d = out.data_ptr<scalar_t>();
    for_row_tasks(N, H, W * C, [&](int64_t n, int64_t h0, int64_t h1) {
      bool fast = false;
#ifdef CONVRNN_CONV_AVX512
      if (std::is_same<scalar_t, float>::value && cpu_has_avx512f()) {
        nhwc_rows_to_nchw_avx512(reinterpret_cast<const float*>(s) + n * H * W * C,
                                 reinterpret_cast<float*>(d) + n * C * H * W, C, H, W, h0, h1);
        fast = true;
      }
#endif
      if (!fast) nhwc_rows_to_nchw<scalar_t>(s + n * H * W * C, d + n * C * H * W, C, H, W, h0, h1, false);
    });
  });
  return out.to(out_dtype);
}

// Packed weights of every group, [g][block][r][s][l][width] (the general engine's layout).
// Forward: the blocks run over Kg outputs and l over Cg inputs.  Backward data: the blocks
// run over Cg and l over Kg, with the columns reversed (s' = S-1-s).
template <typename T>
std::vector<T> pack_weights(const T* w, const Conv2d& g, bool backward_data) {
  const int64_t O = backward_data ? g.Cg : g.Kg, Lc = backward_data ? g.Kg : g.Cg;
  const int64_t RS = g.R * g.S, gsize = packed_group_size(O, RS * Lc);
  std::vector<T> pk(gsize * g.groups, T(0));
  const auto blocks = channel_blocks(O);
  at::parallel_for(0, g.groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t gr = g0; gr < g1; ++gr) {
      for (const Block& b : blocks) {
        T* dst = pk.data() + gr * gsize + b.o0 * RS * Lc;
        for (int64_t r = 0; r < g.R; ++r)
          for (int64_t s = 0; s < g.S; ++s)
            for (int64_t l = 0; l < Lc; ++l)
              for (int64_t o = 0; o < b.valid; ++o) {
                const int64_t k = backward_data ? l : b.o0 + o, c = backward_data ? b.o0 + o : l;
                const int64_t ss = backward_data ? g.S - 1 - s : s;
                dst[((r * g.S + s) * Lc + l) * b.width + o] = w[(((gr * g.Kg + k) * g.Cg + c) * g.R + r) * g.S + ss];
              }
      }
    }
  });
  return pk;
}

// ----------------------------------------------------------------------------------------
// Forward.

template <typename T>
void forward_general(const T* xp, int64_t Hp, int64_t Wp, const T* w, const T* bias, T* y, const Conv2d& g) {
  const std::vector<T> pk = pack_weights<T>(w, g, false);
  const int64_t gsize = packed_group_size(g.Kg, g.R * g.S * g.Cg);
  const auto blocks = channel_blocks(g.Kg);
  const TapList taps = image_taps(g, Wp, fold_forward(g));
  // Tasks of kTaskPixels output pixels (flattened over n, p, q); per block and reduction
  // chunk, all the task's pixels, so that the chunk's weights are read from L1.
  const int64_t total = g.N * g.P * g.Q;
  std::vector<std::vector<RChunk>> plans;
  for (const Block& b : blocks) plans.push_back(reduction_chunks(taps, b.width));
  at::parallel_for(0, ceil_div(total, kTaskPixels), 1, [&](int64_t begin, int64_t end) {
    const T* xs[kTaskPixels];
    T* os[kTaskPixels];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t q0 = task * kTaskPixels, np = std::min(total, q0 + kTaskPixels) - q0;
      {
        int64_t q = q0 % g.Q, p = (q0 / g.Q) % g.P, n = q0 / (g.Q * g.P);  // advanced incrementally
        for (int64_t i = 0; i < np; ++i) {
          xs[i] = xp + ((n * Hp + p * g.sh) * Wp + q * g.sw) * g.C;
          os[i] = y + (q0 + i) * g.K;
          if (++q == g.Q) {
            q = 0;
            if (++p == g.P) p = 0, ++n;
          }
        }
      }
      for (int64_t gr = 0; gr < g.groups; ++gr) {
        for (size_t bi = 0; bi < blocks.size(); ++bi) {
          const Block& b = blocks[bi];
          const T* wb = pk.data() + gr * gsize + b.o0 * g.R * g.S * g.Cg;
          const T* bb = bias != nullptr ? bias + gr * g.Kg + b.o0 : nullptr;
          for (size_t ci = 0; ci < plans[bi].size(); ++ci)
            fwd_pixels<T>(xs, gr * g.Cg, taps, plans[bi][ci], ci > 0, wb, b, os, gr * g.Kg + b.o0, np, bb);
        }
      }
    }
  });
}

// Depthwise weights packed per tap, [r*S + s][round_up(C, 16)] (zero beyond C); the
// backward data uses the same table (its taps index it directly).
template <typename T>
std::vector<T> pack_depthwise(const T* w, const Conv2d& g, int64_t& wstride) {
  wstride = round_up(g.C, kLanes);
  std::vector<T> pk(g.R * g.S * wstride, T(0));
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t t = 0; t < g.R * g.S; ++t) pk[t * wstride + c] = w[c * g.R * g.S + t];
  return pk;
}

// Depthwise passes on the unpadded NHWC input, one output row (n, p) at a time: the taps
// of the rows inside the image; the columns q in [qa, qb) whose every tap is inside run
// as one pixel list, the border columns one by one with their own taps.
struct DwColumns {
  int64_t qa, qb;
};

DwColumns dw_interior(const Conv2d& g) {
  int64_t qa = ceil_div(g.pw, g.sw);
  int64_t qb = div_floor<int64_t>(g.W - 1 - (g.S - 1) * g.dw + g.pw, g.sw) + 1;
  qa = std::min(qa, g.Q);
  qb = std::max(qa, std::min(qb, g.Q));
  return {qa, qb};
}

// Taps of output row p (rows inside the image) and columns [s0, s1): offsets from the
// pixel's window origin (ih0, iw0) in the NHWC image, into t (its vectors reused: a row's
// lists were a few dozen allocations, per row of every depthwise call).
void dw_row_taps(const Conv2d& g, TapRange<int64_t> tr, int64_t s0, int64_t s1, TapList& t) {
  t.in.clear();
  t.w.clear();
  for (int64_t r = tr.lo; r < tr.hi; ++r)
    for (int64_t s = s0; s < s1; ++s) {
      t.in.push_back((r * g.dh * g.W + s * g.dw) * g.C);
      t.w.push_back(r * g.S + s);
    }
  t.L = 1;
}

template <typename T>
void forward_depthwise(const T* x, const T* w, const T* bias, T* y, const Conv2d& g) {
  int64_t wstride = 0;
  const std::vector<T> pk = pack_depthwise<T>(w, g, wstride);
  const DwColumns cols = dw_interior(g);
  at::parallel_for(0, g.N * g.P, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> xs(g.Q);
    std::vector<T*> os(g.Q);
    TapList inner, border;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.P, p = row % g.P, ih0 = p * g.sh - g.ph;
      const auto tr = conv_taps<int64_t>(ih0, g.H, g.R, g.dh);
      const T* img = x + (n * g.H + ih0) * g.W * g.C;  // window origin row (may lie above the image)
      for (int64_t q = 0; q < g.Q; ++q) {
        xs[q] = img + (q * g.sw - g.pw) * g.C;
        os[q] = y + (row * g.Q + q) * g.K;
      }
      dw_row_taps(g, tr, 0, g.S, inner);
      for (int64_t q = 0; q < g.Q; ++q) {
        if (q == cols.qa && cols.qb > cols.qa) {
          for (int64_t c0 = 0; c0 < g.C; c0 += kBlock)
            dw_pixels<T>(xs.data() + q, c0, inner, pk.data() + c0, wstride, std::min<int64_t>(kBlock, g.C - c0),
                         os.data() + q, c0, cols.qb - cols.qa, bias != nullptr ? bias + c0 : nullptr);
          q = cols.qb - 1;
          continue;
        }
        const auto ts = conv_taps<int64_t>(q * g.sw - g.pw, g.W, g.S, g.dw);
        dw_row_taps(g, tr, ts.lo, ts.hi, border);
        for (int64_t c0 = 0; c0 < g.C; c0 += kBlock)
          dw_pixels<T>(xs.data() + q, c0, border, pk.data() + c0, wstride, std::min<int64_t>(kBlock, g.C - c0),
                       os.data() + q, c0, 1, bias != nullptr ? bias + c0 : nullptr);
      }
    }
  });
}

// Stride-1 depthwise backward data (channels_last): grad_input is the depthwise forward of
// grad_output with every filter flipped (tap (r, s) -> (R-1-r, S-1-s)) and padding
// (R-1)*d - p along each axis, so forward_depthwise runs it on grad_output as it is, where
// the general backward_data first copied grad_output into a zero-padded buffer (an extra pass
// over it: 1.69 ms against the forward's 1.03 for the depthwise 3x3 layer, 2 threads).  The
// same products, each output's taps in the forward's order over the flipped filter.
bool depthwise_flip_path(const Conv2d& g) {
  return depthwise_path(g) && g.sh == 1 && g.sw == 1 && g.ph <= (g.R - 1) * g.dh && g.pw <= (g.S - 1) * g.dw;
}

template <typename T>
void backward_data_depthwise_flip(const T* go, const T* w, T* gx, const Conv2d& g) {
  const int64_t RS = g.R * g.S;
  std::vector<T> flipped(g.C * RS);
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t t = 0; t < RS; ++t) flipped[c * RS + t] = w[c * RS + RS - 1 - t];
  Conv2d f = g;  // grad_output (P x Q) in, grad_input (H x W) out
  f.H = g.P, f.W = g.Q, f.P = g.H, f.Q = g.W;
  f.ph = (g.R - 1) * g.dh - g.ph, f.pw = (g.S - 1) * g.dw - g.pw;
  forward_depthwise<T>(go, flipped.data(), nullptr, gx, f);
}

// Depthwise weight gradient partials (chunks of output rows as the general path), from
// the unpadded NHWC input: part[(r*S + s)*wstride + c].
template <typename T>
void backward_weight_depthwise(const T* x, const T* go, const Conv2d& g, T* part_w, int64_t psize, T* part_b,
                               int64_t count, int64_t rows) {
  const int64_t wstride = round_up(g.C, kLanes);
  const DwColumns cols = dw_interior(g);
  at::parallel_for(0, count, 1, [&](int64_t c0, int64_t c1) {
    TapList inner, border;
    for (int64_t c = c0; c < c1; ++c) {
      T* pw = part_w + c * psize;
      std::fill(pw, pw + psize, T(0));
      const int64_t rb = c * rows / count, re = (c + 1) * rows / count;
      if (part_b != nullptr) {
        T* pb = part_b + c * g.K;
        std::fill(pb, pb + g.K, T(0));
        add_pixels<T>(pb, go + rb * g.Q * g.K, (re - rb) * g.Q, g.K);
      }
      for (int64_t row = rb; row < re; ++row) {
        const int64_t n = row / g.P, p = row % g.P, ih0 = p * g.sh - g.ph;
        const auto tr = conv_taps<int64_t>(ih0, g.H, g.R, g.dh);
        const T* img = x + (n * g.H + ih0) * g.W * g.C;
        const T* gr = go + row * g.Q * g.K;
        if (cols.qb > cols.qa) {
          dw_row_taps(g, tr, 0, g.S, inner);
          dw_wgt_rows<T>(img + (cols.qa * g.sw - g.pw) * g.C, g.sw * g.C, inner, gr + cols.qa * g.K, g.K, g.C,
                         cols.qb - cols.qa, pw, wstride);
        }
        for (int64_t q = 0; q < g.Q; ++q) {
          if (q >= cols.qa && q < cols.qb) continue;
          const auto ts = conv_taps<int64_t>(q * g.sw - g.pw, g.W, g.S, g.dw);
          dw_row_taps(g, tr, ts.lo, ts.hi, border);
          dw_wgt_rows<T>(img + (q * g.sw - g.pw) * g.C, 0, border, gr + q * g.K, g.K, g.C, 1, pw, wstride);
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------------------
// Backward data.

// grad_output in a zero-padded NHWC buffer with the margins the phase taps reach.
struct GoPad {
  Tensor t;
  int64_t top, left, Pg, Qg;
};

GoPad pad_grad_output(const Tensor& go, const Conv2d& g, at::ScalarType dt) {
  GoPad r;
  r.top = ceil_div((g.R - 1) * g.dh, g.sh);
  r.left = ceil_div((g.S - 1) * g.dw, g.sw);
  const int64_t bottom = std::max<int64_t>(0, (g.H - 1 + g.ph) / g.sh - (g.P - 1));
  const int64_t right = std::max<int64_t>(0, (g.W - 1 + g.pw) / g.sw - (g.Q - 1));
  r.t = padded_nhwc(go, r.top, bottom, r.left, right, dt, kScratchGradOut);
  r.Pg = g.P + r.top + bottom;
  r.Qg = g.Q + r.left + right;
  return r;
}

// Taps of input phase (phi, psi): rows r with (phi - r*dh) % sh == 0 read grad_output row
// a + (phi - r*dh)/sh, likewise columns.  Offsets relative to the pixel (a, b).
TapList phase_taps(const Conv2d& g, int64_t phi, int64_t psi, int64_t Qg, int64_t Ch, bool fold, bool depthwise) {
  TapList t;
  for (int64_t r = 0; r < g.R; ++r) {
    const int64_t dr = phi - r * g.dh;
    if (dr % g.sh != 0) continue;
    const int64_t ro = dr / g.sh;
    if (fold) {
      t.in.push_back((ro * Qg - (g.S - 1)) * Ch);
      t.w.push_back(r);
      continue;
    }
    for (int64_t s = 0; s < g.S; ++s) {
      const int64_t dc = psi - s * g.dw;
      if (dc % g.sw != 0) continue;
      t.in.push_back((ro * Qg + dc / g.sw) * Ch);
      t.w.push_back(depthwise ? r * g.S + s : r * g.S + (g.S - 1 - s));
    }
  }
  t.L = fold ? g.S * g.K : (depthwise ? 1 : g.Kg);
  return t;
}

template <typename T>
void backward_data(const T* gp, const GoPad& gpad, const T* w, T* gx, const Conv2d& g) {
  const bool dw_path = depthwise_path(g);
  const bool fold = !dw_path && fold_backward_data(g);
  std::vector<T> pk;
  int64_t wstride = 0;
  if (dw_path) {
    pk = pack_depthwise<T>(w, g, wstride);
  } else {
    pk = pack_weights<T>(w, g, true);
  }
  const int64_t gsize = packed_group_size(g.Cg, g.R * g.S * g.Kg);
  const auto blocks = channel_blocks(g.Cg);
  std::vector<TapList> phases(g.sh * g.sw);
  for (int64_t phi = 0; phi < g.sh; ++phi)
    for (int64_t psi = 0; psi < g.sw; ++psi) phases[phi * g.sw + psi] = phase_taps(g, phi, psi, gpad.Qg, g.K, fold, dw_path);
  // Per phase and block, the reduction chunks of its taps.
  std::vector<std::vector<std::vector<RChunk>>> plans(phases.size());
  for (size_t ph = 0; ph < phases.size(); ++ph)
    for (const Block& b : blocks) plans[ph].push_back(reduction_chunks(phases[ph], b.width));
  // Pixels of each phase (phi, psi): rows i = i0 + sh*ii, columns j = j0 + sw*jj, flattened
  // over (n, ii, jj) and cut into tasks of kTaskPixels.
  struct PhaseGeo {
    int64_t i0, ni, j0, nj, task0;
  };
  std::vector<PhaseGeo> pg;
  int64_t ntasks = 0;
  for (int64_t phi = 0; phi < g.sh; ++phi)
    for (int64_t psi = 0; psi < g.sw; ++psi) {
      PhaseGeo e;
      e.i0 = ((phi - g.ph) % g.sh + g.sh) % g.sh;
      e.j0 = ((psi - g.pw) % g.sw + g.sw) % g.sw;
      e.ni = e.i0 < g.H ? (g.H - 1 - e.i0) / g.sh + 1 : 0;
      e.nj = e.j0 < g.W ? (g.W - 1 - e.j0) / g.sw + 1 : 0;
      e.task0 = ntasks;
      ntasks += ceil_div(g.N * e.ni * e.nj, kTaskPixels);
      pg.push_back(e);
    }
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    const T* xs[kTaskPixels];
    T* os[kTaskPixels];
    for (int64_t task = begin; task < end; ++task) {
      size_t ph = 0;
      while (ph + 1 < pg.size() && pg[ph + 1].task0 <= task) ++ph;
      const PhaseGeo& e = pg[ph];
      const int64_t total = g.N * e.ni * e.nj;
      const int64_t q0 = (task - e.task0) * kTaskPixels, np = std::min(total, q0 + kTaskPixels) - q0;
      {
        int64_t jj = q0 % e.nj, ii = (q0 / e.nj) % e.ni, n = q0 / (e.nj * e.ni);  // advanced incrementally
        const int64_t a0 = (e.i0 + g.ph) / g.sh, b0 = (e.j0 + g.pw) / g.sw;  // (i + ph)/sh = a0 + ii
        for (int64_t k = 0; k < np; ++k) {
          const int64_t i = e.i0 + ii * g.sh, j = e.j0 + jj * g.sw;
          xs[k] = gp + ((n * gpad.Pg + a0 + ii + gpad.top) * gpad.Qg + b0 + jj + gpad.left) * g.K;
          os[k] = gx + ((n * g.H + i) * g.W + j) * g.C;
          if (++jj == e.nj) {
            jj = 0;
            if (++ii == e.ni) ii = 0, ++n;
          }
        }
      }
      const TapList& taps = phases[ph];
      if (dw_path) {
        for (int64_t c0 = 0; c0 < g.C; c0 += kBlock)
          dw_pixels<T>(xs, c0, taps, pk.data() + c0, wstride, std::min<int64_t>(kBlock, g.C - c0), os, c0, np, nullptr);
        continue;
      }
      for (int64_t gr = 0; gr < g.groups; ++gr) {
        for (size_t bi = 0; bi < blocks.size(); ++bi) {
          const Block& b = blocks[bi];
          const T* wb = pk.data() + gr * gsize + b.o0 * g.R * g.S * g.Kg;
          const auto& plan = plans[ph][bi];
          for (size_t ci = 0; ci < plan.size(); ++ci)
            fwd_pixels<T>(xs, gr * g.Kg, taps, plan[ci], ci > 0, wb, b, os, gr * g.Cg + b.o0, np, nullptr);
        }
      }
    }
  });
}

// Backward data for a few input channels (C <= 8, groups 1, column dilation 1): the
// channel blocks of the general path would fill C of 16 lanes.  Instead each grad_output
// pixel (p, q) adds, for each filter row r, the S*C values
//   v[s*C + c] = sum_k go[p][q][k] * w[k][c][r][s]
// to the padded grad_input row p*sh + r*dh at columns q*sw .. q*sw + S-1: the engine with
// the S*C lanes as outputs and K as the reduction, in scatter-add mode (pixel by pixel, in
// order; the windows of neighbouring pixels overlap).  One task per grad_input row (n, i)
// owns a zeroed padded row buffer; the rows p*sh + r*dh = i + ph are visited in r order.
bool small_c_backward_data(const Conv2d& g) {
  return g.groups == 1 && g.dw == 1 && g.C <= 8 && !depthwise_path(g);
}

template <typename T>
void backward_data_small_c(const T* go, const T* w, T* gx, const Conv2d& g) {
  const int64_t J = g.S * g.C;
  const auto blocks = channel_blocks(J);
  std::vector<T> pk(packed_group_size(J, g.R * g.K), T(0));
  for (const Block& b : blocks)
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t k = 0; k < g.K; ++k)
        for (int64_t o = 0; o < b.valid; ++o) {
          const int64_t j = b.o0 + o, s = j / g.C, c = j % g.C;
          pk[b.o0 * g.R * g.K + (r * g.K + k) * b.width + o] = w[((k * g.C + c) * g.R + r) * g.S + s];
        }
  std::vector<TapList> taps(g.R);
  for (int64_t r = 0; r < g.R; ++r) {
    taps[r].in = {0};
    taps[r].w = {r};
    taps[r].L = g.K;
  }
  std::vector<std::vector<RChunk>> plans;
  for (const Block& b : blocks) plans.push_back(reduction_chunks(taps[0], b.width));
  const int64_t Wb = (g.W + 2 * g.pw + g.S + 16) * g.C;
  at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rowbuf(Wb);
    std::vector<const T*> xs(g.Q);
    std::vector<T*> os(g.Q);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.H, ip = row % g.H + g.ph;
      std::fill(rowbuf.begin(), rowbuf.end(), T(0));
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t t = ip - r * g.dh;
        if (t < 0 || t % g.sh != 0 || t / g.sh >= g.P) continue;
        const int64_t p = t / g.sh;
        for (int64_t q = 0; q < g.Q; ++q) {
          xs[q] = go + ((n * g.P + p) * g.Q + q) * g.K;
          os[q] = rowbuf.data() + q * g.sw * g.C;
        }
        for (size_t bi = 0; bi < blocks.size(); ++bi)
          for (const RChunk& ch : plans[bi])
            fwd_pixels<T>(xs.data(), 0, taps[r], ch, kScatterAdd, pk.data() + blocks[bi].o0 * g.R * g.K, blocks[bi],
                          os.data(), blocks[bi].o0, g.Q, nullptr);
      }
      std::copy(rowbuf.data() + g.pw * g.C, rowbuf.data() + (g.pw + g.W) * g.C, gx + row * g.W * g.C);
    }
  });
}

// ----------------------------------------------------------------------------------------
// Backward weight and bias: per-chunk partials in the forward's packed layout.

struct Chunks {
  int64_t count, rows;
  int64_t begin(int64_t c) const { return c * rows / count; }
};

Chunks weight_chunks(const Conv2d& g) {
  const int64_t rows = g.N * g.P;
  return {std::max<int64_t>(1, std::min<int64_t>(rows, kMaxChunks)), rows};
}

// part_w: chunks x (packed weights); part_b: chunks x K (may be null).
template <typename T>
void backward_weight_partials(const T* xp, int64_t Hp, int64_t Wp, const T* go, const Conv2d& g, T* part_w,
                              int64_t psize, T* part_b) {
  const Chunks ch = weight_chunks(g);
  const bool dw_path = depthwise_path(g);
  const bool fold = !dw_path && fold_forward(g);
  const int64_t gsize = packed_group_size(g.Kg, g.R * g.S * g.Cg);
  const auto blocks = channel_blocks(g.Kg);
  const TapList taps = image_taps(g, Wp, fold);
  // Tiles of about kWgtTile pixels (whole rows, or column segments of long rows): a tile's
  // grad_output and input lines stay in L1 while the kernel runs over its reduction blocks.
  constexpr int64_t kWgtTile = 96;
  const int64_t rows_per_tile = std::max<int64_t>(1, kWgtTile / g.Q);
  const int64_t segs = ceil_div(g.Q, kWgtTile), seg_len = ceil_div(g.Q, segs);
  at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* pw = part_w + c * psize;
      std::fill(pw, pw + psize, T(0));
      T* pb = part_b != nullptr ? part_b + c * g.K : nullptr;
      if (pb != nullptr) std::fill(pb, pb + g.K, T(0));
      if (pb != nullptr) add_pixels<T>(pb, go + ch.begin(c) * g.Q * g.K, (ch.begin(c + 1) - ch.begin(c)) * g.Q, g.K);
      // Blocks outermost: one block's partial (its share of K*Cg*R*S) stays in L2 across tiles.
      for (const Block& b : blocks) {
        for (int64_t row = ch.begin(c); row < ch.begin(c + 1);) {
          const int64_t n = row / g.P, p = row % g.P;
          const int64_t nrows = std::min({rows_per_tile, ch.begin(c + 1) - row, g.P - p});
          const T* in_rows = xp + (n * Hp + p * g.sh) * Wp * g.C;
          const T* go_rows = go + row * g.Q * g.K;
          row += nrows;
          for (int64_t q0 = 0; q0 < g.Q; q0 += seg_len) {
            const int64_t nq = std::min(seg_len, g.Q - q0);
            for (int64_t gr = 0; gr < g.groups; ++gr) {
              const T* in = in_rows + q0 * g.sw * g.C + gr * g.Cg;
              const T* go_seg = go_rows + q0 * g.K + gr * g.Kg + b.o0;
              for (int t = 0; t < taps.size(); ++t) {
                T* dst = pw + gr * gsize + b.o0 * g.R * g.S * g.Cg + taps.w[t] * taps.L * b.width;
                wgt_rows<T>(in + taps.in[t], g.sw * g.C, g.sh * Wp * g.C, taps.L, go_seg, g.K, g.Q * g.K, b, nrows, nq,
                            dst);
              }
            }
          }
        }
      }
    }
  });
}

// part[0][i] = part[0][i] + part[1][i] + ... (in chunk order) for i in [i0, i1).
template <typename T>
CONVRNN_CPU_CLONES void sum_chunks(T* __restrict part, int64_t psize, int64_t count, int64_t i0, int64_t i1) {
  for (int64_t ci = 1; ci < count; ++ci) {
    const T* __restrict src = part + ci * psize;
    for (int64_t i = i0; i < i1; ++i) part[i] += src[i];
  }
}

// Sum of the partials in chunk order (contiguous, into chunk 0), unpacked to (K, Cg, R, S).
// Each element is ((p0 + p1) + p2) + ...: the same order for any thread count.
template <typename T, typename O>
void reduce_weight(T* part_w, int64_t psize, int64_t count, const Conv2d& g, O* gw) {
  const bool dw_path = depthwise_path(g);
  const int64_t gsize = packed_group_size(g.Kg, g.R * g.S * g.Cg);
  const int64_t RS = g.R * g.S;
  const int64_t wstride = round_up(g.C, kLanes);
  at::parallel_for(0, psize, 4096, [&](int64_t i0, int64_t i1) { sum_chunks<T>(part_w, psize, count, i0, i1); });
  at::parallel_for(0, g.K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t gr = k / g.Kg, kk = k % g.Kg, bi = kk / kBlock, o = kk % kBlock;
      const int64_t width = std::min<int64_t>(kBlock, round_up(g.Kg - bi * kBlock, kLanes));
      for (int64_t c = 0; c < g.Cg; ++c)
        for (int64_t t = 0; t < RS; ++t) {
          const int64_t off = dw_path ? t * wstride + k
                                      : gr * gsize + bi * kBlock * RS * g.Cg + (t * g.Cg + c) * width + o;
          gw[(k * g.Cg + c) * RS + t] = static_cast<O>(part_w[off]);
        }
    }
  });
}

// ----------------------------------------------------------------------------------------
// Depthwise on NCHW (one output per channel): plane by plane, no layout copies.  Each plane
// is copied into a zero-padded local buffer (L1/L2-sized); the loops run along the rows.

// One padded plane (Hp x Wp, zero margins) from an H x W plane.
template <typename T>
CONVRNN_CPU_CLONES void pad_plane(const T* __restrict src, T* __restrict dst, int64_t H, int64_t W, int64_t ph,
                                  int64_t pw, int64_t Hp, int64_t Wp) {
  std::fill(dst, dst + Hp * Wp, T(0));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) dst[(h + ph) * Wp + pw + w] = src[h * W + w];
}

// out[p][q] = bias + sum_{r,s} w[r][s] * xp[(p*sh + r*dh)*Wp + q*sw + s*dw].
template <typename T, int SW>
CONVRNN_CPU_CLONES void dw_plane_forward(const T* __restrict xp, int64_t Wp, const T* __restrict w, T bias,
                                         T* __restrict out, int64_t P, int64_t Q, int64_t R, int64_t S, int64_t sh,
                                         int64_t sw_runtime, int64_t dh, int64_t dw) {
  const int64_t sw = SW > 0 ? SW : sw_runtime;
  constexpr int64_t QB = 64;
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t q0 = 0; q0 < Q; q0 += QB) {
      const int64_t nq = std::min(QB, Q - q0);
      T acc[QB];
      for (int64_t i = 0; i < QB; ++i) acc[i] = bias;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t s = 0; s < S; ++s) {
          const T wv = w[r * S + s];
          const T* __restrict row = xp + (p * sh + r * dh) * Wp + q0 * sw + s * dw;
          for (int64_t i = 0; i < nq; ++i) acc[i] += wv * row[i * sw];
        }
      for (int64_t i = 0; i < nq; ++i) out[p * Q + q0 + i] = acc[i];
    }
  }
}

// gxp[(p*sh + r*dh)*Wp + q*sw + s*dw] += w[r][s] * go[p][q] over a zeroed padded plane.
template <typename T, int SW>
CONVRNN_CPU_CLONES void dw_plane_backward_data(const T* __restrict go, const T* __restrict w, T* __restrict gxp,
                                               int64_t Wp, int64_t P, int64_t Q, int64_t R, int64_t S, int64_t sh,
                                               int64_t sw_runtime, int64_t dh, int64_t dw) {
  const int64_t sw = SW > 0 ? SW : sw_runtime;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t s = 0; s < S; ++s) {
        const T wv = w[r * S + s];
        T* __restrict row = gxp + (p * sh + r * dh) * Wp + s * dw;
        const T* __restrict g = go + p * Q;
        for (int64_t q = 0; q < Q; ++q) row[q * sw] += wv * g[q];
      }
}

// acc[(r*S + s)*16 + lane] += lane-wise partial dot products of go rows and padded input rows.
template <typename T, int SW>
CONVRNN_CPU_CLONES void dw_plane_weight(const T* __restrict xp, int64_t Wp, const T* __restrict go,
                                        T* __restrict acc, int64_t P, int64_t Q, int64_t R, int64_t S, int64_t sh,
                                        int64_t sw_runtime, int64_t dh, int64_t dw) {
  const int64_t sw = SW > 0 ? SW : sw_runtime;
  constexpr int64_t V = 16;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t s = 0; s < S; ++s) {
      T a[V];
      for (int64_t i = 0; i < V; ++i) a[i] = acc[(r * S + s) * V + i];
      for (int64_t p = 0; p < P; ++p) {
        const T* __restrict row = xp + (p * sh + r * dh) * Wp + s * dw;
        const T* __restrict g = go + p * Q;
        for (int64_t q = 0; q < Q; q += V) {
          const int64_t m = std::min(V, Q - q);
          for (int64_t i = 0; i < m; ++i) a[i] += g[q + i] * row[(q + i) * sw];
        }
      }
      for (int64_t i = 0; i < V; ++i) acc[(r * S + s) * V + i] = a[i];
    }
}

// a[i % 16] += v[i] (lane-wise partial sums, a fixed order).
template <typename T>
CONVRNN_CPU_CLONES void add_lanes(T* __restrict a, const T* __restrict v, int64_t n) {
  for (int64_t q = 0; q < n; q += 16) {
    const int64_t m = std::min<int64_t>(16, n - q);
    for (int64_t i = 0; i < m; ++i) a[i] += v[q + i];
  }
}

template <typename T>
T lane_sum(const T* a) {  // fixed order
  T s = a[0];
  for (int i = 1; i < 16; ++i) s += a[i];
  return s;
}

template <typename F>
void with_sw(int64_t sw, const F& f) {
  if (sw == 1) {
    f(std::integral_constant<int, 1>());
  } else {
    f(std::integral_constant<int, 0>());
  }
}

// Runs body(plane, channel, buf, sw) over the N * C planes of a depthwise NCHW convolution in
// parallel; buf is a task's scratch of buf_size elements, sw an integral_constant: the column
// stride when it is 1, else 0 (any).
template <typename T, typename F>
void for_depthwise_planes(const Conv2d& g, int64_t buf_size, const F& body) {
  with_sw(g.sw, [&](auto sw) {
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t b, int64_t e) {
      std::vector<T> buf(buf_size);
      for (int64_t plane = b; plane < e; ++plane) body(plane, plane % g.C, buf.data(), sw);
    });
  });
}

template <typename T>
void forward_depthwise_nchw(const T* x, const T* w, const T* bias, T* y, const Conv2d& g) {
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw + g.sw * 16;
  for_depthwise_planes<T>(g, Hp * Wp, [&](int64_t plane, int64_t c, T* buf, auto sw) {
    constexpr int SW = decltype(sw)::value;
    pad_plane<T>(x + plane * g.H * g.W, buf, g.H, g.W, g.ph, g.pw, Hp, Wp);
#ifdef CONVRNN_CONV_AVX512
    if (std::is_same<T, float>::value && SW == 1 && cpu_has_avx512f()) {
      dw_plane_forward_avx512(reinterpret_cast<const float*>(buf), Wp, reinterpret_cast<const float*>(w) + c * g.R * g.S,
                              bias != nullptr ? static_cast<float>(bias[c]) : 0.f,
                              reinterpret_cast<float*>(y) + plane * g.P * g.Q, g.P, g.Q, g.R, g.S, g.sh, g.dh, g.dw);
      return;
    }
#endif
    dw_plane_forward<T, SW>(buf, Wp, w + c * g.R * g.S, bias != nullptr ? bias[c] : T(0), y + plane * g.P * g.Q, g.P,
                            g.Q, g.R, g.S, g.sh, g.sw, g.dh, g.dw);
  });
}

template <typename T>
void backward_data_depthwise_nchw(const T* go, const T* w, T* gx, const Conv2d& g) {
  const int64_t Hp = g.H + 2 * g.ph + g.sh * 2 + g.dh * g.R, Wp = g.W + 2 * g.pw + g.sw * 2 + g.dw * g.S;
  for_depthwise_planes<T>(g, Hp * Wp, [&](int64_t plane, int64_t c, T* buf, auto sw) {
    constexpr int SW = decltype(sw)::value;
    std::fill(buf, buf + Hp * Wp, T(0));
    dw_plane_backward_data<T, SW>(go + plane * g.P * g.Q, w + c * g.R * g.S, buf, Wp, g.P, g.Q, g.R, g.S, g.sh, g.sw,
                                  g.dh, g.dw);
    T* o = gx + plane * g.H * g.W;
    for (int64_t h = 0; h < g.H; ++h)
      std::copy(buf + (h + g.ph) * Wp + g.pw, buf + (h + g.ph) * Wp + g.pw + g.W, o + h * g.W);
  });
}

// Per channel (one task owns it, images in order): grad_weight (C, 1, R, S) and grad_bias.
template <typename T>
void backward_weight_depthwise_nchw(const T* x, const T* go, T* gw, T* gb, const Conv2d& g) {
  const int64_t Hp = g.H + 2 * g.ph + g.sh * 2, Wp = g.W + 2 * g.pw + g.sw * 16;
  const int64_t RS = g.R * g.S;
  with_sw(g.sw, [&](auto sw_c) {
    constexpr int SW = decltype(sw_c)::value;
    at::parallel_for(0, g.C, 1, [&](int64_t b, int64_t e) {
      std::vector<T> buf(Hp * Wp), acc(RS * 16), bacc(16);
      for (int64_t c = b; c < e; ++c) {
        std::fill(acc.begin(), acc.end(), T(0));
        std::fill(bacc.begin(), bacc.end(), T(0));
        for (int64_t n = 0; n < g.N; ++n) {
          const T* gp = go + (n * g.C + c) * g.P * g.Q;
          if (gw != nullptr) {
            pad_plane<T>(x + (n * g.C + c) * g.H * g.W, buf.data(), g.H, g.W, g.ph, g.pw, Hp, Wp);
#ifdef CONVRNN_CONV_AVX512
            if (std::is_same<T, float>::value && SW == 1 && cpu_has_avx512f()) {
              dw_plane_weight_avx512(reinterpret_cast<const float*>(buf.data()), Wp, reinterpret_cast<const float*>(gp),
                                     reinterpret_cast<float*>(acc.data()), g.P, g.Q, g.R, g.S, g.sh, g.dh, g.dw);
            } else
#endif
            dw_plane_weight<T, SW>(buf.data(), Wp, gp, acc.data(), g.P, g.Q, g.R, g.S, g.sh, g.sw, g.dh, g.dw);
          }
          if (gb != nullptr) add_lanes<T>(bacc.data(), gp, g.P * g.Q);
        }
        if (gw != nullptr)
          for (int64_t t = 0; t < RS; ++t) gw[c * RS + t] = lane_sum(acc.data() + t * 16);
        if (gb != nullptr) gb[c] = lane_sum(bacc.data());
      }
    });
  });
}

// ----------------------------------------------------------------------------------------
// 1x1 convolution (stride 1, no padding, groups 1) on NCHW float32, without layout copies:
// per image Y (K x HW) = W (K x C) X (C x HW), and grad_input (C x HW) = W^T (C x K) GO (K x HW).
// Register block: 6 output channels x 64 pixels; the reduction in chunks of 128 so that the
// X tile (128 x 64) stays in L1 while the blocks of output channels run over it.  Tasks are
// (image, 64-pixel tile).  The output must be the input's size (P = H, Q = W): stride 1 alone
// does not say so, since conv2d_geometry sets the stride of a dimension with one output to 1
// (a 1x1 kernel with stride 3 over W = 2 has Q = 1: the kernel would have written W pixels a
// row into an output of Q, past its end).
bool nchw_1x1_path(const Conv2d& g) {
  return g.one_by_one() && g.sh == 1 && g.sw == 1 && g.P == g.H && g.Q == g.W && g.groups == 1 && !g.channels_last();
}

#ifdef CONVRNN_CONV_AVX2
// a: (O x L) row-major (transposed when `transpose_a`: (L x O)); b: N images of (L x M);
// c: N images of (O x M).
void nchw_1x1(const float* a, bool transpose_a, const float* b, float* c, const float* bias, int64_t N, int64_t O,
              int64_t L, int64_t M) {
  constexpr int64_t MB = 6, TP = 64, LC = 128;
  const int64_t nb = ceil_div(O, MB);
  std::vector<float> pk(nb * L * MB, 0.f);  // [block][l][6]
  for (int64_t o = 0; o < O; ++o)
    for (int64_t l = 0; l < L; ++l) pk[((o / MB) * L + l) * MB + o % MB] = transpose_a ? a[l * O + o] : a[o * L + l];
  const int64_t tiles = ceil_div(M, TP);
  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, m0 = (task % tiles) * TP, nm = std::min(TP, M - m0);
      const float* bn = b + n * L * M + m0;
      float* cn = c + n * O * M + m0;
      for (int64_t l0 = 0; l0 < L; l0 += LC) {
        const int64_t nl = std::min(LC, L - l0);
        for (int64_t k = 0; k < nb; ++k) {
          const int mvalid = static_cast<int>(std::min(MB, O - k * MB));
          const float* ak = pk.data() + (k * L + l0) * MB;
          const float* bk = bias != nullptr ? bias + k * MB : nullptr;
#ifdef CONVRNN_CONV_AVX512
          if (cpu_has_avx512f()) {
            const int nvec = static_cast<int>(ceil_div(nm, 16));
            const __mmask16 last = lane_mask(nm - 16 * (nvec - 1));
            if (l0 == 0) {
              nchw1x1_block<false>(ak, bn + l0 * M, M, nl, cn + k * MB * M, M, bk, mvalid, nvec, last);
            } else {
              nchw1x1_block<true>(ak, bn + l0 * M, M, nl, cn + k * MB * M, M, nullptr, mvalid, nvec, last);
            }
            continue;
          }
#endif
          if (l0 == 0) {
            nchw1x1_block_avx2<false>(ak, bn + l0 * M, M, nl, cn + k * MB * M, M, bk, mvalid, nm);
          } else {
            nchw1x1_block_avx2<true>(ak, bn + l0 * M, M, nl, cn + k * MB * M, M, nullptr, mvalid, nm);
          }
        }
      }
    }
  });
}
#endif

// ----------------------------------------------------------------------------------------
// Entry points.

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Tensor conv2d_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Conv2d g = conv2d_geometry("conv2d", input, weight, bias, stride, padding, dilation, groups);
  const at::ScalarType dt = input.scalar_type(), ct = compute_type(dt);
  const auto opts = input.options().dtype(ct);
  if (g.N == 0) return conv2d_empty(g, g.output_sizes(), input.options());
#ifdef CONVRNN_CONV_AVX2
  if (nchw_1x1_path(g) && ct == at::kFloat && vector_forms_run()) {
    const Tensor x = input.to(ct).contiguous();
    const Tensor w = weight.to(ct).contiguous();
    const bool has_bias = bias.has_value() && bias->defined();
    const Tensor b = has_bias ? bias->to(ct).contiguous() : Tensor();
    Tensor out = at::empty({g.N, g.K, g.P, g.Q}, opts);
    nchw_1x1(w.const_data_ptr<float>(), false, x.const_data_ptr<float>(), out.data_ptr<float>(),
             has_bias ? b.const_data_ptr<float>() : nullptr, g.N, g.K, g.C, g.H * g.W);
    return out.to(dt);
  }
#endif
  if (depthwise_path(g) && !g.channels_last()) {
    const Tensor x = input.to(ct).contiguous();
    const Tensor w = weight.to(ct).contiguous();
    const bool has_bias = bias.has_value() && bias->defined();
    const Tensor b = has_bias ? bias->to(ct).contiguous() : Tensor();
    Tensor out = at::empty({g.N, g.K, g.P, g.Q}, opts);
    AT_DISPATCH_FLOATING_TYPES(ct, "convrnn.conv2d", [&] {
      forward_depthwise_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                       has_bias ? b.const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), g);
    });
    return out.to(dt);
  }
  // NHWC result: returned as it is for channels_last in the input dtype, else a scratch buffer.
  Tensor out = (g.channels_last() && dt == ct)
                   ? at::empty({g.N, g.K, g.P, g.Q}, opts.memory_format(at::MemoryFormat::ChannelsLast))
                   : scratch(kScratchOutput, {g.N, g.P, g.Q, g.K}, opts).permute({0, 3, 1, 2});
  const bool dwp = depthwise_path(g);  // reads the unpadded input
  const Tensor xp = dwp ? padded_nhwc(input, 0, 0, 0, 0, ct, kScratchInput)
                        : padded_nhwc(input, g.ph, g.ph, g.pw, g.pw, ct, kScratchInput);
  const Tensor w = weight.to(ct).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? bias->to(ct).contiguous() : Tensor();
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  AT_DISPATCH_FLOATING_TYPES(ct, "convrnn.conv2d", [&] {
    const scalar_t* x = xp.const_data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    if (dwp) {
      forward_depthwise<scalar_t>(x, w.const_data_ptr<scalar_t>(), bp, out.data_ptr<scalar_t>(), g);
    } else {
      forward_general<scalar_t>(x, Hp, Wp, w.const_data_ptr<scalar_t>(), bp, out.data_ptr<scalar_t>(), g);
    }
  });
  return to_format(out, g, dt);
}

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                                       const Tensor& weight, at::IntArrayRef stride,
                                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                                       int64_t groups, std::array<bool, 3> output_mask) {
  const Conv2d g = conv2d_backward_geometry("conv2d_backward", grad_output, input, weight, stride, padding, dilation,
                                            groups);
  const at::ScalarType dt = input.scalar_type(), ct = compute_type(dt);
  const auto opts = input.options();
  Tensor gi = conv2d_not_needed(opts), gw = conv2d_not_needed(opts), gb = conv2d_not_needed(opts);
  if (g.N == 0) {
    if (output_mask[0]) gi = conv2d_empty(g, g.input_sizes(), opts);
    if (output_mask[1]) gw = at::zeros(g.weight_sizes(), opts.memory_format(weight.suggest_memory_format()));
    if (output_mask[2]) gb = at::zeros({g.K}, opts);
    return {gi, gw, gb};
  }
  const Tensor w = weight.to(ct).contiguous();
  if (depthwise_path(g) && !g.channels_last()) {
    const Tensor go = grad_output.to(ct).contiguous();
    if (output_mask[0]) {
      Tensor gx = at::empty({g.N, g.C, g.H, g.W}, opts.dtype(ct));
      AT_DISPATCH_FLOATING_TYPES(ct, "convrnn.conv2d_backward", [&] {
        backward_data_depthwise_nchw<scalar_t>(go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                               gx.data_ptr<scalar_t>(), g);
      });
      gi = gx.to(dt);
    }
    if (output_mask[1] || output_mask[2]) {
      const Tensor x = output_mask[1] ? input.to(ct).contiguous() : Tensor();
      Tensor gwc = at::empty(g.weight_sizes(), opts.dtype(ct)), gbc = at::empty({g.K}, opts.dtype(ct));
      AT_DISPATCH_FLOATING_TYPES(ct, "convrnn.conv2d_backward", [&] {
        backward_weight_depthwise_nchw<scalar_t>(output_mask[1] ? x.const_data_ptr<scalar_t>() : nullptr,
                                                 go.const_data_ptr<scalar_t>(),
                                                 output_mask[1] ? gwc.data_ptr<scalar_t>() : nullptr,
                                                 output_mask[2] ? gbc.data_ptr<scalar_t>() : nullptr, g);
      });
      if (output_mask[1]) gw = gwc.to(dt);
      if (output_mask[2]) gb = gbc.to(dt);
    }
    return {gi, gw, gb};
  }
  // grad_input of the NHWC kernels: the result itself when channels_last in the compute
  // type, else scratch that to_format copies out
  const auto nhwc_grad_input = [&] {
    return (g.channels_last() && dt == ct)
               ? at::empty({g.N, g.C, g.H, g.W}, opts.dtype(ct).memory_format(at::MemoryFormat::ChannelsLast))
               : scratch(kScratchOutput, {g.N, g.H, g.W, g.C}, opts.dtype(ct)).permute({0, 3, 1, 2});
  };
#ifdef CONVRNN_CONV_AVX2
  if (output_mask[0] && nchw_1x1_path(g) && ct == at::kFloat && vector_forms_run()) {
    const Tensor go = grad_output.to(ct).contiguous();
    Tensor gx = at::empty({g.N, g.C, g.H, g.W}, opts.dtype(ct));
    nchw_1x1(w.const_data_ptr<float>(), true, go.const_data_ptr<float>(), gx.data_ptr<float>(), nullptr, g.N, g.C, g.K,
             g.H * g.W);
    gi = gx.to(dt);
  } else
#endif
  if (output_mask[0] && small_c_backward_data(g)) {
    const Tensor go = padded_nhwc(grad_output, 0, 0, 0, 0, ct, kScratchGradOut);  // (N, P, Q, K)
    Tensor gx = nhwc_grad_input();
    AT_DISPATCH_FLOATING_TYPES(ct, "convrnn.conv2d_backward", [&] {
      backward_data_small_c<scalar_t>(go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                      gx.data_ptr<scalar_t>(), g);
    });
    gi = to_format(gx, g, dt);
  } else if (output_mask[0] && depthwise_flip_path(g)) {
    const Tensor go = padded_nhwc(grad_output, 0, 0, 0, 0, ct, kScratchGradOut);  // (N, P, Q, K), a view when NHWC
    Tensor gx = nhwc_grad_input();
    AT_DISPATCH_FLOATING_TYPES(ct, "convrnn.conv2d_backward", [&] {
      backward_data_depthwise_flip<scalar_t>(go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                             gx.data_ptr<scalar_t>(), g);
    });
    gi = to_format(gx, g, dt);
  } else if (output_mask[0]) {
    const GoPad gpad = pad_grad_output(grad_output, g, ct);
    Tensor gx = nhwc_grad_input();
    AT_DISPATCH_FLOATING_TYPES(ct, "convrnn.conv2d_backward", [&] {
      backward_data<scalar_t>(gpad.t.const_data_ptr<scalar_t>(), gpad, w.const_data_ptr<scalar_t>(),
                              gx.data_ptr<scalar_t>(), g);
    });
    gi = to_format(gx, g, dt);
  }
  if (output_mask[1] || output_mask[2]) {
    const Tensor go = padded_nhwc(grad_output, 0, 0, 0, 0, ct, kScratchGradOutW);  // (N, P, Q, K)
    const Chunks ch = weight_chunks(g);
    const int64_t psize = depthwise_path(g) ? g.R * g.S * round_up(g.C, kLanes)
                                            : packed_group_size(g.Kg, g.R * g.S * g.Cg) * g.groups;
    const bool dwp = depthwise_path(g);  // reads the unpadded input
    const Tensor xp = !output_mask[1] ? Tensor()
                      : dwp           ? padded_nhwc(input, 0, 0, 0, 0, ct, kScratchInput)
                                      : padded_nhwc(input, g.ph, g.ph, g.pw, g.pw, ct, kScratchInput);
    const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
    AT_DISPATCH_FLOATING_TYPES(ct, "convrnn.conv2d_backward", [&] {
      using T = scalar_t;
      const T* gop = go.const_data_ptr<T>();
      if (output_mask[1]) {
        std::vector<T> part_w(ch.count * psize);
        std::vector<T> part_b(output_mask[2] ? ch.count * g.K : 0);
        if (dwp) {
          backward_weight_depthwise<T>(xp.const_data_ptr<T>(), gop, g, part_w.data(), psize,
                                       output_mask[2] ? part_b.data() : nullptr, ch.count, ch.rows);
        } else {
          backward_weight_partials<T>(xp.const_data_ptr<T>(), Hp, Wp, gop, g, part_w.data(), psize,
                                      output_mask[2] ? part_b.data() : nullptr);
        }
        Tensor gwc = at::empty(g.weight_sizes(), opts.dtype(ct));
        reduce_weight<T, T>(part_w.data(), psize, ch.count, g, gwc.data_ptr<T>());
        gw = gwc.to(dt);
        if (output_mask[2]) {
          Tensor gbc = at::empty({g.K}, opts.dtype(ct));
          T* o = gbc.data_ptr<T>();
          for (int64_t k = 0; k < g.K; ++k) {
            T s = part_b[k];
            for (int64_t c = 1; c < ch.count; ++c) s += part_b[c * g.K + k];
            o[k] = s;
          }
          gb = gbc.to(dt);
        }
      } else {
        // Bias only: per-chunk sums over the chunk's rows, added in chunk order.
        std::vector<T> part_b(ch.count * g.K, T(0));
        at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            add_pixels<T>(part_b.data() + c * g.K, gop + ch.begin(c) * g.Q * g.K,
                          (ch.begin(c + 1) - ch.begin(c)) * g.Q, g.K);
          }
        });
        Tensor gbc = at::empty({g.K}, opts.dtype(ct));
        T* o = gbc.data_ptr<T>();
        for (int64_t k = 0; k < g.K; ++k) {
          T s = part_b[k];
          for (int64_t c = 1; c < ch.count; ++c) s += part_b[c * g.K + k];
          o[k] = s;
        }
        gb = gbc.to(dt);
      }
    });
  }
  if (output_mask[1]) gw = gw.contiguous(weight.suggest_memory_format());  // torch's: the weight's layout
  return {gi, gw, gb};
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CPU, m) {
  m.impl("conv2d", &convrnn::conv2d_cpu);
  m.impl("conv2d_backward", &convrnn::conv2d_backward_cpu);
}
