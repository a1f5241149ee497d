// The work of one element of the CUDA max_pool2d kernels, as host-device functions (so that
// a CPU test can check them against max_window and the plain gather loops; nothing here
// needs the CUDA runtime).
//
// Forward, windows of compile-time size KH x KW (the common 2x2 and 3x3): a kernel first
// loads the windows of all its outputs (load_window) and only then scans them
// (max_loaded_window), so every load of a thread is in flight at once; a runtime-sized
// loop (max_window) issues them one after another.  NCHW 3x3 windows with column stride 2
// (round 3): four outputs of a row share 9 columns, loaded in aligned vectors
// (load_rows_quad), and without argmax their values come from a cheaper separable max
// (max_values_quad) with the scan as fix-up where the order matters.
// Backward, cell form (cell_grads): the input is cut into cells of sh x sw positions, cell
// (A, B) holding the positions whose windows' starts round down to output (A, B); the
// windows that can cover a position of the cell are outputs [A - R, A] x [B - R, B]
// (R = cell_reach), so one thread per cell loads those few outputs' argmax and gradient
// once and writes every position of its cell (a sum over the matching outputs in a fixed
// order, 0 where none matches): index arithmetic once per cell, not per position.
// Backward, gather form (gather_grad), for windows reaching further: one input position
// sums grad_output over the outputs covering it whose saved argmax is that position.
#pragma once

#include <cstring>

#include "cuda/lanes.cuh"  // Lanes: L adjacent channels of channels_last in one access
#include "cuda/pool_dims.cuh"
#include "max_pool2d.h"

namespace convrnn {

// Taps of the window at (hstart, wstart) of one plane (element (ih, iw) at
// plane[(ih*W + iw) * cstride]), row-major into v[l] for each of the L channels
// plane + l (channels_last, L > 1: read together, one L-wide load a tap; plane aligned to
// the L-wide width); taps outside the image (outside th x tw) read as -inf and touch no
// memory.
template <int KH, int KW, int L, typename T, typename index_t>
CONVRNN_HD void load_window(const T* plane, index_t W, index_t cstride, index_t hstart, index_t wstart, Taps th,
                            Taps tw, index_t dh, index_t dw, T (&v)[L][KH * KW]) {
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
      Lanes<T, L> w;
      if (inside) {
        w = *reinterpret_cast<const Lanes<T, L>*>(plane + ((hstart + t * dh) * W + wstart + u * dw) * cstride);
      } else {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int l = 0; l < L; ++l) w.v[l] = static_cast<T>(-static_cast<acc_t<T>>(INFINITY));
      }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int l = 0; l < L; ++l) v[l][t * KW + u] = w.v[l];
    }
  }
}

// The windows of two horizontally adjacent outputs (ow, ow + 1) of one NCHW row, KH x KW
// taps with column stride 2 and column dilation 1, first window at (hstart, wstart): their
// taps span the KW + 2 columns wstart .. wstart + KW + 1, each loaded once (a row of the
// 2x2 pair, 4 columns, by one 4-wide load when it lies in the image and is aligned);
// v[l] is output ow + l's window, row-major, as load_window leaves it: taps outside the
// image (rows outside th, columns outside [0, W)) read as -inf and touch no memory.
template <int KH, int KW, typename T, typename index_t>
CONVRNN_HD void load_window_pair(const T* plane, index_t W, index_t hstart, index_t wstart, Taps th, index_t dh,
                                 T (&v)[2][KH * KW]) {
  constexpr int NC = KW + 2;
  const T ninf = static_cast<T>(-static_cast<acc_t<T>>(INFINITY));
  const index_t tlo = static_cast<index_t>(th.lo), thi = static_cast<index_t>(th.hi);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int t = 0; t < KH; ++t) {
    const bool row_in = t >= tlo && t < thi;
    const index_t roff = (hstart + t * dh) * W;
    T c[NC];
    bool vec = false;
    if constexpr (NC == 4 && sizeof(T) <= 4) {
      vec = row_in && wstart >= 0 && wstart + 4 <= W &&
            reinterpret_cast<uintptr_t>(plane + (row_in ? roff + wstart : index_t(0))) % (4 * sizeof(T)) == 0;
      if (vec) {
        const Lanes<T, 4> w = *reinterpret_cast<const Lanes<T, 4>*>(plane + roff + wstart);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int u = 0; u < 4; ++u) c[u] = w.v[u];
      }
    }
    if (!vec) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int u = 0; u < NC; ++u) {
        const index_t col = wstart + u;
        c[u] = row_in && col >= 0 && col < W ? plane[roff + col] : ninf;
      }
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int u = 0; u < KW; ++u) {
      v[0][t * KW + u] = c[u];
      v[1][t * KW + u] = c[u + 2];
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

// Round 3: four horizontally adjacent outputs (ow .. ow + 3) of one NCHW row, windows of
// KH x 3 taps with column stride 2 and column dilation 1 (the 3x3/2 pools).  Their taps
// span the 9 columns wstart .. wstart + 8, output l using columns 2l .. 2l + 2: 9 columns
// a row for 4 outputs (the pair's 5 for 2), read in as few aligned vector loads as the row's
// alignment allows, so load instructions, index work and the window bounds are spent once
// for four outputs.
constexpr int kQuadCols = 9;

// Widest piece that can start at element i of a run of n contiguous elements whose element
// 0 lies m elements past a V-element boundary: the largest power of two w <= V with
// (m + i) % w == 0 and i + w <= n, so those w elements are one aligned w-wide access.
// (V = 4, n = 9: m = 0 -> 4 + 4 + 1; m = 3 (the stem's wstart = 8q - 1) -> 1 + 4 + 4;
// m = 1, 2 -> four pieces.)
constexpr int run_piece(int m, int i, int n, int V) {
  int w = V;
  while (w > 1 && ((m + i) % w != 0 || i + w > n)) w /= 2;
  return w;
}

// Elements c0 + I .. c0 + N - 1 of `row` (a row of W elements) into c[I..N), element c0 lying
// M elements past a V-element boundary: each piece of run_piece by one access when it lies
// in the row, else element by element with -inf outside [0, W) (no memory touched there).
template <int M, int V, int N, int I, typename T, typename index_t>
CONVRNN_HD void load_run_from(const T* row, index_t c0, index_t W, T (&c)[N]) {
  if constexpr (I < N) {
    constexpr int w = run_piece(M, I, N, V);
    const index_t lo = c0 + static_cast<index_t>(I);
    bool whole = false;
    if constexpr (w > 1) {
      whole = lo >= 0 && lo + w <= W;
      if (whole) {
#if defined(CONVRNN_CHECK_PIECE_ALIGNMENT)  // the CPU checker: every piece aligned to its width
        CONVRNN_CHECK_PIECE_ALIGNMENT(reinterpret_cast<uintptr_t>(row + lo) % (w * sizeof(T)) == 0);
#endif
        const Lanes<T, w> v = *reinterpret_cast<const Lanes<T, w>*>(row + lo);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int k = 0; k < w; ++k) c[I + k] = v.v[k];
      }
    }
    if (!whole) {
      const T ninf = static_cast<T>(-static_cast<acc_t<T>>(INFINITY));
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int k = 0; k < w; ++k) {
        const index_t col = lo + k;
        c[I + k] = col >= 0 && col < W ? row[col] : ninf;
      }
    }
    load_run_from<M, V, N, I + w>(row, c0, W, c);
  }
}

// load_run_from with the misalignment m (0 <= m < V) known at run time: one code path per m.
// Where W is a multiple of V, m is the same for every item of a launch (wstart = 8q - pw), so
// the branch is uniform; for odd W (V = 2) it changes with the plane and the row's parity.
template <int V, int N, int M = 0, typename T, typename index_t>
CONVRNN_HD void load_run(const T* row, index_t c0, index_t W, unsigned m, T (&c)[N]) {
  if constexpr (M + 1 < V) {
    if (m != static_cast<unsigned>(M)) {
      load_run<V, N, M + 1>(row, c0, W, m, c);
      return;
    }
  }
  load_run_from<M, V, N, 0>(row, c0, W, c);
}

// The KH rows of the four windows: r[t][j] = element (hstart + t*dh, wstart + j) of the plane,
// -inf for rows outside th and columns outside [0, W).  plane_mis: the plane's first element's
// address in elements, mod V (any value whose residue mod V is that).
template <int V, int KH, typename T, typename index_t>
CONVRNN_HD void load_rows_quad(const T* plane, unsigned plane_mis, index_t W, index_t hstart, index_t wstart, Taps th,
                               index_t dh, T (&r)[KH][kQuadCols]) {
  static_assert(V >= 2 && (V & (V - 1)) == 0 && V * sizeof(T) <= 16, "V: a power of two, at most 16 bytes");
  const index_t tlo = static_cast<index_t>(th.lo), thi = static_cast<index_t>(th.hi);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int t = 0; t < KH; ++t) {
    if (t >= tlo && t < thi) {
      const index_t roff = (hstart + t * dh) * W;
      const unsigned m = (plane_mis + static_cast<unsigned>(roff + wstart)) & static_cast<unsigned>(V - 1);
      load_run<V>(plane + roff, wstart, W, m, r[t]);
    } else {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int j = 0; j < kQuadCols; ++j) r[t][j] = static_cast<T>(-static_cast<acc_t<T>>(INFINITY));
    }
  }
}

// Item e of the NCHW quad forward (quad_div divides by (C, OH, ceil(OW / 4))): the geometry of
// its four outputs, and their 3 rows into r (load_rows_quad), for forward_quad_kernel and the
// CPU checker alike.  x_mis: x's address in elements (only its residue mod V matters).
template <typename index_t>
struct QuadItem {
  index_t o0, count;       // the first output's offset; how many of the four exist (OW's edge)
  index_t hstart, wstart;  // the first window's top row and left column
  Taps th;                 // the rows of the windows inside the image
};

template <int V, typename T, typename index_t>
CONVRNN_HD QuadItem<index_t> load_quad_item(const T* x, unsigned x_mis, const PoolDims<index_t>& d,
                                            const PosDividers<index_t>& quad_div, index_t e, T (&r)[3][kQuadCols]) {
  const Pos<index_t> p = decompose<false>(e, quad_div);
  const index_t ow = 4 * p.col;
  QuadItem<index_t> q;
  q.hstart = p.row * d.sh - d.ph;
  q.wstart = 2 * ow - d.pw;
  q.th = window_taps<index_t>(q.hstart, d.H, 3, d.dh);
  const index_t plane = plane_offset<false>(p.n, p.c, d.C, d.H, d.W);
  load_rows_quad<V, 3, T, index_t>(x + plane, x_mis + static_cast<unsigned>(plane), d.W, q.hstart, q.wstart, q.th,
                                   d.dh, r);
  q.o0 = ((p.n * d.C + p.c) * d.OH + p.row) * d.OW + ow;
  q.count = d.OW - ow < 4 ? d.OW - ow : index_t(4);
  return q;
}

// Round 4: four horizontally adjacent outputs (ow .. ow + 3, ow = 4q) of one NCHW row of a
// 2x2 window with stride 2, no padding and dilation 1, every window inside the image
// (2 * OH <= H, 2 * OW == W) and W % 8 == 0 (the launcher checks; plane rows then start at
// multiples of 8 elements): their windows are columns 8q .. 8q + 7 of input rows 2oh and
// 2oh + 1, each row read by 16-byte pieces (float32: 2, half types: 1, float64: 4) from a
// 16-byte aligned x.  The pieces replace the unrolled kernel's 16 scalar loads, and the
// index work is spent once for four outputs.
constexpr int kRow4Cols = 8;

template <typename T>
constexpr int row4_piece() {
  return 16 / static_cast<int>(sizeof(T)) < kRow4Cols ? 16 / static_cast<int>(sizeof(T)) : kRow4Cols;
}

// Item e of the round-4 forward (row4_div divides by (C, OH, OW / 4)): the offset of its first
// output and its rows into r, for forward_row4_kernel and the CPU checker alike.
template <typename T, typename index_t>
CONVRNN_HD index_t load_row4_item(const T* x, const PoolDims<index_t>& d, const PosDividers<index_t>& row4_div,
                                  index_t e, index_t& hstart, index_t& wstart, T (&r)[2][kRow4Cols]) {
  constexpr int V = row4_piece<T>();
  const Pos<index_t> p = decompose<false>(e, row4_div);
  hstart = 2 * p.row;
  wstart = 8 * p.col;
  const T* row = x + plane_offset<false>(p.n, p.c, d.C, d.H, d.W) + hstart * d.W + wstart;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int t = 0; t < 2; ++t) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < kRow4Cols / V; ++k) {
      const Lanes<T, V> piece = *reinterpret_cast<const Lanes<T, V>*>(row + t * d.W + k * V);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int u = 0; u < V; ++u) r[t][k * V + u] = piece.v[u];
    }
  }
  return ((p.n * d.C + p.c) * d.OH + p.row) * d.OW + 4 * p.col;
}

// Output l's window (0 <= l < 4) of rows loaded by load_row4_item, row-major, as load_window
// would leave it.
template <typename T>
CONVRNN_HD void row4_window(const T (&r)[2][kRow4Cols], int l, T (&v)[4]) {
  v[0] = r[0][2 * l];
  v[1] = r[0][2 * l + 1];
  v[2] = r[1][2 * l];
  v[3] = r[1][2 * l + 1];
}

// Output l's window (0 <= l < 4) of rows loaded by load_rows_quad, row-major, as load_window
// would leave it.
template <int KH, typename T>
CONVRNN_HD void quad_window(const T (&r)[KH][kQuadCols], int l, T (&v)[KH * 3]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int t = 0; t < KH; ++t) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int u = 0; u < 3; ++u) v[t * 3 + u] = r[t][2 * l + u];
  }
}

// A NaN-propagating max (NaN if either is NaN) whose result is only used where it is neither
// NaN nor zero (max_values_quad): there any NaN-propagating max gives the same bits (the max
// of a set is unique unless it is a zero, +0 and -0 comparing equal), so which NaN or which
// zero comes out does not matter.  float on sm_80+: one instruction (max.NaN.f32, FMNMX.NAN);
// elsewhere the scan's own select.  The host version (the CPU checker) returns a different NaN
// and the later of two equal zeros, unlike the scan, so that the checker sees the fix-up of
// max_values_quad at work.
template <typename A>
CONVRNN_HD A nan_max(A a, A b) {
  return max_takes(b, a) ? b : a;
}

CONVRNN_HD float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#elif defined(__CUDA_ARCH__)
  return max_takes(b, a) ? b : a;
#else
  if (a != a || b != b) {
    uint32_t bits = 0x7fffffffu;  // the device's canonical NaN, not an input's
    float nan;
    std::memcpy(&nan, &bits, sizeof(nan));
    return nan;
  }
  return a > b ? a : b;
#endif
}

// Whether a window's maximum m, taken by nan_max in any order, needs the scan to fix its bits: NaN
// or a zero (torch keeps the last NaN and the first of tied zeros; every other maximum is unique).
template <typename A>
CONVRNN_HD bool scan_decides(A m) {
  return !(m > A(0) || m < A(0));
}

// The values (not the taps) of the four outputs, as max_loaded_window would give them: the
// columns' maxima over the KH rows first (each shared column computed once), then each
// output's over its 3 columns: 2*9 + 4*2 = 26 nan_max for four 3x3 windows, against 36
// compare-and-selects.  Where a result is NaN or a zero (the only results whose bits depend on
// the order or on which NaN: torch keeps the last NaN and the first of tied zeros), that
// output is recomputed by the scan itself, so the bits are always the scan's.
template <int KH, typename T>
CONVRNN_HD void max_values_quad(const T (&r)[KH][kQuadCols], acc_t<T> (&best)[4]) {
  using A = acc_t<T>;
  A cm[kQuadCols];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kQuadCols; ++j) {
    cm[j] = static_cast<A>(r[0][j]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int t = 1; t < KH; ++t) cm[j] = nan_max(cm[j], static_cast<A>(r[t][j]));
  }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int l = 0; l < 4; ++l) {
    A m = nan_max(nan_max(cm[2 * l], cm[2 * l + 1]), cm[2 * l + 2]);
    if (scan_decides(m)) {
      T v[KH * 3];
      quad_window<KH, T>(r, l, v);
      int tap;
      max_loaded_window<KH, 3, T, int>(v, 0, m, tap);
    }
    best[l] = m;
  }
}

// max_loaded_window's value (not its tap) for a window loaded by load_window: a chain of
// nan_max over the taps (one instruction a tap for float on sm_80+, against the scan's
// compare, NaN test and select), the -inf of taps outside the image never winning; where the
// result is NaN or a zero, whose bits depend on the scan's order, the scan itself decides, as
// in max_values_quad.  So the bits are always max_loaded_window's.
template <int KH, int KW, typename T, typename index_t>
CONVRNN_HD acc_t<T> max_values_window(const T (&v)[KH * KW], index_t first_tap) {
  using A = acc_t<T>;
  A m = static_cast<A>(v[0]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 1; k < KH * KW; ++k) m = nan_max(m, static_cast<A>(v[k]));
  if (scan_decides(m)) {
    index_t tap;
    max_loaded_window<KH, KW, T, index_t>(v, first_tap, m, tap);
  }
  return m;
}

// A loaded window's maximum for the forward kernels' two forms: VALUES (nothing but values to
// write) by max_values_window, tap untouched; else the scan, max_loaded_window, with its tap.
template <bool VALUES, int KH, int KW, typename T, typename index_t>
CONVRNN_HD acc_t<T> window_max(const T (&v)[KH * KW], index_t first_tap, index_t& tap) {
  if constexpr (VALUES) {
    return max_values_window<KH, KW, T, index_t>(v, first_tap);
  } else {
    acc_t<T> best;
    max_loaded_window<KH, KW, T, index_t>(v, first_tap, best, tap);
    return best;
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

// grad_input at input position p: the sum, over the outputs (a, b) whose windows cover p
// (a-major, b-minor: a fixed order, so deterministic), of grad_output where the saved tap is
// p.  Any window size.
template <bool CL, typename T, typename index_t, typename tap_t>
CONVRNN_HD acc_t<T> gather_grad(const T* go, const tap_t* taps, const PoolDims<index_t>& d, const Pos<index_t>& p) {
  const Taps oh = covering_outputs<index_t>(p.row, d.ph, d.dh * (d.kh - 1) + 1, d.sh, d.OH);
  const Taps ow = covering_outputs<index_t>(p.col, d.pw, d.dw * (d.kw - 1) + 1, d.sw, d.OW);
  acc_t<T> sum = 0;
  for (index_t a = oh.lo; a < oh.hi; ++a) {
    for (index_t b = ow.lo; b < ow.hi; ++b) {
      const index_t o = output_index<CL>(p, d.OH, d.OW, d.C, a, b);
      const tap_t saved = taps[o];
      if (saved != no_tap<tap_t>() && static_cast<index_t>(saved) == tap_of(d, p.row, p.col, a, b)) {
        sum += static_cast<acc_t<T>>(go[o]);
      }
    }
  }
  return sum;
}

// Cells along one dimension (input size `in`, stride s, padding p): cell A holds the input
// positions i with (i + p) / s == A, that is [A*s - p, A*s - p + s) within [0, in); the
// cells holding any position are A = first + [0, count).
struct CellRange {
  int64_t first, count;
};

inline CellRange cell_range(int64_t in, int64_t s, int64_t p) {
  const int64_t first = p / s;
  return {first, (in - 1 + p) / s - first + 1};
}

// How many outputs before A can cover a position of cell A: output o covers i when
// o*s - p <= i <= o*s - p + extent - 1, so for i in cell A, A - (extent-1)/s <= o <= A.
inline int64_t cell_reach(int64_t k, int64_t s, int64_t d) {
  return (d * (k - 1)) / s;
}

// Precomputed divisor of the saved tap number by kw (a tap's row and column).
template <typename index_t>
struct CellDividers {
  PosDividers<index_t> cells;  // (C, cell rows, cell cols)
  Divider<index_t> kw;
  index_t first_row, first_col;
  CellDividers(index_t C, CellRange rows, CellRange cols, index_t kw_)
      : cells(C, static_cast<index_t>(rows.count), static_cast<index_t>(cols.count)), kw(kw_),
        first_row(static_cast<index_t>(rows.first)), first_col(static_cast<index_t>(cols.first)) {}
};

// Writes grad_input over cell c (c.row, c.col: cell numbers from CellDividers' first ones)
// of plane (c.n, c.c): at each position the sum of grad_output over the outputs
// [A - R, A] x [B - R, B] whose saved argmax is that position, in a-major, b-minor order
// (gather_grad's order: the outputs that do not cover a position cannot have their argmax
// there), 0 where none.  R >= cell_reach(kh, sh, dh) and cell_reach(kw, sw, dw).
// L > 1 (channels_last only, C a multiple of L, c.c a multiple of L, go, taps and gi
// aligned to L elements): the same for the L channels c.c .. c.c + L - 1 at once, each
// lane computed exactly as alone, read and written L elements a load or store.
template <int R, bool CL, typename T, typename index_t, typename tap_t, int L = 1>
CONVRNN_HD void cell_grads(const T* go, const tap_t* taps, T* gi, const PoolDims<index_t>& d,
                           const CellDividers<index_t>& cd, const Pos<index_t>& c) {
  static_assert(L == 1 || CL, "lanes are adjacent channels of channels_last");
  constexpr int M = R + 1;  // candidate outputs along each dimension
  const index_t A = cd.first_row + c.row, B = cd.first_col + c.col;
  // The candidates' argmax positions (ih, iw); ih = -1 where there is none.
  index_t ih[L][M * M], iw[L][M * M];
  T g[L][M * M];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < M * M; ++k) {
    const index_t a = A - R + k / M, b = B - R + k % M;
    const bool valid = a >= 0 && a < d.OH && b >= 0 && b < d.OW;
    const index_t o = valid ? output_index<CL>(c, d.OH, d.OW, d.C, a, b) : index_t(0);
    Lanes<tap_t, L> saved_l;
    Lanes<T, L> g_l;
    if (valid) {
      saved_l = *reinterpret_cast<const Lanes<tap_t, L>*>(taps + o);
      g_l = *reinterpret_cast<const Lanes<T, L>*>(go + o);
    } else {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int l = 0; l < L; ++l) {
        saved_l.v[l] = no_tap<tap_t>();
        g_l.v[l] = static_cast<T>(0);
      }
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int l = 0; l < L; ++l) {
      const tap_t saved = saved_l.v[l];
      g[l][k] = g_l.v[l];
      const bool has = saved != no_tap<tap_t>();
      index_t u;
      const index_t t = divmod(has ? static_cast<index_t>(saved) : index_t(0), cd.kw, u);
      ih[l][k] = has ? a * d.sh - d.ph + t * d.dh : index_t(-1);
      iw[l][k] = b * d.sw - d.pw + u * d.dw;
    }
  }
  const index_t cs = plane_stride<CL>(d.C);
  T* plane = gi + plane_offset<CL>(c.n, c.c, d.C, d.H, d.W);
  const index_t y0 = A * d.sh - d.ph, x0 = B * d.sw - d.pw;
  const index_t y_lo = y0 < 0 ? index_t(0) : y0, y_hi = y0 + d.sh < d.H ? y0 + d.sh : d.H;
  const index_t x_lo = x0 < 0 ? index_t(0) : x0, x_hi = x0 + d.sw < d.W ? x0 + d.sw : d.W;
  for (index_t y = y_lo; y < y_hi; ++y) {
    if constexpr (!CL) {
      // NCHW: a row of 2 positions (stride 2) aligned for a 2-wide store: one store.
      if (x_hi - x_lo == 2 && reinterpret_cast<uintptr_t>(plane + y * d.W + x_lo) % (2 * sizeof(T)) == 0) {
        Lanes<T, 2> out;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int q = 0; q < 2; ++q) {
          acc_t<T> sum = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
          for (int k = 0; k < M * M; ++k) {
            if (ih[0][k] == y && iw[0][k] == x_lo + q) sum += static_cast<acc_t<T>>(g[0][k]);
          }
          out.v[q] = static_cast<T>(sum);
        }
        *reinterpret_cast<Lanes<T, 2>*>(plane + y * d.W + x_lo) = out;
        continue;
      }
    }
    for (index_t x = x_lo; x < x_hi; ++x) {
      Lanes<T, L> out;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int l = 0; l < L; ++l) {
        acc_t<T> sum = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int k = 0; k < M * M; ++k) {
          if (ih[l][k] == y && iw[l][k] == x) sum += static_cast<acc_t<T>>(g[l][k]);
        }
        out.v[l] = static_cast<T>(sum);
      }
      *reinterpret_cast<Lanes<T, L>*>(plane + (y * d.W + x) * cs) = out;
    }
  }
}

}  // namespace convrnn
