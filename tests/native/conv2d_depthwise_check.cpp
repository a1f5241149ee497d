// The depthwise conv2d tile kernels (csrc/cuda/conv2d_depthwise.cuh: dw_tile_kernel, NCHW, and
// dw_tile_cl_kernel, channels_last) run on the CPU under the CUDA emulation
// (cuda_emulation.h), forward and stride-1 backward data, against a float64 depthwise
// convolution over random geometries (channel multiplier 1-2, kernels 1-5, stride 1-2,
// padding, dilation, planes spanning several tiles both ways).  Every tile height the
// launcher (conv2d_depthwise.cu: tile_plan) can pick, round 2's and round 3's, must match the
// reference and give the same bits as the others (each output's sum has one order whatever
// the tile).  The launch parameters are built here as tile_params / cl_tile_params build them.
// Round 5's channels_last vector kernel (dw_vec_cl_kernel, no shared memory) where its plan
// applies: the reference, and the tile kernels' bits.
// Prints the checks and "0 fails" when everything matched (tests/test_native.py).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "conv2d.h"
#include "cuda_emulation.h"  // after the host headers: it defines the CUDA keywords as macros
#include "cuda/conv2d_depthwise.cuh"

using namespace convrnn::dwconv;

namespace {

std::mt19937 rng(1);
int rnd(int a, int b) { return std::uniform_int_distribution<int>(a, b)(rng); }
int checks = 0, fails = 0, vec_runs = 0;
double tile_tol = 1e-5;  // relative; looser for the random (inexact) data

struct Geo {
  int N, C, Kg, K, H, W, R, S, sh, sw, ph, pw, dh, dw, P, Q;
};

// The output size of g's sizes, or false where they make no valid layer.
bool make_geo_dims(Geo& g) {
  if (g.ph > (g.R - 1) * g.dh / 2 + 1 || g.pw > (g.S - 1) * g.dw / 2 + 1) return false;
  if (g.dh * (g.R - 1) + 1 > g.H + 2 * g.ph || g.dw * (g.S - 1) + 1 > g.W + 2 * g.pw) return false;
  g.P = (g.H + 2 * g.ph - g.dh * (g.R - 1) - 1) / g.sh + 1;
  g.Q = (g.W + 2 * g.pw - g.dw * (g.S - 1) - 1) / g.sw + 1;
  return true;
}

bool make_geo(Geo& g) {
  g.N = rnd(1, 2);
  g.C = rnd(1, 40);
  g.Kg = rnd(1, 2);
  g.K = g.C * g.Kg;
  g.H = rnd(1, 70);
  g.W = rnd(1, 40);
  g.R = rnd(1, 5);
  g.S = rnd(1, 5);
  g.sh = rnd(1, 2);
  g.sw = rnd(1, 2);
  g.ph = rnd(0, 2);
  g.pw = rnd(0, 2);
  g.dh = rnd(1, 2);
  g.dw = rnd(1, 2);
  return make_geo_dims(g);
}

// Tensors as NCHW-indexed float64 vectors; layout only matters for what the kernels read/write.
struct Data {
  std::vector<double> x, w, b, go, y, gx, gw, gb;
};

void reference(const Geo& g, Data& d) {
  d.y.assign(size_t(g.N) * g.K * g.P * g.Q, 0);
  d.gx.assign(size_t(g.N) * g.C * g.H * g.W, 0);
  d.gw.assign(size_t(g.K) * g.R * g.S, 0);
  d.gb.assign(g.K, 0);
  for (int n = 0; n < g.N; ++n)
    for (int k = 0; k < g.K; ++k)
      for (int p = 0; p < g.P; ++p)
        for (int q = 0; q < g.Q; ++q) {
          const int c = k / g.Kg;
          double acc = d.b[k];
          const double go = d.go[((size_t(n) * g.K + k) * g.P + p) * g.Q + q];
          for (int r = 0; r < g.R; ++r)
            for (int s = 0; s < g.S; ++s) {
              const int h = p * g.sh - g.ph + r * g.dh, w = q * g.sw - g.pw + s * g.dw;
              if (h < 0 || h >= g.H || w < 0 || w >= g.W) continue;
              const size_t xi = ((size_t(n) * g.C + c) * g.H + h) * g.W + w;
              acc += d.x[xi] * d.w[(size_t(k) * g.R + r) * g.S + s];
              d.gx[xi] += go * d.w[(size_t(k) * g.R + r) * g.S + s];
              d.gw[(size_t(k) * g.R + r) * g.S + s] += go * d.x[xi];
            }
          d.gb[k] += go;
          d.y[((size_t(n) * g.K + k) * g.P + p) * g.Q + q] = acc;
        }
}

// A dense (N, C, H, W) tensor in NCHW or NHWC memory order, and its strides.
template <typename T>
std::vector<T> laid_out(const std::vector<double>& v, int N, int C, int H, int W, bool cl) {
  std::vector<T> o(v.size());
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int h = 0; h < H; ++h)
        for (int w = 0; w < W; ++w) {
          const size_t src = ((size_t(n) * C + c) * H + h) * W + w;
          const size_t dst = cl ? ((size_t(n) * H + h) * W + w) * C + c : src;
          o[dst] = static_cast<T>(v[src]);
        }
  return o;
}

// The (n, c, row, col) strides of a dense (N, C, rows, cols) tensor laid out by laid_out().
struct Strides {
  int64_t n, c, h, w;
};
Strides dense_strides(int64_t C, int64_t rows, int64_t cols, bool cl) {
  return {C * rows * cols, cl ? 1 : rows * cols, cl ? cols * C : cols, cl ? C : 1};
}

// The launch parameters of conv2d_depthwise.cu's tile_params (NCHW) / cl_tile_params for an
// output plane (OH, OW) over a dense source plane (SH, SW) of SC channels; false where the
// tile of `rows` does not fit (as there).
bool plan(const Geo& g, bool cl, int rows, int OC, int OH, int OW, int SC, int SH, int SW, int sh, int sw, int ph, int pw,
          DwTile& t, int64_t& blocks) {
  int patch_h, patch_w, tiles_p, tiles_q;
  if (cl) {
    patch_h = (rows - 1) * sh + (g.R - 1) * g.dh + 1;
    patch_w = (kClTileQ - 1) * sw + (g.S - 1) * g.dw + 1;
    if (patch_h * patch_w * kClLanes > kClSmem) return false;
    tiles_p = (OH + rows - 1) / rows;
    tiles_q = (OW + kClTileQ - 1) / kClTileQ;
    blocks = int64_t(g.N) * tiles_p * tiles_q * ((OC + kClLanes - 1) / kClLanes);
  } else {
    if (g.R * g.S > kTileTaps) return false;
    patch_h = (tile_p(rows) - 1) * sh + (g.R - 1) * g.dh + 1;
    patch_w = (kTileQ - 1) * sw + (g.S - 1) * g.dw + 1;
    if (patch_h * patch_w > kTileSmem) return false;
    tiles_p = (OH + tile_p(rows) - 1) / tile_p(rows);
    tiles_q = (OW + kTileQ - 1) / kTileQ;
    blocks = int64_t(g.N) * OC * tiles_p * tiles_q;
  }
  const Strides ss = dense_strides(SC, SH, SW, cl);
  t = DwTile{OH, OW, SH, SW, g.R, g.S, sh, sw, ph, pw, g.dh, g.dw, patch_h, patch_w, tiles_p, tiles_q, OC, g.Kg,
             ss.n, ss.c, static_cast<int>(ss.h), static_cast<int>(ss.w)};
  return true;
}

std::string describe(const char* what, const Geo& g, bool cl, int rows) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s N%d C%d Kg%d H%d W%d R%d S%d s%d,%d p%d,%d d%d,%d cl%d rows%d", what, g.N, g.C,
                g.Kg, g.H, g.W, g.R, g.S, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, int(cl), rows);
  return buf;
}

// What a launch computes: the forward, or (FLIP) the backward data at stride 1 as a forward over
// grad_output with flipped taps and padding (R-1)*d - p: output (OC, OH, OW) over a source
// (SC, SH, SW) with strides sh, sw and padding ph, pw.
struct Side {
  int OC, OH, OW, SC, SH, SW, sh, sw, ph, pw;
};

template <bool FLIP>
Side side(const Geo& g) {
  if (FLIP) return {g.C, g.H, g.W, g.K, g.P, g.Q, 1, 1, (g.R - 1) * g.dh - g.ph, (g.S - 1) * g.dw - g.pw};
  return {g.K, g.P, g.Q, g.C, g.H, g.W, g.sh, g.sw, g.ph, g.pw};
}

// A kernel's output (laid out NCHW, or NHWC with cl) in NCHW order, checked against the float64
// reference (the output, or with FLIP the input gradient).
std::vector<float> checked_nchw(const std::vector<float>& out, const Geo& g, const Data& d, const Side& s, bool cl,
                                bool flip, const std::string& what) {
  std::vector<float> nchw(out.size());
  for (int n = 0; n < g.N; ++n)
    for (int c = 0; c < s.OC; ++c)
      for (int h = 0; h < s.OH; ++h)
        for (int x = 0; x < s.OW; ++x) {
          const size_t i = ((size_t(n) * s.OC + c) * s.OH + h) * s.OW + x;
          nchw[i] = out[cl ? ((size_t(n) * s.OH + h) * s.OW + x) * s.OC + c : i];
        }
  const std::vector<double>& ref = flip ? d.gx : d.y;
  ++checks;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!(std::fabs(nchw[i] - ref[i]) <= tile_tol * (1 + std::fabs(ref[i])))) {
      std::printf("FAIL %s at %zu: got %g want %g\n", what.c_str(), i, nchw[i], ref[i]);
      ++fails;
      break;
    }
  }
  return nchw;
}

// One launch of the tile kernel for (cl, rows); returns the output (NCHW-indexed) or empty when
// the tile does not fit.  FLIP: backward data at stride 1.
template <bool FLIP>
std::vector<float> run(const Geo& g, const Data& d, bool cl, int rows) {
  const Side s = side<FLIP>(g);
  DwTile t;
  int64_t blocks = 0;
  if (!plan(g, cl, rows, s.OC, s.OH, s.OW, s.SC, s.SH, s.SW, s.sh, s.sw, s.ph, s.pw, t, blocks)) return {};
  const std::vector<float> src = laid_out<float>(FLIP ? d.go : d.x, g.N, s.SC, s.SH, s.SW, cl);
  std::vector<float> w(d.w.begin(), d.w.end()), b(d.b.begin(), d.b.end());
  std::vector<float> out(size_t(g.N) * s.OC * s.OH * s.OW, 12345.0f);
  const float* bias = FLIP ? nullptr : b.data();
  auto launch = [&](void (*kernel)(const float*, const float*, const float*, float*, DwTile)) {
    emu::launch_blocks_in_turn<const float*, const float*, const float*, float*, DwTile>(
        kernel, blocks, kTileThreads, src.data(), w.data(), bias, out.data(), t);
  };
  if (cl) {
    launch(rows == kClRowsR3 ? dw_tile_cl_kernel<float, FLIP, kClRowsR3> : dw_tile_cl_kernel<float, FLIP, 1>);
  } else {
    launch(rows == kTileRowsR3 ? dw_tile_kernel<float, FLIP, kTileRowsR3> : dw_tile_kernel<float, FLIP, kTileRows>);
  }
  return checked_nchw(out, g, d, s, cl, FLIP, describe(FLIP ? "dgrad" : "fwd", g, cl, rows));
}

// One launch of round 5's channels_last vector kernel (dw_vec_cl_kernel) with the parameters
// conv2d_depthwise.cu's vec_plan builds; the output NCHW-indexed, or empty where the plan does
// not apply (Kg > 1, a window other than 3x3 or 5x5, column stride or dilation > 1, C % 4).
template <bool FLIP, int QN>
std::vector<float> run_vec(const Geo& g, const Data& d) {
  constexpr int L = vec_lanes<float>();
  const Side s = side<FLIP>(g);
  if (g.Kg != 1 || g.R != g.S || (g.R != 3 && g.R != 5) || s.sw != 1 || g.dw != 1 || s.OC % L != 0) return {};
  const std::vector<float> src = laid_out<float>(FLIP ? d.go : d.x, g.N, s.SC, s.SH, s.SW, true);
  const Strides ss = dense_strides(s.SC, s.SH, s.SW, true);
  const DwTile t{s.OH, s.OW, s.SH, s.SW, g.R, g.S, s.sh, 1, s.ph, s.pw, g.dh, 1, 0, 0, 0, 0, s.OC, 1,
                 ss.n, ss.c, static_cast<int>(ss.h), static_cast<int>(ss.w)};
  std::vector<float> w(d.w.begin(), d.w.end()), b(d.b.begin(), d.b.end());
  std::vector<float> out(size_t(g.N) * s.OC * s.OH * s.OW, 12345.0f);
  const float* bias = FLIP ? nullptr : b.data();
  const int items = g.N * s.OH * ((s.OW + QN - 1) / QN) * (s.OC / L);
  // a grid of at most 3 blocks, so that the grid-stride loop takes several turns
  const int64_t blocks = std::min(3, (items + kVecThreads - 1) / kVecThreads);
  emu::launch_blocks_in_turn<const float*, const float*, const float*, float*, DwTile, int>(
      g.R == 3 ? dw_vec_cl_kernel<float, FLIP, 3, QN, int> : dw_vec_cl_kernel<float, FLIP, 5, QN, int>, blocks,
      kVecThreads, src.data(), w.data(), bias, out.data(), t, items);
  ++vec_runs;
  return checked_nchw(out, g, d, s, true, FLIP, describe(FLIP ? "vec dgrad" : "vec fwd", g, true, QN));
}

// One check where both kernels ran (non-empty results): the same bits.
void expect_same_bits(const std::vector<float>& a, const std::vector<float>& b, const std::string& what) {
  if (a.empty() || b.empty()) return;
  ++checks;
  if (std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) != 0) {
    std::printf("FAIL %s\n", what.c_str());
    ++fails;
  }
}

template <bool FLIP>
void both_heights(const Geo& g, const Data& d, bool cl) {
  const std::vector<float> r2 = run<FLIP>(g, d, cl, cl ? 1 : kTileRows);
  const std::vector<float> r3 = run<FLIP>(g, d, cl, cl ? kClRowsR3 : kTileRowsR3);
  const std::string what = describe(FLIP ? "dgrad" : "fwd", g, cl, 0);
  expect_same_bits(r2, r3, what + ": round 3's tile differs in bits from round 2's");
  if (!cl) return;
  const std::vector<float>& tile = r2.empty() ? r3 : r2;
  // round 5's two modes: 4 and 8 outputs a thread
  for (const std::vector<float>& vec : {run_vec<FLIP, 4>(g, d), run_vec<FLIP, 8>(g, d)}) {
    expect_same_bits(vec, tile, what + ": the vector kernel differs in bits from the tile");
  }
}


// The weight gradient by the all-taps kernel of `cl` with tap bound MAXT, the pixels cut into
// chunks of chunk_len, then the chunk reduction: grad_weight (K, R, S) then grad_bias (K).
template <int MAXT>
std::vector<float> run_wgrad(const Geo& g, const Data& d, bool cl, int64_t chunk_len) {
  const std::vector<float> x = laid_out<float>(d.x, g.N, g.C, g.H, g.W, cl);
  const std::vector<float> go = laid_out<float>(d.go, g.N, g.K, g.P, g.Q, cl);
  DwGradGeom gg;
  const Strides xs = dense_strides(g.C, g.H, g.W, cl), gs = dense_strides(g.K, g.P, g.Q, cl);
  gg.x = DwGeom{g.N, g.K, g.H, g.W, g.P, g.Q, g.R, g.S, g.Kg, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
                xs.n, xs.c, xs.h, xs.w};
  gg.gs_n = gs.n;
  gg.gs_c = gs.c;
  gg.gs_h = gs.h;
  gg.gs_w = gs.w;
  gg.pixels = int64_t(g.N) * g.P * g.Q;
  gg.chunk_len = chunk_len;
  gg.chunks = static_cast<int>((gg.pixels + chunk_len - 1) / chunk_len);
  gg.taps = g.R * g.S + 1;
  std::vector<float> part(size_t(gg.chunks) * gg.taps * g.K, 777.0f);
  if (cl) {
    const int64_t blocks = int64_t(gg.chunks) * ((g.K + kClLanes - 1) / kClLanes);
    emu::launch_blocks_in_turn<const float*, const float*, float*, DwGradGeom>(
        dw_wgrad_taps_cl_kernel<float, MAXT>, blocks, kTileThreads, go.data(), x.data(), part.data(), gg);
  } else {
    const int64_t blocks = int64_t(gg.chunks) * g.K;
    emu::launch_blocks_in_turn<const float*, const float*, float*, DwGradGeom>(
        dw_wgrad_taps_kernel<float, MAXT>, blocks, kTileThreads, go.data(), x.data(), part.data(), gg);
  }
  std::vector<float> out(size_t(g.K) * g.R * g.S + g.K, 12345.0f);
  const int64_t outputs = int64_t(gg.taps) * g.K;
  emu::launch_blocks_in_turn<const float*, float*, float*, int64_t, int64_t, int64_t, DwGradGeom>(
      dw_wgrad_reduce_kernel<float>, (outputs + 255) / 256, 256, part.data(), out.data(), out.data() + size_t(g.K) * g.R * g.S,
      int64_t(g.R) * g.S, int64_t(g.S), int64_t(1), gg);
  return out;
}

Data make_data(const Geo& g, bool exact) {
  Data d;
  auto fill = [&](std::vector<double>& v, size_t n) {
    v.resize(n);
    for (auto& e : v) {
      e = exact ? rnd(-2, 2) * 0.5  // exact in float
                : static_cast<float>(std::uniform_real_distribution<double>(-2, 2)(rng));
    }
  };
  fill(d.x, size_t(g.N) * g.C * g.H * g.W);
  fill(d.w, size_t(g.K) * g.R * g.S);
  fill(d.b, g.K);
  fill(d.go, size_t(g.N) * g.K * g.P * g.Q);
  reference(g, d);
  return d;
}

void check_wgrad(const Geo& g, const Data& d, bool exact) {
  const int64_t pixels = int64_t(g.N) * g.P * g.Q;
  // One chunk, and chunks of 300-700 pixels (the launcher's are >= 128 / 1024 long); the
  // emulation runs a block at a time, so chunkings of more than 32 blocks are skipped.
  const int64_t lens[] = {pixels, std::min<int64_t>(pixels, rnd(300, 700))};
  for (int cl = 0; cl < 2; ++cl) {
    for (int bound = 0; bound < 2; ++bound) {
      if (bound == 0 && g.R * g.S + 1 > 10) continue;
      std::vector<float> first;
      for (const int64_t len : lens) {
        if ((pixels + len - 1) / len * (cl ? (g.K + kClLanes - 1) / kClLanes : g.K) > 32) continue;
        const std::vector<float> got = bound == 0 ? run_wgrad<10>(g, d, cl, len) : run_wgrad<26>(g, d, cl, len);
        ++checks;
        bool bad = false;
        for (size_t i = 0; i < got.size() && !bad; ++i) {
          const double want = i < d.gw.size() ? d.gw[i] : d.gb[i - d.gw.size()];
          const double tol = exact ? 0 : 1e-4 * (1 + std::fabs(want)) * std::sqrt(double(pixels));
          if (!(std::fabs(got[i] - want) <= tol)) {
            std::printf("FAIL %s MAXT %d chunk %lld at %zu: got %.9g want %.9g\n",
                        describe("wgrad", g, cl, 0).c_str(), bound == 0 ? 10 : 26, (long long)len, i, got[i], want);
            ++fails;
            bad = true;
          }
        }
        if (exact && !first.empty()) {
          ++checks;
          if (std::memcmp(first.data(), got.data(), got.size() * sizeof(float)) != 0) {
            std::printf("FAIL %s: chunkings differ in bits\n", describe("wgrad", g, cl, 0).c_str());
            ++fails;
          }
        }
        if (first.empty()) first = got;
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 14;
  rng.seed(argc > 2 ? std::atoi(argv[2]) : 1);
  for (int it = 0; it < iters; ++it) {
    Geo g;
    if (!make_geo(g)) {
      --it;
      continue;
    }
    if (it % 2 == 0) g.sh = g.sw = 1, g.P = g.H + 2 * g.ph - g.dh * (g.R - 1), g.Q = g.W + 2 * g.pw - g.dw * (g.S - 1);
    const bool exact = it % 3 != 2;
    tile_tol = exact ? 1e-5 : 1e-4;
    const Data d = make_data(g, exact);
    for (int cl = 0; cl < 2; ++cl) {
      both_heights<false>(g, d, cl);
      if (g.sh == 1 && g.sw == 1) both_heights<true>(g, d, cl);
    }
    if (it % 2 == 0) check_wgrad(g, d, exact);
    // A small layer of at most 3x3 taps, so that the 10-tap kernels (two pixels a thread) run
    // in NCHW too (few channels: a block each).
    Geo s;
    do {
      make_geo(s);
      s.C = rnd(1, 6);
      s.K = s.C * s.Kg;
      s.R = rnd(1, 3);
      s.S = rnd(1, 3);
    } while (!make_geo_dims(s));
    check_wgrad(s, make_data(s, exact), exact);
    // A layer that round 5's channels_last vector kernel takes: Kg = 1, C % 4 == 0, a square
    // 3x3 or 5x5 window, column stride and dilation 1 (rows: any stride, dilation, padding).
    Geo v;
    do {
      make_geo(v);
      v.Kg = 1;
      v.C = v.K = 4 * rnd(1, 10);
      v.R = v.S = rnd(0, 2) ? 3 : 5;
      v.sw = v.dw = 1;
    } while (!make_geo_dims(v));
    const Data dv = make_data(v, exact);
    both_heights<false>(v, dv, true);
    if (v.sh == 1) both_heights<true>(v, dv, true);
  }
  std::printf("%d checks (%d of the vector kernel), %d fails\n", checks, vec_runs, fails);
  return fails != 0;
}
