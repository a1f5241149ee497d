// CPU check of the CUDA max_pool2d per-element helpers against the original kernel bodies.
// load_run_from reports here whether each vector piece it reads is aligned to its width.
static long piece_misaligned = 0, pieces = 0;
#define CONVRNN_CHECK_PIECE_ALIGNMENT(ok) (++pieces, piece_misaligned += !(ok))
#include "cuda/max_pool2d_items.cuh"
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
using namespace convrnn;
static std::mt19937_64 rng(12345);
static int64_t rnd(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
static long fails = 0, checks = 0;
static long reach_hist[5];
static long lane_geoms = 0, lane_bwd = 0, pair_geoms = 0, quad_runs = 0, quad_fixups = 0, row4_runs = 0, lane4_geoms = 0, lane8_geoms = 0,
            values_checks = 0, values_fixups = 0, lane4_bwd = 0;
static long line_fails[1000];
#define TCHECK(c, ...) do { ++checks; if (!(c)) { ++line_fails[__LINE__]; if (++fails < 20) { printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } } while (0)

static void test_divider() {
  std::vector<int32_t> ds;
  for (int d = 1; d <= 3000; ++d) ds.push_back(d);
  for (int s = 1; s < 31; ++s) { int64_t p = int64_t(1) << s; for (int64_t x : {p - 1, p, p + 1}) if (x >= 1 && x < (int64_t(1) << 31)) ds.push_back(int32_t(x)); }
  for (int i = 0; i < 3000; ++i) ds.push_back(int32_t(rnd(1, INT32_MAX)));
  ds.push_back(INT32_MAX);
  for (int32_t d : ds) {
    Divider<int32_t> dv(d);
    std::vector<int64_t> ns = {0, 1, d - 1, d, d + 1, INT32_MAX, INT32_MAX - 1, INT32_MAX - d};
    for (int i = 0; i < 200; ++i) ns.push_back(rnd(0, INT32_MAX));
    for (int i = 0; i < 50; ++i) { int64_t k = rnd(0, INT32_MAX / d); ns.push_back(k * d); ns.push_back(k * d - 1); ns.push_back(k * d + d - 1); }
    for (int64_t n : ns) {
      if (n < 0 || n > INT32_MAX) continue;
      int32_t r; int32_t q = divmod(int32_t(n), dv, r);
      ++checks;
      if (q != int32_t(n / d) || r != int32_t(n % d)) { if (++fails < 20) printf("FAIL div %lld / %d -> %d r %d\n", (long long)n, d, q, r); }
    }
  }
  // small d, every n up to 2^20
  for (int32_t d = 1; d <= 64; ++d) { Divider<int32_t> dv(d); for (int32_t n = 0; n < (1 << 20); ++n) { ++checks; if (dv.div(n) != n / d) { if (++fails < 20) printf("FAIL div %d/%d\n", n, d); } } }
  Divider<int64_t> d64(7); TCHECK(d64.div(int64_t(1) << 40) == (int64_t(1) << 40) / 7, "div64");
}

template <typename index_t>
static void test_decompose() {
  for (int it = 0; it < 2000; ++it) {
    index_t C = rnd(1, 300), R = rnd(1, 300), Q = rnd(1, 300), N = rnd(1, 20);
    PosDividers<index_t> dv(C, R, Q);
    for (int k = 0; k < 200; ++k) {
      index_t e = rnd(0, int64_t(N) * C * R * Q - 1);
      for (int cl = 0; cl < 2; ++cl) {
        Pos<index_t> a = cl ? decompose<true>(e, C, R, Q) : decompose<false>(e, C, R, Q);
        Pos<index_t> b = cl ? decompose<true>(e, dv) : decompose<false>(e, dv);
        TCHECK(a.n == b.n && a.c == b.c && a.row == b.row && a.col == b.col, "decompose e=%lld", (long long)e);
      }
    }
  }
}

static bool same_bits(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

template <typename T>
static bool same_bits_strict(T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

// Round 5's values-only form (window_max<true>, what the unrolled, pair and row4 kernels call with
// VALUES = true) on a loaded window against the scan's value `best`: the same bits.
template <int KH, int KW, typename T, typename index_t>
static void check_values_only(const T (&v)[KH * KW], index_t first, acc_t<T> best, const char* kernel) {
  index_t untouched = -5;
  const T values_only = T(window_max<true, KH, KW, T, index_t>(v, first, untouched));
  TCHECK(untouched == -5, "values-only %s wrote a tap", kernel);
  TCHECK(same_bits_strict(values_only, T(best)), "values-only %s %dx%d: %g vs %g", kernel, KH, KW,
         double(values_only), double(T(best)));
  ++values_checks;
  if (scan_decides(best)) ++values_fixups;
}

static Pool2d make_geom(int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                        int64_t ph, int64_t pw, int64_t dh, int64_t dw, bool ceil, bool cl) {
  Pool2d g;
  g.N = N; g.C = C; g.H = H; g.W = W; g.kh = kh; g.kw = kw; g.sh = sh; g.sw = sw; g.ph = ph; g.pw = pw; g.dh = dh; g.dw = dw;
  g.OH = pool_output_size(H, kh, sh, ph, dh, ceil); g.OW = pool_output_size(W, kw, sw, pw, dw, ceil);
  g.batched = true; g.format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return g;
}

template <typename T>
static std::vector<T> make_data(int64_t n, int mode) {
  std::vector<T> x(n);
  for (auto& v : x) {
    int r = int(rnd(0, 99));
    if (mode == 1 && r < 60) v = T(-INFINITY);            // many -inf windows
    else if (r < 2) v = T(NAN);
    else if (r < 3) v = T(-NAN);                         // another NaN: the argmax is the last one
    else if (r < 6) v = T(-INFINITY);
    else if (r < 8) v = T(INFINITY);
    else if (r < 12) v = T(-0.0);                        // ties of -0 with +0: the first wins
    else v = T(double(rnd(-4, 4)));                      // many ties
  }
  return x;
}

// The original kernel body (max_window) for every output, against values, int64 indices
// and argmax bytes computed by the code under test.
template <bool CL, typename T, typename index_t>
static void compare_forward(const Pool2d& g, const std::vector<T>& x, const std::vector<T>& val,
                            const std::vector<int64_t>& idx, const std::vector<uint8_t>& tp, int K, int L) {
  PoolDims<index_t> d(g);
  index_t total = d.N * d.C * d.OH * d.OW;
  for (index_t e = 0; e < total; ++e) {
    // reference: the original kernel body
    const Pos<index_t> p = decompose<CL>(e, d.C, d.OH, d.OW);
    const index_t hstart = p.row * d.sh - d.ph, wstart = p.col * d.sw - d.pw;
    const Taps th = window_taps<index_t>(hstart, d.H, d.kh, d.dh), tw = window_taps<index_t>(wstart, d.W, d.kw, d.dw);
    acc_t<T> best; index_t tap;
    max_window<T, index_t>(x.data() + plane_offset<CL>(p.n, p.c, d.C, d.H, d.W), d.W, plane_stride<CL>(d.C), hstart, wstart, th, tw, d.kw, d.dh, d.dw, best, tap);
    const int64_t ref_index = tap_index<index_t>(tap, hstart, wstart, d.kw, d.dh, d.dw, d.W);
    const uint8_t ref_tap = has_taps(th, tw) ? uint8_t(tap) : no_tap<uint8_t>();
    TCHECK(same_bits(double(T(best)), double(val[e])) && ref_index == idx[e] && ref_tap == tp[e],
          "forward K=%d L=%d CL=%d e=%lld: %g/%g index %lld/%lld tap %d/%d", K, L, int(CL), (long long)e, double(best), double(val[e]), (long long)ref_index, (long long)idx[e], int(ref_tap), int(tp[e]));
  }
}

// forward_pair_kernel's body (NCHW, column stride 2, column dilation 1), pair by pair.
template <int K, typename T, typename index_t>
static void check_forward_pair(const Pool2d& g, const std::vector<T>& x) {
  PoolDims<index_t> d(g);
  index_t total = d.N * d.C * d.OH * d.OW;
  std::vector<T> val(total, T(0.375));
  std::vector<int64_t> idx(total, -7);
  std::vector<uint8_t> tp(total, 77);
  const index_t OWp = (d.OW + 1) / 2;
  PosDividers<index_t> dv(d.C, d.OH, OWp);
  for (index_t e = 0; e < d.N * d.C * d.OH * OWp; ++e) {
    const Pos<index_t> p = decompose<false>(e, dv);
    const index_t ow = 2 * p.col;
    const index_t hs = p.row * d.sh - d.ph, ws = ow * 2 - d.pw;
    const Taps th = window_taps<index_t>(hs, d.H, K, d.dh);
    const bool second = ow + 1 < d.OW;
    const index_t o0 = ((p.n * d.C + p.c) * d.OH + p.row) * d.OW + ow;
    T v[2][K * K];
    load_window_pair<K, K, T, index_t>(x.data() + plane_offset<false>(p.n, p.c, d.C, d.H, d.W), d.W, hs, ws, th, d.dh, v);
    for (int l = 0; l < (second ? 2 : 1); ++l) {
      const Taps tw = window_taps<index_t>(ws + 2 * l, d.W, K, index_t(1));
      acc_t<T> best; index_t tap;
      max_loaded_window<K, K, T, index_t>(v[l], index_t(th.lo) * K + index_t(tw.lo), best, tap);
      check_values_only<K, K, T, index_t>(v[l], index_t(th.lo) * K + index_t(tw.lo), best, "pair");
      TCHECK(idx[o0 + l] == -7, "pair output written twice o=%lld", (long long)(o0 + l));
      val[o0 + l] = T(best);
      tp[o0 + l] = has_taps(th, tw) ? uint8_t(tap) : no_tap<uint8_t>();
      idx[o0 + l] = tap_index<index_t>(tap, hs, ws + 2 * l, K, d.dh, index_t(1), d.W);
    }
  }
  ++pair_geoms;
  compare_forward<false, T, index_t>(g, x, val, idx, tp, K, 0);
}

// forward_quad_kernel's body (NCHW 3x3, column stride 2, column dilation 1: load_quad_item,
// max_values_quad), item by item,
// with vector width V and the input placed `off` elements past an aligned address (so every
// residue of the rows is met), values compared bit for bit with max_window's (NaN payloads and
// the sign of zero included); TAPS: also the int64 index and the argmax byte.
template <int V, bool TAPS, typename T, typename index_t>
static void check_forward_quad(const Pool2d& g, const std::vector<T>& x0, int off) {
  PoolDims<index_t> d(g);
  std::vector<T> buf(x0.size() + 16);
  std::copy(x0.begin(), x0.end(), buf.begin() + off);
  const T* x = buf.data() + off;
  const unsigned x_mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(x) / sizeof(T));
  const index_t total = d.N * d.C * d.OH * d.OW;
  std::vector<T> val(total, T(0.375));
  std::vector<int64_t> idx(total, -7);
  std::vector<uint8_t> tp(total, 77);
  std::vector<int> written(total, 0);
  const index_t OQ = (d.OW + 3) / 4;
  PosDividers<index_t> dv(d.C, d.OH, OQ);
  for (index_t e = 0; e < d.N * d.C * d.OH * OQ; ++e) {
    T r[3][kQuadCols];
    const QuadItem<index_t> q = load_quad_item<V>(x, x_mis, d, dv, e, r);  // the kernel's own item code
    const index_t hstart = q.hstart, wstart = q.wstart, o0 = q.o0, count = q.count;
    const Taps th = q.th;
    T out[4];
    uint8_t out_tap[4] = {0, 0, 0, 0};
    int64_t out_idx[4] = {0, 0, 0, 0};
    if constexpr (TAPS) {
      for (int l = 0; l < 4; ++l) {
        const Taps tw = window_taps<index_t>(wstart + 2 * l, d.W, 3, index_t(1));
        T v[9];
        quad_window<3, T>(r, l, v);
        acc_t<T> best; index_t tap;
        max_loaded_window<3, 3, T, index_t>(v, index_t(th.lo) * 3 + index_t(tw.lo), best, tap);
        out[l] = T(best);
        out_tap[l] = has_taps(th, tw) ? uint8_t(tap) : no_tap<uint8_t>();
        out_idx[l] = tap_index<index_t>(tap, hstart, wstart + 2 * l, 3, d.dh, index_t(1), d.W);
      }
    } else {
      acc_t<T> best[4];
      max_values_quad<3, T>(r, best);
      for (int l = 0; l < 4; ++l) {
        out[l] = T(best[l]);
        quad_fixups += !(best[l] > 0 || best[l] < 0);  // NaN or zero: decided by the fix-up scan
      }
    }
    for (index_t l = 0; l < count; ++l) {
      TCHECK(!written[o0 + l], "quad output written twice o=%lld", (long long)(o0 + l));
      written[o0 + l] = 1;
      val[o0 + l] = out[l];
      tp[o0 + l] = out_tap[l];
      idx[o0 + l] = out_idx[l];
    }
  }
  ++quad_runs;
  for (index_t e = 0; e < total; ++e) {
    const Pos<index_t> p = decompose<false>(e, d.C, d.OH, d.OW);
    const index_t hstart = p.row * d.sh - d.ph, wstart = p.col * d.sw - d.pw;
    const Taps th = window_taps<index_t>(hstart, d.H, d.kh, d.dh), tw = window_taps<index_t>(wstart, d.W, d.kw, d.dw);
    acc_t<T> best; index_t tap;
    max_window<T, index_t>(x + plane_offset<false>(p.n, p.c, d.C, d.H, d.W), d.W, index_t(1), hstart, wstart, th, tw, d.kw, d.dh, d.dw, best, tap);
    const int64_t ref_index = tap_index<index_t>(tap, hstart, wstart, d.kw, d.dh, d.dw, d.W);
    const uint8_t ref_tap = has_taps(th, tw) ? uint8_t(tap) : no_tap<uint8_t>();
    TCHECK(written[e] && same_bits_strict(T(best), val[e]) && (!TAPS || (ref_index == idx[e] && ref_tap == tp[e])),
           "quad V=%d TAPS=%d off=%d e=%lld: %g/%g index %lld/%lld tap %d/%d (H %lld W %lld s %lld p %lld,%lld)", V, int(TAPS), off, (long long)e,
           double(T(best)), double(val[e]), (long long)ref_index, (long long)idx[e], int(ref_tap), int(tp[e]),
           (long long)g.H, (long long)g.W, (long long)g.sh, (long long)g.ph, (long long)g.pw);
  }
}

template <typename T, typename index_t>
static void check_forward_quads(const Pool2d& g, const std::vector<T>& x) {
  const int off = int(rnd(0, 7));
  check_forward_quad<2, false, T, index_t>(g, x, off);
  check_forward_quad<2, true, T, index_t>(g, x, off);
  if constexpr (sizeof(T) <= 4) {
    check_forward_quad<4, false, T, index_t>(g, x, off);
    check_forward_quad<4, true, T, index_t>(g, x, off);
  }
  if constexpr (sizeof(T) <= 2) {
    check_forward_quad<8, false, T, index_t>(g, x, off);
    check_forward_quad<8, true, T, index_t>(g, x, off);
  }
}

// forward_row4_kernel's body (round 4: NCHW 2x2/2, no padding, every window inside the image,
// W % 8 == 0: load_row4_item, row4_window, max_loaded_window), item by item, from a 16-byte
// aligned input; values bit for bit, int64 index and argmax byte against max_window's, each
// output written once.
template <typename T, typename index_t>
static void check_forward_row4(const Pool2d& g, const std::vector<T>& x0) {
  PoolDims<index_t> d(g);
  std::vector<T> buf(x0.size() + 16);
  T* x = buf.data();
  while (reinterpret_cast<uintptr_t>(x) % 16 != 0) ++x;
  std::copy(x0.begin(), x0.end(), x);
  const index_t total = d.N * d.C * d.OH * d.OW;
  std::vector<T> val(total, T(0.375));
  std::vector<int64_t> idx(total, -7);
  std::vector<uint8_t> tp(total, 77);
  std::vector<int> written(total, 0);
  PosDividers<index_t> dv(d.C, d.OH, d.OW / 4);
  for (index_t e = 0; e < d.N * d.C * d.OH * (d.OW / 4); ++e) {
    T r[2][kRow4Cols];
    index_t hstart, wstart;
    const index_t o0 = load_row4_item<T, index_t>(x, d, dv, e, hstart, wstart, r);  // the kernel's own item code
    for (int l = 0; l < 4; ++l) {
      T v[4];
      row4_window<T>(r, l, v);
      acc_t<T> best; index_t tap;
      max_loaded_window<2, 2, T, index_t>(v, index_t(0), best, tap);
      check_values_only<2, 2, T, index_t>(v, index_t(0), best, "row4");
      TCHECK(!written[o0 + l], "row4 output written twice o=%lld", (long long)(o0 + l));
      written[o0 + l] = 1;
      val[o0 + l] = T(best);
      tp[o0 + l] = uint8_t(tap);
      idx[o0 + l] = tap_index<index_t>(tap, hstart, wstart + 2 * l, 2, 1, 1, d.W);
    }
  }
  ++row4_runs;
  for (index_t e = 0; e < total; ++e) {
    const Pos<index_t> p = decompose<false>(e, d.C, d.OH, d.OW);
    const index_t hstart = p.row * 2, wstart = p.col * 2;
    const Taps th = window_taps<index_t>(hstart, d.H, 2, 1), tw = window_taps<index_t>(wstart, d.W, 2, 1);
    acc_t<T> best; index_t tap;
    max_window<T, index_t>(x + plane_offset<false>(p.n, p.c, d.C, d.H, d.W), d.W, index_t(1), hstart, wstart, th, tw, index_t(2), index_t(1), index_t(1), best, tap);
    const int64_t ref_index = tap_index<index_t>(tap, hstart, wstart, 2, 1, 1, d.W);
    const uint8_t ref_tap = has_taps(th, tw) ? uint8_t(tap) : no_tap<uint8_t>();
    TCHECK(written[e] && same_bits_strict(T(best), val[e]) && ref_index == idx[e] && ref_tap == tp[e],
           "row4 e=%lld: %g/%g index %lld/%lld tap %d/%d (H %lld W %lld)", (long long)e, double(T(best)), double(val[e]),
           (long long)ref_index, (long long)idx[e], int(ref_tap), int(tp[e]), (long long)g.H, (long long)g.W);
  }
}

// The round-4 launcher's rule (max_pool2d.cu): 2x2/2 NCHW, no padding, dilation 1, W % 8 == 0,
// every window inside.
static bool row4_applies(const Pool2d& g) {
  return g.kh == 2 && g.kw == 2 && g.sh == 2 && g.sw == 2 && g.ph == 0 && g.pw == 0 && g.dh == 1 && g.dw == 1 &&
         g.W % 8 == 0 && 2 * g.OW == g.W && 2 * g.OH <= g.H;
}

// Original forward body (max_window) against the unrolled one, for every output; L > 1:
// the L-channel item form (channels_last, C % L == 0), item e covering outputs e*L + l.
template <int K, bool CL, typename T, typename index_t, int L = 1>
static void check_forward(const Pool2d& g, const std::vector<T>& x) {
  PoolDims<index_t> d(g);
  index_t total = d.N * d.C * d.OH * d.OW;
  std::vector<T> val(total, T(0.375));
  std::vector<int64_t> idx(total, -7);
  std::vector<uint8_t> tp(total, 77);
  // new: forward_unrolled_kernel's body, item by item
  PosDividers<index_t> dv(d.C / L, d.OH, d.OW);
  for (index_t e = 0; e < total / L; ++e) {
    Pos<index_t> q = decompose<CL>(e, dv);
    q.c *= L;
    const index_t hs = q.row * d.sh - d.ph, ws = q.col * d.sw - d.pw;
    const Taps th2 = window_taps<index_t>(hs, d.H, K, d.dh), tw2 = window_taps<index_t>(ws, d.W, K, d.dw);
    const index_t first = index_t(th2.lo) * K + index_t(tw2.lo);
    const bool any = has_taps(th2, tw2);
    T v[L][K * K];
    load_window<K, K, L, T, index_t>(x.data() + plane_offset<CL>(q.n, q.c, d.C, d.H, d.W), d.W, plane_stride<CL>(d.C), hs, ws, th2, tw2, d.dh, d.dw, v);
    Lanes<T, L> out; Lanes<uint8_t, L> ot;
    for (int l = 0; l < L; ++l) {
      acc_t<T> best2; index_t tap2;
      max_loaded_window<K, K, T, index_t>(v[l], first, best2, tap2);
      out.v[l] = T(best2);
      check_values_only<K, K, T, index_t>(v[l], first, best2, "unrolled");
      ot.v[l] = any ? uint8_t(tap2) : no_tap<uint8_t>();
      idx[e * L + l] = tap_index<index_t>(tap2, hs, ws, K, d.dh, d.dw, d.W);
    }
    *reinterpret_cast<Lanes<T, L>*>(val.data() + e * L) = out;
    *reinterpret_cast<Lanes<uint8_t, L>*>(tp.data() + e * L) = ot;
  }
  compare_forward<CL, T, index_t>(g, x, val, idx, tp, K, L);
}

// Original gather body (reference) against gather_grad, cell_grads<R> and a brute-force scatter.
template <int R, bool CL, typename T, typename index_t, int L = 1>
static void check_backward(const Pool2d& g, const std::vector<uint8_t>& taps, const std::vector<T>& go, const std::vector<double>& brute) {
  PoolDims<index_t> d(g);
  index_t total = d.N * d.C * d.H * d.W;
  std::vector<double> ref(total);
  for (index_t i = 0; i < total; ++i) {
    const Pos<index_t> p = decompose<CL>(i, d.C, d.H, d.W);
    const Taps oh = covering_outputs<index_t>(p.row, d.ph, d.dh * (d.kh - 1) + 1, d.sh, d.OH);
    const Taps ow = covering_outputs<index_t>(p.col, d.pw, d.dw * (d.kw - 1) + 1, d.sw, d.OW);
    acc_t<T> sum = 0;
    for (index_t a = oh.lo; a < oh.hi; ++a)
      for (index_t b = ow.lo; b < ow.hi; ++b) {
        const index_t o = output_index<CL>(p, d.OH, d.OW, d.C, a, b);
        const uint8_t saved = taps[o];
        const index_t dy = p.row - (a * d.sh - d.ph), dx = p.col - (b * d.sw - d.pw);
        const index_t t = (dy % d.dh != 0 || dx % d.dw != 0) ? -1 : (dy / d.dh) * d.kw + dx / d.dw;
        if (saved != no_tap<uint8_t>() && index_t(saved) == t) sum += acc_t<T>(go[o]);
      }
    ref[i] = double(T(sum));
    TCHECK(same_bits(ref[i], double(T(brute[i]))), "ref vs brute i=%lld %g vs %g", (long long)i, ref[i], brute[i]);
    const double s2 = double(T(gather_grad<CL, T, index_t, uint8_t>(go.data(), taps.data(), d, p)));
    TCHECK(same_bits(ref[i], s2), "gather_grad CL=%d i=%lld %g vs %g", int(CL), (long long)i, ref[i], s2);
  }
  if (R < 0) return;
  constexpr int RR = R < 0 ? 0 : R;
  const CellRange rows = cell_range(g.H, g.sh, g.ph), cols = cell_range(g.W, g.sw, g.pw);
  CellDividers<index_t> cd(d.C / L, rows, cols, d.kw);
  const index_t ncells = d.N * (d.C / L) * rows.count * cols.count;
  TCHECK(ncells <= total, "cells %lld > input %lld", (long long)ncells, (long long)total);
  std::vector<T> gi(total, T(0.375));  // sentinel: no sum of integers
  for (index_t e = 0; e < ncells; ++e) { Pos<index_t> c = decompose<CL>(e, cd.cells); c.c *= L; cell_grads<RR, CL, T, index_t, uint8_t, L>(go.data(), taps.data(), gi.data(), d, cd, c); }
  for (index_t i = 0; i < total; ++i)
    TCHECK(same_bits(ref[i], double(gi[i])), "cells R=%d L=%d CL=%d i=%lld %g vs %g (k %lld,%lld s %lld,%lld p %lld,%lld d %lld,%lld H %lld W %lld)", R, L, int(CL), (long long)i, ref[i], double(gi[i]),
           (long long)g.kh, (long long)g.kw, (long long)g.sh, (long long)g.sw, (long long)g.ph, (long long)g.pw, (long long)g.dh, (long long)g.dw, (long long)g.H, (long long)g.W);
}

template <bool CL, typename T, typename index_t>
static void run_geom(const Pool2d& g, int mode) {
  const int64_t nin = g.N * g.C * g.H * g.W, nout = g.N * g.C * g.OH * g.OW;
  std::vector<T> x = make_data<T>(nin, mode);
  if (g.kh == 2 && g.kw == 2) check_forward<2, CL, T, index_t>(g, x);
  if (g.kh == 3 && g.kw == 3) check_forward<3, CL, T, index_t>(g, x);
  if constexpr (!CL) {
    if (g.sw == 2 && g.dw == 1 && g.kh == 2 && g.kw == 2) check_forward_pair<2, T, index_t>(g, x);
    if (g.sw == 2 && g.dw == 1 && g.kh == 3 && g.kw == 3) check_forward_pair<3, T, index_t>(g, x);
    if (g.sw == 2 && g.dw == 1 && g.kh == 3 && g.kw == 3) check_forward_quads<T, index_t>(g, x);
    if (row4_applies(g)) check_forward_row4<T, index_t>(g, x);
  }
  if constexpr (CL) {
    if (g.C % 2 == 0 && g.kh == 2 && g.kw == 2) { check_forward<2, CL, T, index_t, 2>(g, x); ++lane_geoms; }
    if (g.C % 2 == 0 && g.kh == 3 && g.kw == 3) { check_forward<3, CL, T, index_t, 2>(g, x); ++lane_geoms; }
    // round 4: 4 channels an item
    if (g.C % 4 == 0 && g.kh == 2 && g.kw == 2) { check_forward<2, CL, T, index_t, 4>(g, x); ++lane4_geoms; }
    if (g.C % 4 == 0 && g.kh == 3 && g.kw == 3) { check_forward<3, CL, T, index_t, 4>(g, x); ++lane4_geoms; }
    // round 5: 8 channels an item, in the 2-byte types (16-byte loads)
    if constexpr (sizeof(T) == 2) {
      if (g.C % 8 == 0 && g.kh == 2 && g.kw == 2) { check_forward<2, CL, T, index_t, 8>(g, x); ++lane8_geoms; }
      if (g.C % 8 == 0 && g.kh == 3 && g.kw == 3) { check_forward<3, CL, T, index_t, 8>(g, x); ++lane8_geoms; }
    }
  }
  // forward taps by the reference body, for the backward
  PoolDims<index_t> d(g);
  std::vector<uint8_t> taps(nout);
  std::vector<T> go(nout);
  std::vector<double> brute(nin, 0.0);
  for (index_t e = 0; e < nout; ++e) {
    const Pos<index_t> p = decompose<CL>(e, d.C, d.OH, d.OW);
    const index_t hstart = p.row * d.sh - d.ph, wstart = p.col * d.sw - d.pw;
    const Taps th = window_taps<index_t>(hstart, d.H, d.kh, d.dh), tw = window_taps<index_t>(wstart, d.W, d.kw, d.dw);
    acc_t<T> best; index_t tap;
    max_window<T, index_t>(x.data() + plane_offset<CL>(p.n, p.c, d.C, d.H, d.W), d.W, plane_stride<CL>(d.C), hstart, wstart, th, tw, d.kw, d.dh, d.dw, best, tap);
    taps[e] = has_taps(th, tw) ? uint8_t(tap) : no_tap<uint8_t>();
    go[e] = T(double(rnd(-100, 100)));  // integers: sums exact in any order
    if (has_taps(th, tw)) {
      const index_t ih = hstart + (tap / d.kw) * d.dh, iw = wstart + (tap % d.kw) * d.dw;
      const index_t i = CL ? ((p.n * d.H + ih) * d.W + iw) * d.C + p.c : ((p.n * d.C + p.c) * d.H + ih) * d.W + iw;
      brute[i] += double(go[e]);
    }
  }
  const int64_t reach = std::max(cell_reach(g.kh, g.sh, g.dh), cell_reach(g.kw, g.sw, g.dw));
  // the tightest R, and one larger (also correct: more candidates)
  if constexpr (CL) {
    if (g.C % 2 == 0 && reach <= 2) {
      ++lane_bwd;
      if (reach == 0) check_backward<0, CL, T, index_t, 2>(g, taps, go, brute);
      if (reach <= 1) check_backward<1, CL, T, index_t, 2>(g, taps, go, brute);
      check_backward<2, CL, T, index_t, 2>(g, taps, go, brute);
    }
    // round 5: 4 channels a cell where the reach is at most 1 (float and the 2-byte types)
    if constexpr (sizeof(T) <= 4) {
      if (g.C % 4 == 0 && reach <= 1) {
        ++lane4_bwd;
        if (reach == 0) check_backward<0, CL, T, index_t, 4>(g, taps, go, brute);
        check_backward<1, CL, T, index_t, 4>(g, taps, go, brute);
      }
    }
  }
  if (reach == 0) { check_backward<0, CL, T, index_t>(g, taps, go, brute); check_backward<1, CL, T, index_t>(g, taps, go, brute); }
  else if (reach == 1) { check_backward<1, CL, T, index_t>(g, taps, go, brute); check_backward<2, CL, T, index_t>(g, taps, go, brute); }
  else if (reach == 2) check_backward<2, CL, T, index_t>(g, taps, go, brute);
  else if (reach == 3) check_backward<3, CL, T, index_t>(g, taps, go, brute);
  else check_backward<-1, CL, T, index_t>(g, taps, go, brute);
  ++reach_hist[std::min<int64_t>(reach, 4)];
}

int main() {
  test_divider();
  printf("divider: %ld checks, %ld fails\n", checks, fails);
  test_decompose<int32_t>();
  test_decompose<int64_t>();
  printf("decompose: %ld checks, %ld fails\n", checks, fails);
  int geoms = 0;
  for (int it = 0; it < 3000; ++it) {
    int64_t k = rnd(1, 4), kh = k, kw = it % 5 == 0 ? rnd(1, 4) : k;
    int64_t sh = rnd(1, 4), sw = it % 3 == 0 ? rnd(1, 4) : (it % 3 == 1 ? 2 : sh);
    int64_t dh = rnd(0, 3) == 0 ? rnd(2, 3) : 1, dw = it % 4 == 0 ? rnd(1, 3) : dh;
    int64_t ph = rnd(0, kh / 2), pw = rnd(0, kw / 2);
    int64_t H = rnd(1, 13), W = rnd(1, 13), N = rnd(1, 2), C = rnd(1, 3) * (rnd(0, 2) ? 2 : 1);
    if (it % 50 == 0) { H = rnd(20, 40); W = rnd(20, 40); }
    bool ceil = rnd(0, 1), cl = rnd(0, 1);
    Pool2d g = make_geom(N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, ceil, cl);
    if (g.OH < 1 || g.OW < 1) continue;
    ++geoms;
    int mode = rnd(0, 3) == 0;
    if (cl) { run_geom<true, float, int32_t>(g, mode); run_geom<true, double, int64_t>(g, mode); }
    else { run_geom<false, float, int32_t>(g, mode); run_geom<false, double, int64_t>(g, mode); }
    if (it % 3 == 0) {
      if (cl) { run_geom<true, c10::Half, int32_t>(g, mode); run_geom<true, c10::BFloat16, int64_t>(g, mode); }
      else { run_geom<false, c10::BFloat16, int32_t>(g, mode); run_geom<false, c10::Half, int64_t>(g, mode); }
    }
  }
  // round 4's 2x2/2 rows (W a multiple of 8, any H, ceil_mode either way: an odd H with ceil_mode
  // leaves a partial last row, which the launcher declines)
  for (int it = 0; it < 300; ++it) {
    const int64_t H = rnd(2, 21), W = 8 * rnd(1, 4), N = rnd(1, 2), C = rnd(1, 3);
    Pool2d g = make_geom(N, C, H, W, 2, 2, 2, 2, 0, 0, 1, 1, rnd(0, 1), false);
    if (!row4_applies(g)) continue;
    ++geoms;
    const int mode = rnd(0, 3) == 0;
    run_geom<false, float, int32_t>(g, mode);
    run_geom<false, double, int64_t>(g, mode);
    if (it % 2 == 0) run_geom<false, c10::Half, int64_t>(g, mode);
    else run_geom<false, c10::BFloat16, int32_t>(g, mode);
  }
  // round 5's 8-channel items: channels_last 2x2 and 3x3 windows with C a multiple of 8, half types
  for (int it = 0; it < 200; ++it) {
    const int64_t k = rnd(2, 3), s = rnd(1, 3), dil = rnd(0, 3) == 0 ? 2 : 1, p = rnd(0, k / 2);
    const int64_t H = rnd(1, 13), W = rnd(1, 13), N = rnd(1, 2), C = 8 * rnd(1, 2);
    Pool2d g = make_geom(N, C, H, W, k, k, s, s, p, p, dil, dil, rnd(0, 1), true);
    if (g.OH < 1 || g.OW < 1) continue;
    ++geoms;
    const int mode = rnd(0, 3) == 0;
    if (it % 2 == 0) run_geom<true, c10::Half, int32_t>(g, mode);
    else run_geom<true, c10::BFloat16, int64_t>(g, mode);
  }
  // the benchmark's geometries, smaller batch
  for (bool cl : {false, true}) {
    for (auto s : std::vector<std::vector<int64_t>>{{2, 4, 112, 112, 2, 2, 0}, {2, 6, 55, 55, 3, 2, 0}, {2, 4, 112, 112, 3, 2, 1},
                                                    {1, 8, 112, 112, 2, 2, 0}, {1, 16, 55, 55, 3, 2, 0}, {1, 8, 112, 112, 3, 2, 1}}) {
      Pool2d g = make_geom(s[0], s[1], s[2], s[3], s[4], s[4], s[5], s[5], s[6], s[6], 1, 1, false, cl);
      ++geoms;
      if (cl) { run_geom<true, float, int32_t>(g, 0); run_geom<true, c10::Half, int32_t>(g, 0); run_geom<true, c10::BFloat16, int64_t>(g, 0); }
      else { run_geom<false, float, int32_t>(g, 0); run_geom<false, c10::Half, int64_t>(g, 0); run_geom<false, c10::BFloat16, int32_t>(g, 0); }
    }
  }
  printf("lane (L=2) forward checks over %ld geometries, lane backward over %ld, W-pair forward over %ld\n", lane_geoms, lane_bwd, pair_geoms);
  printf("quad forward: %ld runs (V, TAPS, dtype), %ld outputs decided by the fix-up scan; %ld vector pieces, %ld misaligned\n", quad_runs, quad_fixups, pieces, piece_misaligned);
  TCHECK(piece_misaligned == 0 && quad_runs > 0 && quad_fixups > 0 && pieces > 0, "quad coverage / piece alignment");
  printf("round-4 2x2/2 row forward: %ld runs; 4-channel forward over %ld geometries\n", row4_runs, lane4_geoms);
  TCHECK(row4_runs > 300 && lane4_geoms > 100, "round-4 coverage");
  printf("round-5 8-channel forward over %ld geometries; values-only form: %ld outputs, %ld by the fix-up scan\n",
         lane8_geoms, values_checks, values_fixups);
  printf("round-5 4-channel backward cells over %ld geometries\n", lane4_bwd);
  TCHECK(lane8_geoms > 100 && values_fixups > 1000 && values_checks > 2 * values_fixups && lane4_bwd > 100,
         "round-5 coverage");
  printf("geometries %d: %ld checks, %ld fails; reach histogram %ld %ld %ld %ld %ld\n", geoms, checks, fails, reach_hist[0], reach_hist[1], reach_hist[2], reach_hist[3], reach_hist[4]);
  for (int l = 0; l < 1000; ++l) if (line_fails[l]) printf("  failures at test.cpp:%d: %ld\n", l, line_fails[l]);
  return fails != 0;
}
