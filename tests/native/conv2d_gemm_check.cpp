// The conv2d implicit-GEMM kernels (csrc/cuda/conv2d_gemm_image.cuh, conv2d_gemm_wgrad.cuh)
// run on the CPU under the CUDA emulation (cuda_emulation.h; wmma/mma.h stands in for the
// tensor-core fragments), against a float64 direct convolution over random small geometries:
// groups, strides 1-3 (backward data runs one launch over every stride phase), padding,
// dilation, 1x1 (the ONE kernels), vector-width channel counts, NCHW and NHWC destinations.
//  * forward and backward data: every float32 SIMT tile conv2d_gemm_float.cu can launch, each
//    within 1e-5 of the reference and all of them bit for bit equal to each other (the tile
//    only regroups work: every output is one thread's sum in one order); float64; TF32, half
//    and bfloat16 wmma tiles (within their rounding);
//  * backward weight: the SIMT and wmma weight GEMMs into chunk partials, summed here;
//  * backward data of 2-4 channels by the direct kernel (dgrad_small_c_kernel), every dtype,
//    reduction channels over one to several 8-lane steps;
//  * simt_image_tile (conv2d_plan.cuh) only ever picks an instantiated tile.
// Prints the checks and "0 fails" when everything matched (tests/test_native.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda_emulation.h"
#include "cuda/conv2d_gemm.cuh"
#include "cuda/conv2d_gemm_image.cuh"
#include "cuda/conv2d_gemm_wgrad.cuh"

using namespace convrnn::conv;

namespace {

std::mt19937 rng(1);
int rnd(int a, int b) { return std::uniform_int_distribution<int>(a, b)(rng); }

template <typename T>
T from_d(double v);
template <>
float from_d<float>(double v) { return static_cast<float>(v); }
template <>
double from_d<double>(double v) { return v; }
template <>
__half from_d<__half>(double v) { return __float2half(static_cast<float>(v)); }
template <>
__nv_bfloat16 from_d<__nv_bfloat16>(double v) { return __float2bfloat16(static_cast<float>(v)); }
double to_d(float v) { return v; }
double to_d(double v) { return v; }
double to_d(__half v) { return __half2float(v); }
double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }

struct Geo {
  int N, groups, Cg, Kg, H, W, R, S, sh, sw, ph, pw, dh, dw, P, Q, C, K;
};

bool make_geo(Geo& g, int maxc) {
  g.N = rnd(1, 2);
  g.groups = rnd(1, 2);
  g.Cg = rnd(1, maxc);
  g.Kg = rnd(1, maxc);
  g.H = rnd(1, 10);
  g.W = rnd(1, 10);
  g.R = rnd(1, 4);
  g.S = rnd(1, 4);
  g.sh = rnd(1, 3);
  g.sw = rnd(1, 3);
  g.ph = rnd(0, 2);
  g.pw = rnd(0, 2);
  g.dh = rnd(1, 2);
  g.dw = rnd(1, 2);
  if (rnd(0, 3) == 0) {
    g.R = g.S = 1;
    g.ph = g.pw = 0;
  }
  if (g.dh * (g.R - 1) + 1 > g.H + 2 * g.ph || g.dw * (g.S - 1) + 1 > g.W + 2 * g.pw) return false;
  g.P = (g.H + 2 * g.ph - g.dh * (g.R - 1) - 1) / g.sh + 1;
  g.Q = (g.W + 2 * g.pw - g.dw * (g.S - 1) - 1) / g.sw + 1;
  g.C = g.groups * g.Cg;
  g.K = g.groups * g.Kg;
  return true;
}

struct Data {
  std::vector<double> x, w, go, bias;  // x and go NHWC, w KCRS
  std::vector<double> y, gx, gw;       // the reference: y NHWC, gx NHWC, gw KCRS
};

void reference(const Geo& g, Data& d) {
  d.y.assign(size_t(g.N) * g.P * g.Q * g.K, 0);
  d.gx.assign(size_t(g.N) * g.H * g.W * g.C, 0);
  d.gw.assign(size_t(g.K) * g.Cg * g.R * g.S, 0);
  for (int n = 0; n < g.N; ++n)
    for (int p = 0; p < g.P; ++p)
      for (int q = 0; q < g.Q; ++q)
        for (int k = 0; k < g.K; ++k) {
          const int grp = k / g.Kg;
          const size_t yi = ((size_t(n) * g.P + p) * g.Q + q) * g.K + k;
          double acc = d.bias[k];
          for (int c = 0; c < g.Cg; ++c)
            for (int r = 0; r < g.R; ++r)
              for (int s = 0; s < g.S; ++s) {
                const int h = p * g.sh - g.ph + r * g.dh, w = q * g.sw - g.pw + s * g.dw;
                if (h < 0 || h >= g.H || w < 0 || w >= g.W) continue;
                const size_t xi = ((size_t(n) * g.H + h) * g.W + w) * g.C + grp * g.Cg + c;
                const size_t wi = ((size_t(k) * g.Cg + c) * g.R + r) * g.S + s;
                acc += d.x[xi] * d.w[wi];
                d.gx[xi] += d.go[yi] * d.w[wi];
                d.gw[wi] += d.go[yi] * d.x[xi];
              }
          d.y[yi] = acc;
        }
}

// Random data exact in every dtype, and the reference.
void fill_data(const Geo& g, Data& d) {
  auto fill = [](std::vector<double>& v, size_t n) {
    v.resize(n);
    for (auto& e : v) e = rnd(-2, 2) * 0.5;
  };
  fill(d.x, size_t(g.N) * g.H * g.W * g.C);
  fill(d.w, size_t(g.K) * g.Cg * g.R * g.S);
  fill(d.go, size_t(g.N) * g.P * g.Q * g.K);
  fill(d.bias, g.K);
  reference(g, d);
}

int checks = 0, fails = 0, run_checks = 0;

void check(const char* what, const std::string& cfg, const std::vector<double>& got, const std::vector<double>& ref,
           double tol) {
  ++checks;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!(std::fabs(got[i] - ref[i]) <= tol * (1 + std::fabs(ref[i])))) {
      std::printf("FAIL %s %s at %zu: got %g want %g\n", what, cfg.c_str(), i, got[i], ref[i]);
      ++fails;
      return;
    }
  }
}

// The weight packed as the image GEMM's B operand (conv2d.cu's pack_weight, written from
// packed_row here).
template <typename T>
std::vector<T> packed(const Geo& g, const Data& d, bool dgrad, int& ldb) {
  const int cols = dgrad ? g.Cg : g.Kg, cpg = dgrad ? g.Kg : g.Cg;
  ldb = (cols + 7) / 8 * 8;
  std::vector<T> out(size_t(g.groups) * g.R * g.S * cpg * ldb + 64, from_d<T>(0));
  for (int k = 0; k < g.K; ++k)
    for (int c = 0; c < g.Cg; ++c)
      for (int r = 0; r < g.R; ++r)
        for (int s = 0; s < g.S; ++s) {
          const int grp = k / g.Kg, kl = k % g.Kg;
          const int64_t row = packed_row(dgrad, grp, r, s, dgrad ? kl : c, g.groups, cpg, g.H, g.R, g.sh, g.ph, g.dh,
                                         g.P, g.W, g.S, g.sw, g.pw, g.dw, g.Q);
          out[row * ldb + (dgrad ? c : kl)] = from_d<T>(d.w[((size_t(k) * g.Cg + c) * g.R + r) * g.S + s]);
        }
  return out;
}

template <typename T>
std::vector<T> converted(const std::vector<double>& v) {
  std::vector<T> o(v.size() + 64, from_d<T>(0));  // slack: a stray read past the end stays in bounds
  for (size_t i = 0; i < v.size(); ++i) o[i] = from_d<T>(v[i]);
  return o;
}

std::string describe(const char* name, const Geo& g, bool nchw) {
  char cfg[256];
  std::snprintf(cfg, sizeof cfg, "%s N%d g%d Cg%d Kg%d H%d W%d R%d S%d s%d,%d p%d,%d d%d,%d nchw%d", name, g.N,
                g.groups, g.Cg, g.Kg, g.H, g.W, g.R, g.S, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, int(nchw));
  return cfg;
}

// One image GEMM launch (forward or backward data) into a destination pre-filled with a
// marker; returns the destination as written and checks it against the reference.
template <typename T, int BM, int BN>
std::vector<T> run_image(void (*kernel)(ImageGemmArgs), const Geo& g, const Data& d, bool dgrad, bool nchw, double tol,
                         const char* name, int64_t (*tiles_m)(const ImageGemmArgs&) = nullptr) {
  int ldb;
  const std::vector<T> wp = packed<T>(g, d, dgrad, ldb);
  const std::vector<T> src = converted<T>(dgrad ? d.go : d.x), bias = converted<T>(d.bias);
  const int DH = dgrad ? g.H : g.P, DW = dgrad ? g.W : g.Q, DC = dgrad ? g.C : g.K;
  std::vector<T> dst(size_t(g.N) * DH * DW * DC, from_d<T>(12345));
  ImageGemmArgs a{};
  a.src = src.data();
  a.wgt = wp.data();
  a.bias = dgrad ? nullptr : bias.data();
  a.dst = dst.data();
  if (nchw) {
    a.dst_sn = int64_t(DC) * DH * DW, a.dst_sc = int64_t(DH) * DW, a.dst_sh = DW, a.dst_sw = 1;
  } else {
    a.dst_sn = int64_t(DH) * DW * DC, a.dst_sc = 1, a.dst_sh = int64_t(DW) * DC, a.dst_sw = DC;
  }
  a.nimg = g.N;
  a.cs = dgrad ? g.K : g.C;
  a.cpg = dgrad ? g.Kg : g.Cg;
  a.ncols = dgrad ? g.Cg : g.Kg;
  a.ldb = ldb;
  a.groups = g.groups;
  a.R = g.R, a.S = g.S, a.dgrad = dgrad;
  a.H = g.H, a.W = g.W, a.P = g.P, a.Q = g.Q;
  a.sh = g.sh, a.sw = g.sw, a.ph = g.ph, a.pw = g.pw, a.dh = g.dh, a.dw = g.dw;
  a.phases_h = dgrad ? std::min(g.sh, g.H) : 1;
  a.phases_w = dgrad ? std::min(g.sw, g.W) : 1;
  // conv2d_gemm_launch.cuh's image_grid
  const int64_t rows = dgrad ? int64_t(g.N) * ((g.H + g.sh - 1) / g.sh) * ((g.W + g.sw - 1) / g.sw)
                             : int64_t(g.N) * g.P * g.Q;
  a.tiles_m = tiles_m != nullptr ? tiles_m(a) : (rows + BM - 1) / BM;
  a.tiles_n = (a.ncols + BN - 1) / BN;
  emu::launch_blocks_in_turn(kernel, a.tiles_m * a.tiles_n * a.phases_h * a.phases_w * a.groups, kGemmThreads, a);
  std::vector<double> got(dst.size());
  for (int n = 0; n < g.N; ++n)
    for (int h = 0; h < DH; ++h)
      for (int w = 0; w < DW; ++w)
        for (int c = 0; c < DC; ++c)
          got[((size_t(n) * DH + h) * DW + w) * DC + c] = to_d(dst[n * a.dst_sn + c * a.dst_sc + h * a.dst_sh + w * a.dst_sw]);
  check(dgrad ? "dgrad" : "fwd", describe(name, g, nchw), got, dgrad ? d.gx : d.y, tol);
  return dst;
}

// The float32 SIMT kernel of every tile in kSimtTiles (what conv2d_gemm_float.cu can launch),
// each checked against the reference; their outputs and names appended.
template <bool ONE, size_t... I>
void run_all_tiles(const Geo& g, const Data& d, bool dgrad, bool nchw, std::vector<std::vector<float>>& outs,
                   std::vector<std::string>& names, std::index_sequence<I...>) {
  (
      [&] {
        constexpr SimtTile t = kSimtTiles[I];
        const std::string name = "simt " + std::to_string(t.bm) + "x" + std::to_string(t.bn) + (ONE ? " one" : "");
        outs.push_back(run_image<float, t.bm, t.bn>(image_gemm_simt_kernel<float, t.bm, t.bn, ONE>, g, d, dgrad, nchw,
                                                    1e-5, name.c_str()));
        names.push_back(name);
      }(),
      ...);
}

// Every float32 SIMT tile of conv2d_gemm_float.cu: each against the reference, and all of
// them bit for bit against the first.
template <bool ONE>
void simt_tiles(const Geo& g, const Data& d, bool dgrad, bool nchw) {
  std::vector<std::vector<float>> outs;
  std::vector<std::string> names;
  run_all_tiles<ONE>(g, d, dgrad, nchw, outs, names, std::make_index_sequence<kSimtTileCount>{});
  for (size_t i = 1; i < outs.size(); ++i) {
    ++checks;
    if (std::memcmp(outs[i].data(), outs[0].data(), outs[0].size() * sizeof(float)) != 0) {
      std::printf("FAIL %s: %s differs in bits from %s\n", describe(dgrad ? "dgrad" : "fwd", g, nchw).c_str(),
                  names[i].c_str(), names[0].c_str());
      ++fails;
    }
  }
}

// The direct backward data of 2-4 input channels (dgrad_small_c_kernel, where
// conv2d_gemm_launch.cuh's dgrad_small_c launches it): every dtype against the reference.
template <int CG>
void small_c(const Geo& g, const Data& d, bool nchw) {
  constexpr int BM = kSmallCBlockRows;
  run_image<float, BM, 16>(dgrad_small_c_kernel<float, CG>, g, d, true, nchw, 1e-5, "small-C float");
  run_image<double, BM, 16>(dgrad_small_c_kernel<double, CG>, g, d, true, nchw, 1e-12, "small-C double");
  run_image<__half, BM, 16>(dgrad_small_c_kernel<__half, CG>, g, d, true, nchw, 2e-3, "small-C half");
  run_image<__nv_bfloat16, BM, 16>(dgrad_small_c_kernel<__nv_bfloat16, CG>, g, d, true, nchw, 1e-2, "small-C bf16");
  ImageGemmArgs geo{};  // the run kernel where the launcher takes it (small_c_run_ok)
  geo.W = g.W, geo.S = g.S, geo.sw = g.sw, geo.pw = g.pw, geo.dw = g.dw, geo.Q = g.Q;
  geo.phases_w = std::min(g.sw, g.W);
  if (!small_c_run_ok(geo)) return;
  ++run_checks;
  constexpr int RB = kSmallCRunsPerBlock;  // BN only matters for tiles_n (1)
  run_image<float, RB, 16>(dgrad_small_c_run_kernel<float, CG>, g, d, true, nchw, 1e-5, "small-C run float",
                           small_c_run_tiles);
  run_image<double, RB, 16>(dgrad_small_c_run_kernel<double, CG>, g, d, true, nchw, 1e-12, "small-C run double",
                            small_c_run_tiles);
  run_image<__half, RB, 16>(dgrad_small_c_run_kernel<__half, CG>, g, d, true, nchw, 2e-3, "small-C run half",
                            small_c_run_tiles);
  run_image<__nv_bfloat16, RB, 16>(dgrad_small_c_run_kernel<__nv_bfloat16, CG>, g, d, true, nchw, 1e-2,
                                   "small-C run bf16", small_c_run_tiles);
}

template <typename T, typename A, int BM, int BN>
void run_wgrad(void (*kernel)(WgradArgs), const Geo& g, const Data& d, double tol, const char* name, int chunk_len) {
  const std::vector<T> go = converted<T>(d.go), x = converted<T>(d.x);
  const int64_t rsc = int64_t(g.R) * g.S * g.Cg, pixels = int64_t(g.N) * g.P * g.Q;
  WgradArgs a{};
  a.chunk_len = chunk_len;
  a.chunks = static_cast<int>((pixels + chunk_len - 1) / chunk_len);
  std::vector<A> part(size_t(a.chunks) * g.K * rsc, A(777));
  a.go = go.data();
  a.x = x.data();
  a.partial = part.data();
  a.H = g.H, a.W = g.W, a.C = g.C, a.K = g.K, a.P = g.P, a.Q = g.Q, a.R = g.R, a.S = g.S;
  a.Cg = g.Cg, a.Kg = g.Kg, a.groups = g.groups;
  a.sh = g.sh, a.sw = g.sw, a.ph = g.ph, a.pw = g.pw, a.dh = g.dh, a.dw = g.dw;
  a.pixels = pixels;
  a.tiles_m = (g.Kg + BM - 1) / BM;
  a.tiles_n = static_cast<int>((rsc + BN - 1) / BN);
  emu::launch_blocks_in_turn(kernel, int64_t(a.tiles_m) * a.tiles_n * a.chunks * g.groups, kGemmThreads, a);
  std::vector<double> got(size_t(g.K) * rsc);
  for (int k = 0; k < g.K; ++k)
    for (int64_t n = 0; n < rsc; ++n) {
      double s = 0;
      for (int c = 0; c < a.chunks; ++c) s += part[(size_t(c) * g.K + k) * rsc + n];
      const int cc = static_cast<int>(n % g.Cg), rs = static_cast<int>(n / g.Cg);
      got[((size_t(k) * g.Cg + cc) * g.R + rs / g.S) * g.S + rs % g.S] = s;
    }
  check("wgrad", describe(name, g, false) + " chunk" + std::to_string(chunk_len), got, d.gw, tol);
}

// simt_image_tile over random grids: only tiles image_simt_float instantiates, 16-column
// tiles exactly when there are at most 16 columns, never a column tile wider than the first.
void tile_rule() {
  for (int i = 0; i < 20000; ++i) {
    const int64_t rows = std::uniform_int_distribution<int64_t>(1, int64_t(1) << 22)(rng);
    const int ncols = rnd(1, 600), sms = rnd(1, 160);
    const int64_t planes = rnd(1, 64);
    const SimtTile t = simt_image_tile(rows, ncols, planes, sms);
    bool known = false;  // one that image_simt_float instantiates
    for (const SimtTile& k : kSimtTiles) known = known || (k.bm == t.bm && k.bn == t.bn);
    const int top = ncols <= 16 ? 16 : ncols <= 32 ? 32 : ncols <= 64 ? 64 : 128;
    ++checks;
    if (!known || (t.bn == 16) != (ncols <= 16) || t.bn > top) {
      std::printf("FAIL tile rule rows %lld ncols %d planes %lld sms %d -> %d x %d\n", static_cast<long long>(rows),
                  ncols, static_cast<long long>(planes), sms, t.bm, t.bn);
      ++fails;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 12;
  rng.seed(argc > 2 ? std::atoi(argv[2]) : 1);
  tile_rule();
  for (int it = 0; it < iters; ++it) {
    Geo g;
    const int maxc = it % 3 == 0 ? 40 : it % 3 == 1 ? 16 : 5;
    if (!make_geo(g, maxc)) {
      --it;
      continue;
    }
    if (it % 4 == 0) {  // the vector (16-byte) load paths
      g.Cg = 8 * rnd(1, 3);
      g.Kg = 8 * rnd(1, 3);
    }
    g.C = g.groups * g.Cg;
    g.K = g.groups * g.Kg;
    Data d;
    fill_data(g, d);
    const bool one = g.R == 1 && g.S == 1 && g.ph == 0 && g.pw == 0;
    const bool nchw = rnd(0, 1) == 1;
    for (int dgrad = 0; dgrad < 2; ++dgrad) {
      simt_tiles<false>(g, d, dgrad, nchw);
      if (one) simt_tiles<true>(g, d, dgrad, nchw);
      run_image<double, 64, 64>(image_gemm_simt_kernel<double, 64, 64, false>, g, d, dgrad, nchw, 1e-12, "simt double");
      run_image<float, 128, 64>(image_gemm_wmma_kernel<float, 64, false>, g, d, dgrad, nchw, 1e-2, "tf32 64");
      run_image<__half, 128, 32>(image_gemm_wmma_kernel<__half, 32, false>, g, d, dgrad, nchw, 2e-3, "half 32");
      run_image<__nv_bfloat16, 128, 128>(image_gemm_wmma_kernel<__nv_bfloat16, 128, false>, g, d, dgrad, nchw, 1e-2,
                                         "bf16 128");
      const int cpg = dgrad ? g.Kg : g.Cg, cs = dgrad ? g.K : g.C;
      if (cpg % 8 == 0 && cs % 8 == 0) {
        run_image<__half, 128, 64>(image_gemm_wmma_kernel<__half, 64, true>, g, d, dgrad, nchw, 2e-3, "half 64 vec");
        if (cpg % 4 == 0) {
          run_image<float, 128, 128>(image_gemm_wmma_kernel<float, 128, true>, g, d, dgrad, nchw, 1e-2, "tf32 128 vec");
        }
      }
    }
    const int chunk = 32 * rnd(1, 3);
    run_wgrad<float, float, 64, 128>(wgrad_simt_kernel<float, 64, 128>, g, d, 1e-5, "wgrad simt 64x128", chunk);
    run_wgrad<float, float, 128, 128>(wgrad_simt_kernel<float, 128, 128>, g, d, 1e-5, "wgrad simt 128x128", chunk);
    run_wgrad<double, double, 64, 64>(wgrad_simt_kernel<double, 64, 64>, g, d, 1e-12, "wgrad simt double", chunk);
    run_wgrad<__half, float, 64, 64>(wgrad_wmma_kernel<__half, 64, 64, 16, 2, false>, g, d, 1e-5, "wgrad half", chunk);
    if (g.Kg % 8 == 0 && g.Cg % 8 == 0) {
      run_wgrad<__nv_bfloat16, float, 64, 128>(wgrad_wmma_kernel<__nv_bfloat16, 64, 128, 32, 2, true>, g, d, 1e-5,
                                              "wgrad bf16 vec", chunk);
    }
  }
  // The direct small-C backward data: one group, 2-4 input channels, Kg in 16-byte vectors
  // (8 to 72: one to five 8-lane steps, the last one partly idle), filters of 2-4 taps a side
  // (several taps in a stride phase along both axes).
  for (int it = 0; it < 2 * iters; ++it) {
    Geo g;
    if (!make_geo(g, 4) || g.R < 2 || g.S < 2) {
      --it;
      continue;
    }
    g.groups = 1;
    g.Cg = rnd(2, 4);
    g.Kg = 8 * rnd(1, 9);
    if (it % 2 == 0) {  // images of several 128-pixel blocks a phase: every pixel slot of a lane group
      g.H = rnd(12, 30);
      g.W = rnd(12, 30);
      g.P = (g.H + 2 * g.ph - g.dh * (g.R - 1) - 1) / g.sh + 1;
      g.Q = (g.W + 2 * g.pw - g.dw * (g.S - 1) - 1) / g.sw + 1;
    }
    g.C = g.Cg;
    g.K = g.Kg;
    Data d;
    fill_data(g, d);
    const bool nchw = rnd(0, 1) == 1;
    if (g.Cg == 2) small_c<2>(g, d, nchw);
    if (g.Cg == 3) small_c<3>(g, d, nchw);
    if (g.Cg == 4) small_c<4>(g, d, nchw);
  }
  if (run_checks < iters / 2) {  // the random geometries must reach the run kernel often
    std::printf("FAIL only %d geometries took the small-C run kernel\n", run_checks);
    ++fails;
  }
  std::printf("%d checks (%d small-C run geometries), %d fails\n", checks, run_checks, fails);
  return fails != 0;
}
