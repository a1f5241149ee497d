// The work of one element of the CUDA max_pool2d kernels, as host-device functions (so that
// a CPU test can check them against max_window and the plain gather loops; nothing here
// needs the CUDA runtime).
//
// Forward, windows of compile-time size KH x KW (the common 2x2 and 3x3): a kernel first
// loads the windows of all its outputs (load_window) and only then scans them
// (max_loaded_window), so every load of a thread is in flight at once; a runtime-sized
// loop (max_window) issues them one after another.
// Backward, gather form: gather_grad sums grad_output over the outputs whose windows cover
// one input element and whose saved argmax is that element; with MH x MW (compile-time) an
// upper bound on the number of covering outputs it loads all of them before adding.
#pragma once

#include "cuda/pool_dims.cuh"
#include "max_pool2d.h"

namespace convrnn {

// Taps of the window at (hstart, wstart) of one plane (element (ih, iw) at
// plane[(ih*W + iw) * cstride]), row-major into v; taps outside the image (outside th x tw)
// read as -inf and touch no memory.
template <int KH, int KW, typename T, typename index_t>
CONVRNN_HD void load_window(const T* plane, index_t W, index_t cstride, index_t hstart, index_t wstart, Taps th,
                            Taps tw, index_t dh, index_t dw, T (&v)[KH * KW]) {
  const index_t tlo = static_cast<index_t>(th.lo), thi = static_cast<index_t>(th.hi);
  const index_t ulo = static_cast<index_t>(tw.lo), uhi = static_cast<index_t>(tw.hi);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int t = 0; t < KH; ++t) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int u = 0; u < KW; ++u) {
      const bool inside = t >= tlo && t < thi && u >= ulo && u < uhi;
      v[t * KW + u] = inside ? plane[((hstart + t * dh) * W + wstart + u * dw) * cstride]
                             : static_cast<T>(-static_cast<acc_t<T>>(INFINITY));
    }
  }
}

// max_window's result for a window loaded by load_window, whose first in-image tap is
// first_tap = th.lo*KW + tw.lo.  The same max and tap: the taps are scanned in the same
// row-major order from the same start, and a -inf (a tap outside the image) never
// displaces the running max, since max_takes(-inf, best) is false for every best.
template <int KH, int KW, typename T, typename index_t>
CONVRNN_HD void max_loaded_window(const T (&v)[KH * KW], index_t first_tap, acc_t<T>& best, index_t& tap) {
  using A = acc_t<T>;
  best = -static_cast<A>(INFINITY);
  tap = first_tap;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < KH * KW; ++k) {
    const A a = static_cast<A>(v[k]);
    if (max_takes(a, best)) {
      best = a;
      tap = static_cast<index_t>(k);
    }
  }
}

// Tap number at which the window of output (oh, ow) sees input (ih, iw), or -1 if it
// falls between dilated taps.  (ih, iw) lies in the window's extent.
template <typename index_t>
CONVRNN_HD index_t tap_of(const PoolDims<index_t>& d, index_t ih, index_t iw, index_t oh, index_t ow) {
  const index_t dy = ih - (oh * d.sh - d.ph), dx = iw - (ow * d.sw - d.pw);
  if (d.dh == 1 && d.dw == 1) return dy * d.kw + dx;
  if (dy % d.dh != 0 || dx % d.dw != 0) return -1;
  return (dy / d.dh) * d.kw + dx / d.dw;
}

// Strides as divisors (no divide instruction in covering_outputs).
template <typename index_t>
struct StrideDividers {
  Divider<index_t> sh, sw;
  StrideDividers(index_t sh_, index_t sw_) : sh(sh_), sw(sw_) {}
};

// Upper bound on the number of windows covering one input position along a dimension:
// ceil(extent / stride), extent = d(k-1) + 1.
inline int64_t max_covering(int64_t k, int64_t s, int64_t d) {
  return (d * (k - 1) + 1 + s - 1) / s;
}

// grad_input at input position p: the sum, over the outputs (a, b) whose windows cover p
// (a-major, b-minor: a fixed order, so deterministic), of grad_output where the saved tap is
// p.  MH, MW > 0: at most MH x MW covering outputs (max_covering), loaded unrolled; 0: any.
template <int MH, int MW, bool CL, typename T, typename index_t, typename tap_t>
CONVRNN_HD acc_t<T> gather_grad(const T* go, const tap_t* taps, const PoolDims<index_t>& d,
                                const StrideDividers<index_t>& sdiv, const Pos<index_t>& p) {
  const Taps oh = covering_outputs<index_t>(p.row, d.ph, d.dh * (d.kh - 1) + 1, sdiv.sh, d.OH);
  const Taps ow = covering_outputs<index_t>(p.col, d.pw, d.dw * (d.kw - 1) + 1, sdiv.sw, d.OW);
  acc_t<T> sum = 0;
  if constexpr (MH > 0 && MW > 0) {
    const index_t alo = static_cast<index_t>(oh.lo), ahi = static_cast<index_t>(oh.hi);
    const index_t blo = static_cast<index_t>(ow.lo), bhi = static_cast<index_t>(ow.hi);
    tap_t saved[MH * MW];
    T g[MH * MW];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < MH * MW; ++k) {
      const index_t a = alo + k / MW, b = blo + k % MW;
      const bool valid = a < ahi && b < bhi;
      const index_t o = valid ? output_index<CL>(p, d.OH, d.OW, d.C, a, b) : index_t(0);
      saved[k] = valid ? taps[o] : no_tap<tap_t>();
      g[k] = valid ? go[o] : static_cast<T>(0);
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < MH * MW; ++k) {
      const index_t a = alo + k / MW, b = blo + k % MW;
      if (saved[k] != no_tap<tap_t>() && static_cast<index_t>(saved[k]) == tap_of(d, p.row, p.col, a, b)) {
        sum += static_cast<acc_t<T>>(g[k]);
      }
    }
  } else {
    for (index_t a = oh.lo; a < oh.hi; ++a) {
      for (index_t b = ow.lo; b < ow.hi; ++b) {
        const index_t o = output_index<CL>(p, d.OH, d.OW, d.C, a, b);
        const tap_t saved = taps[o];
        if (saved != no_tap<tap_t>() && static_cast<index_t>(saved) == tap_of(d, p.row, p.col, a, b)) {
          sum += static_cast<acc_t<T>>(go[o]);
        }
      }
    }
  }
  return sum;
}

}  // namespace convrnn
