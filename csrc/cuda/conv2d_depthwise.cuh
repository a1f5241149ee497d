// conv2d CUDA: the depthwise kernels (groups == C, Cg == 1; K = C * Kg), direct; launched
// by conv2d_depthwise.cu.  See there for the scheme.
#pragma once

#include "conv2d.h"
#include "cuda/grid_stride.cuh"
#include "cuda/lanes.cuh"
#include "cuda/stage.cuh"

namespace convrnn {
namespace dwconv {

struct DwGeom {
  int64_t N, K, H, W, P, Q, R, S, Kg;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t xs_n, xs_c, xs_h, xs_w;  // strides of the image operand (input or grad_output)
};

// (n, c, row, col) of element e of a dense (N, C, rows, cols) tensor in NCHW or NHWC order.
template <bool CL, typename index_t>
__device__ __forceinline__ void split4(index_t e, index_t C, index_t rows, index_t cols, index_t& n, index_t& c,
                                       index_t& row, index_t& col) {
  if (CL) {
    c = e % C;
    e /= C;
    col = e % cols;
    e /= cols;
    row = e % rows;
    n = e / rows;
  } else {
    col = e % cols;
    e /= cols;
    row = e % rows;
    e /= rows;
    c = e % C;
    n = e / C;
  }
}

template <typename T, bool CL, typename index_t>
__global__ void dw_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                  T* __restrict__ y, DwGeom d, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    index_t n, k, p, q;
    split4<CL, index_t>(e, d.K, d.P, d.Q, n, k, p, q);
    const index_t h0 = p * d.sh - d.ph, w0 = q * d.sw - d.pw;
    const TapRange<index_t> tr = conv_taps<index_t>(h0, d.H, d.R, d.dh);
    const TapRange<index_t> ts = conv_taps<index_t>(w0, d.W, d.S, d.dw);
    const T* xp = x + static_cast<int64_t>(n) * d.xs_n + static_cast<int64_t>(k / d.Kg) * d.xs_c;
    const T* wp = w + static_cast<int64_t>(k) * d.R * d.S;
    acc_t<T> acc = bias != nullptr ? static_cast<acc_t<T>>(bias[k]) : acc_t<T>(0);
    for (index_t r = tr.lo; r < tr.hi; ++r) {
      const T* xr = xp + static_cast<int64_t>(h0 + r * d.dh) * d.xs_h;
      for (index_t s = ts.lo; s < ts.hi; ++s) {
        acc += static_cast<acc_t<T>>(xr[static_cast<int64_t>(w0 + s * d.dw) * d.xs_w]) *
               static_cast<acc_t<T>>(wp[r * d.S + s]);
      }
    }
    y[e] = static_cast<T>(acc);
  }
}

// d's strides are grad_output's here.
template <typename T, bool CL, typename index_t>
__global__ void dw_backward_data_kernel(const T* __restrict__ go, const T* __restrict__ w, T* __restrict__ gi,
                                        DwGeom d, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    index_t n, c, h, x;
    split4<CL, index_t>(e, d.K / d.Kg, d.H, d.W, n, c, h, x);
    acc_t<T> acc = 0;
    for (index_t j = 0; j < d.Kg; ++j) {
      const index_t k = c * d.Kg + j;
      const T* gp = go + static_cast<int64_t>(n) * d.xs_n + static_cast<int64_t>(k) * d.xs_c;
      const T* wp = w + static_cast<int64_t>(k) * d.R * d.S;
      for (index_t r = 0; r < d.R; ++r) {
        const index_t p = conv_source<index_t>(h, r, d.sh, d.ph, d.dh, d.P);
        if (p < 0) continue;
        for (index_t s = 0; s < d.S; ++s) {
          const index_t q = conv_source<index_t>(x, s, d.sw, d.pw, d.dw, d.Q);
          if (q < 0) continue;
          acc += static_cast<acc_t<T>>(gp[static_cast<int64_t>(p) * d.xs_h + static_cast<int64_t>(q) * d.xs_w]) *
                 static_cast<acc_t<T>>(wp[r * d.S + s]);
        }
      }
    }
    gi[e] = static_cast<T>(acc);
  }
}

// ---- NCHW tiled direct kernels (round 2; round 3: TR rows a thread) ----
// One block of kTileThreads = 32 x 8 threads computes a tile_p(TR) x kTileQ (8 TR x 32) output
// tile of one (n, o) plane: it stages the source patch under the tile (halo included, zeros
// outside the image) and the taps in shared memory, then each thread computes TR outputs of
// one column (round 2: TR = 2, 16 x 32 tiles; round 3 takes TR = 8, 64 x 32, where the patch
// fits: a quarter of the blocks, each with 4x the work and independent sums per thread for
// the same staging and barrier, where 16 x 32 tiles left each block ~5K FMAs between a load
// phase and a store).  Each output's sum runs over the same taps in the same order for any TR.  Serves the forward (source channel o / Kg, weight o) and the
// stride-1 backward data (a forward over grad_output with flipped taps and padding
// (R-1)*d - p, summed over the Kg channels o*Kg + j in order).  Plane-relative offsets are
// 32-bit (the launcher checks every plane fits), the plane bases 64-bit.
constexpr int kTileThreads = 256, kTileQ = 32, kTileRows = 2, kTileRowsR3 = 8;
constexpr int kStageLoads = 8;  // patch loads in flight a thread while staging (cuda/stage.cuh)
constexpr int tile_p(int rows) { return (kTileThreads / kTileQ) * rows; }
constexpr int kTileSmem = 3072;  // patch elements (acc_t)
constexpr int kTileTaps = 128;   // most R*S

struct DwTile {
  int OH, OW;             // output plane
  int SH, SW;             // source plane
  int R, S, sh, sw, ph, pw, dh, dw;
  int patch_h, patch_w;   // (tile_p(TR)-1)*sh + (R-1)*dh + 1, (kTileQ-1)*sw + (S-1)*dw + 1 (CL: see there)
  int tiles_p, tiles_q;   // tiles per plane
  int OC, Kg;             // output channels; Kg of the convolution
  int64_t ss_n, ss_c;     // source strides (n, c); ss_h, ss_w below
  int ss_h, ss_w;
};

// FLIP: backward data (source grad_output, output grad_input); else forward.
template <typename T, bool FLIP, int TR>
__global__ void __launch_bounds__(kTileThreads)
    dw_tile_kernel(const T* __restrict__ src, const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out,
                   DwTile t) {
  using A = acc_t<T>;
  __shared__ A patch[kTileSmem];
  __shared__ A taps[kTileTaps];
  const int tid = threadIdx.x, tx = tid % kTileQ, ty = tid / kTileQ;
  int64_t b = blockIdx.x;
  const int tq = static_cast<int>(b % t.tiles_q);
  b /= t.tiles_q;
  const int tp = static_cast<int>(b % t.tiles_p);
  b /= t.tiles_p;
  const int64_t o = b % t.OC, n = b / t.OC;
  const int p0 = tp * tile_p(TR), q0 = tq * kTileQ;
  const int h0 = p0 * t.sh - t.ph, w0 = q0 * t.sw - t.pw;
  const int RS = t.R * t.S, patch_n = t.patch_h * t.patch_w;
  A acc[TR];
#pragma unroll
  for (int i = 0; i < TR; ++i) acc[i] = (!FLIP && bias != nullptr) ? static_cast<A>(bias[o]) : A(0);
  const int nsrc = FLIP ? t.Kg : 1;
  for (int j = 0; j < nsrc; ++j) {
    const int64_t sc = FLIP ? o * t.Kg + j : o / t.Kg;  // source channel = weight row for FLIP
    const int64_t wk = FLIP ? sc : o;
    const T* sp = src + n * t.ss_n + sc * t.ss_c;
    if (j > 0) __syncthreads();  // the previous channel's patch is consumed
    stage_batched<kStageLoads>(
        tid, patch_n, kTileThreads,
        [&](int i) {
          const int row = i / t.patch_w, col = i - row * t.patch_w;
          const int h = h0 + row, x = w0 + col;
          return (h >= 0 && h < t.SH && x >= 0 && x < t.SW) ? static_cast<A>(sp[h * t.ss_h + x * t.ss_w]) : A(0);
        },
        [&](int i, A v) { patch[i] = v; });
    for (int i = tid; i < RS; i += kTileThreads) taps[i] = static_cast<A>(w[wk * RS + (FLIP ? RS - 1 - i : i)]);
    __syncthreads();
    const A* pc = patch + (ty * TR * t.sh) * t.patch_w + tx * t.sw;
    for (int r = 0; r < t.R; ++r) {
      const A* pr = pc + r * t.dh * t.patch_w;
      for (int s = 0; s < t.S; ++s) {
        const A wv = taps[r * t.S + s];
        const A* ps = pr + s * t.dw;
#pragma unroll
        for (int i = 0; i < TR; ++i) acc[i] += ps[i * t.sh * t.patch_w] * wv;
      }
    }
  }
  const int q = q0 + tx;
  if (q >= t.OW) return;
  T* op = out + (n * t.OC + o) * (static_cast<int64_t>(t.OH) * t.OW);
#pragma unroll
  for (int i = 0; i < TR; ++i) {
    const int p = p0 + ty * TR + i;
    if (p < t.OH) op[p * t.OW + q] = static_cast<T>(acc[i]);
  }
}

// channels_last tiled kernel: block of 32 channel lanes x 8 pixel groups per (n, ROWS output
// rows from p0, kClTileQ outputs along q, 32 output channels); the source rows under the tile
// (halo included, zeros outside) staged as patch[row][col][lane], lane = channel (coalesced
// loads along channels); each thread computes ROWS x kClTileQ / 8 outputs of one channel.
// Forward and stride-1 backward data as dw_tile_kernel.  t.tiles_p = ceil(OH / ROWS),
// t.tiles_q = ceil(OW / kClTileQ), patch_h = (ROWS-1)*sh + (R-1)*dh + 1,
// patch_w = (kClTileQ-1)*sw + (S-1)*dw + 1.  Round 2: ROWS = 1 (512 outputs a block, each
// source row staged R times by R blocks); round 3 takes ROWS = 4 where the patch fits (the
// halo rows shared, 4x the work a block).  Each output's sum has the same order for any ROWS.
constexpr int kClTileQ = 16, kClLanes = 32, kClGroups = kTileThreads / kClLanes, kClPer = kClTileQ / kClGroups;
constexpr int kClRowsR3 = 4;
constexpr int kClSmem = 4096;

template <typename T, bool FLIP, int ROWS>
__global__ void __launch_bounds__(kTileThreads)
    dw_tile_cl_kernel(const T* __restrict__ src, const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out,
                      DwTile t) {
  using A = acc_t<T>;
  __shared__ A patch[kClSmem];
  const int tid = threadIdx.x, lane = tid % kClLanes, grp = tid / kClLanes;
  const int tiles_c = (t.OC + kClLanes - 1) / kClLanes;
  int64_t b = blockIdx.x;
  const int tc = static_cast<int>(b % tiles_c);
  b /= tiles_c;
  const int tq = static_cast<int>(b % t.tiles_q);
  b /= t.tiles_q;
  const int p0 = static_cast<int>(b % t.tiles_p) * ROWS;
  const int64_t n = b / t.tiles_p;
  const int q0 = tq * kClTileQ, o = tc * kClLanes + lane;
  const bool live = o < t.OC;
  const int h0 = p0 * t.sh - t.ph, w0 = q0 * t.sw - t.pw;
  const int RS = t.R * t.S, pix_n = t.patch_h * t.patch_w;
  A acc[ROWS][kClPer];
#pragma unroll
  for (int y = 0; y < ROWS; ++y)
#pragma unroll
    for (int i = 0; i < kClPer; ++i) acc[y][i] = (!FLIP && bias != nullptr && live) ? static_cast<A>(bias[o]) : A(0);
  const int nsrc = FLIP ? t.Kg : 1;
  for (int j = 0; j < nsrc; ++j) {
    const int64_t sc = !live ? 0 : FLIP ? static_cast<int64_t>(o) * t.Kg + j : o / t.Kg;  // this lane's source channel
    if (j > 0) __syncthreads();
    const T* sp = src + n * t.ss_n + sc * t.ss_c;
    stage_batched<kStageLoads>(
        grp, pix_n, kClGroups,
        [&](int pix) {
          const int row = pix / t.patch_w, col = pix - row * t.patch_w;
          const int h = h0 + row, x = w0 + col;
          return (live && h >= 0 && h < t.SH && x >= 0 && x < t.SW) ? static_cast<A>(sp[h * t.ss_h + x * t.ss_w])
                                                                    : A(0);
        },
        [&](int pix, A v) { patch[pix * kClLanes + lane] = v; });
    __syncthreads();
    const T* wp = w + (FLIP ? sc : static_cast<int64_t>(o)) * RS;
    for (int r = 0; r < t.R; ++r) {
      for (int s = 0; s < t.S; ++s) {
        const int tap = r * t.S + s;
        const A wv = live ? static_cast<A>(wp[FLIP ? RS - 1 - tap : tap]) : A(0);
#pragma unroll
        for (int y = 0; y < ROWS; ++y) {
          const A* ps = patch + ((y * t.sh + r * t.dh) * t.patch_w + s * t.dw) * kClLanes + lane;
#pragma unroll
          for (int i = 0; i < kClPer; ++i) acc[y][i] += ps[((grp + i * kClGroups) * t.sw) * kClLanes] * wv;
        }
      }
    }
  }
  if (!live) return;
#pragma unroll
  for (int y = 0; y < ROWS; ++y) {
    if (p0 + y >= t.OH) break;
    T* op = out + (n * t.OH + p0 + y) * static_cast<int64_t>(t.OW) * t.OC + o;
#pragma unroll
    for (int i = 0; i < kClPer; ++i) {
      const int q = q0 + grp + i * kClGroups;
      if (q < t.OW) op[static_cast<int64_t>(q) * t.OC] = static_cast<T>(acc[y][i]);
    }
  }
}

// channels_last vector kernel (round 5, session 12): no shared memory, no barrier.  One thread computes
// QN adjacent outputs along a row (q0 .. q0 + QN - 1) for L adjacent channels (one 8- or
// 16-byte vector: float32 and half types L = 4, float64 L = 2), reading each of the KS source
// rows' QN + KS - 1 columns once as L-wide vectors (the columns shared by the QN outputs
// are loaded once, the rows shared with the neighbouring output rows come from L1/L2), and
// writes QN L-wide stores.  Threads in the output's memory order (channel vectors fastest,
// then strips of QN columns, rows, images), so a warp's loads and stores are contiguous runs
// of a row's channels.  For a square KS x KS window, column stride 1 and column dilation 1
// (any row stride, row dilation and padding), Kg == 1, C % L == 0, the source's channels
// contiguous and every pointer and stride a multiple of the vector: the launcher checks
// (conv2d_depthwise.cu: vec_plan).  Forward and stride-1 backward data (FLIP) as the tile
// kernels, with each output's sum over the same taps in the same order (bias first, then
// (r, s) row-major; taps outside the image: zero terms in columns, skipped rows), so the
// results are the tile kernels' bit for bit (a zero's sign aside).
constexpr int kVecThreads = 256;

template <typename T>
constexpr int vec_lanes() {
  return sizeof(T) >= 8 ? 2 : 4;
}

template <typename T, bool FLIP, int KS, int QN, typename index_t>
__global__ void __launch_bounds__(kVecThreads)
    dw_vec_cl_kernel(const T* __restrict__ src, const T* __restrict__ w, const T* __restrict__ bias,
                     T* __restrict__ out, DwTile t, index_t items) {
  using A = acc_t<T>;
  constexpr int L = vec_lanes<T>(), NC = QN + KS - 1, RS = KS * KS;
  using V = Lanes<T, L>;
  const index_t cv = static_cast<index_t>(t.OC / L), strips = static_cast<index_t>((t.OW + QN - 1) / QN);
  CONVRNN_GRID_STRIDE(index_t, e, items) {
    index_t rest = e;
    const index_t c4 = rest % cv;
    rest /= cv;
    const index_t qs = rest % strips;
    rest /= strips;
    const index_t p = rest % static_cast<index_t>(t.OH);
    const index_t n = rest / static_cast<index_t>(t.OH);
    const int c = static_cast<int>(c4) * L, q0 = static_cast<int>(qs) * QN;
    const int h0 = static_cast<int>(p) * t.sh - t.ph, w0 = q0 - t.pw;
    A acc[QN][L];
#pragma unroll
    for (int l = 0; l < L; ++l) {
      const A b0 = (!FLIP && bias != nullptr) ? static_cast<A>(bias[c + l]) : A(0);
#pragma unroll
      for (int i = 0; i < QN; ++i) acc[i][l] = b0;
    }
    const T* sp = src + static_cast<int64_t>(n) * t.ss_n + c;
#pragma unroll
    for (int r = 0; r < KS; ++r) {
      const int h = h0 + r * t.dh;
      if (h < 0 || h >= t.SH) continue;
      const T* row = sp + static_cast<int64_t>(h) * t.ss_h;
      V x[NC];
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        const int col = w0 + j;
        if (col >= 0 && col < t.SW) {
          x[j] = *reinterpret_cast<const V*>(row + static_cast<int64_t>(col) * t.ss_w);
        } else {
#pragma unroll
          for (int l = 0; l < L; ++l) x[j].v[l] = T(0);
        }
      }
#pragma unroll
      for (int s = 0; s < KS; ++s) {
        const int tap = r * KS + s;
        A wv[L];
#pragma unroll
        for (int l = 0; l < L; ++l) wv[l] = static_cast<A>(w[static_cast<int64_t>(c + l) * RS + (FLIP ? RS - 1 - tap : tap)]);
#pragma unroll
        for (int i = 0; i < QN; ++i) {
#pragma unroll
          for (int l = 0; l < L; ++l) acc[i][l] += static_cast<A>(x[i + s].v[l]) * wv[l];
        }
      }
    }
    T* op = out + ((static_cast<int64_t>(n) * t.OH + p) * t.OW + q0) * t.OC + c;
#pragma unroll
    for (int i = 0; i < QN; ++i) {
      if (q0 + i >= t.OW) break;
      V o;
#pragma unroll
      for (int l = 0; l < L; ++l) o.v[l] = static_cast<T>(acc[i][l]);
      *reinterpret_cast<V*>(op + static_cast<int64_t>(i) * t.OC) = o;
    }
  }
}

// Strides of both operands of the weight gradient.
struct DwGradGeom {
  DwGeom x;  // input strides in x.xs_*
  int64_t gs_n, gs_c, gs_h, gs_w;
  int64_t pixels, chunk_len;
  int chunks, taps;  // taps = R*S (+1 for the bias)
};

// The product of tap `tap` at output pixel (n, p, q) of channel k: grad_output times the
// input under the tap (0 outside the image), or grad_output alone for the bias tap.
template <typename T>
__device__ __forceinline__ acc_t<T> dw_tap_product(const T* __restrict__ go, const T* __restrict__ x,
                                                   const DwGradGeom& g, int64_t n, int64_t k, int64_t p, int64_t q,
                                                   int64_t r, int64_t s, bool bias_tap) {
  const acc_t<T> gv = static_cast<acc_t<T>>(go[n * g.gs_n + k * g.gs_c + p * g.gs_h + q * g.gs_w]);
  if (bias_tap) return gv;
  const DwGeom& d = g.x;
  const int64_t h = p * d.sh - d.ph + r * d.dh, w = q * d.sw - d.pw + s * d.dw;
  if (h < 0 || h >= d.H || w < 0 || w >= d.W) return acc_t<T>(0);
  return gv * static_cast<acc_t<T>>(x[n * d.xs_n + (k / d.Kg) * d.xs_c + h * d.xs_h + w * d.xs_w]);
}

// channels_last: thread per (chunk, tap, k), k fastest; partial[chunk][tap][k].
template <typename T>
__global__ void dw_wgrad_thread_kernel(const T* __restrict__ go, const T* __restrict__ x, acc_t<T>* __restrict__ part,
                                       DwGradGeom g, int64_t total) {
  const DwGeom& d = g.x;
  CONVRNN_GRID_STRIDE(int64_t, e, total) {
    const int64_t k = e % d.K, t = e / d.K;
    const int64_t tap = t % g.taps, chunk = t / g.taps;
    const bool bias_tap = tap == d.R * d.S;
    const int64_t r = bias_tap ? 0 : tap / d.S, s = bias_tap ? 0 : tap % d.S;
    const int64_t first = chunk * g.chunk_len;
    const int64_t last = first + g.chunk_len < g.pixels ? first + g.chunk_len : g.pixels;
    int64_t q = first % d.Q, p = (first / d.Q) % d.P, n = first / (d.Q * d.P);
    acc_t<T> acc = 0;
    for (int64_t pix = first; pix < last; ++pix) {
      acc += dw_tap_product<T>(go, x, g, n, k, p, q, r, s, bias_tap);
      if (++q == d.Q) {
        q = 0;
        if (++p == d.P) {
          p = 0;
          ++n;
        }
      }
    }
    part[e] = acc;
  }
}

// NCHW: warp per (chunk, k, tap); lanes take pixels lane, lane + 32, ... of the chunk.
template <typename T>
__global__ void dw_wgrad_warp_kernel(const T* __restrict__ go, const T* __restrict__ x, acc_t<T>* __restrict__ part,
                                     DwGradGeom g, int64_t warps) {
  const DwGeom& d = g.x;
  const int lane = threadIdx.x % 32;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t wi = first_warp; wi < warps; wi += warp_stride) {  // uniform over the warp
    const int64_t tap = wi % g.taps, t = wi / g.taps;
    const int64_t k = t % d.K, chunk = t / d.K;
    const bool bias_tap = tap == d.R * d.S;
    const int64_t r = bias_tap ? 0 : tap / d.S, s = bias_tap ? 0 : tap % d.S;
    const int64_t first = chunk * g.chunk_len;
    const int64_t last = first + g.chunk_len < g.pixels ? first + g.chunk_len : g.pixels;
    acc_t<T> acc = 0;
    for (int64_t pix = first + lane; pix < last; pix += 32) {
      const int64_t q = pix % d.Q, pq = pix / d.Q;
      acc += dw_tap_product<T>(go, x, g, pq / d.P, k, pq % d.P, q, r, s, bias_tap);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) part[(chunk * g.taps + tap) * d.K + k] = acc;
  }
}

// ---- the all-taps weight-gradient kernels (round 2; round 4: loads gathered per pixel) ----
// Round 2 wrote a pixel's taps as `if (tap in image) acc[t] += gv * x[...]`; nvcc (sm_90) put
// each tap's load behind its own branch and consumed it at once, so a pixel cost R*S memory
// latencies one after another (SASS of both kernels: LDG, FFMA, branch, LDG, FFMA, ...): the
// profile's 56-60 us for the 3x3 layer (8x128x56x56), whose 25.7 MB read take ~6 us at the
// copy rate.  Round 4 loads the values under every tap of PIX pixels first (predicated loads,
// no branch between them), then adds them in the round-2 order: the same sums, bit for bit.

// The input values under a pixel's taps; bit t of the result says tap t (< RS) lies in the
// image (its value is then loaded, else 0 and never added).
template <typename T, int MAXT>
__device__ __forceinline__ unsigned gather_taps(const T* __restrict__ xn, int h0, int w0, const int (&tap_h)[MAXT],
                                                const int (&tap_w)[MAXT], int RS, int H, int W, int xs_h, int xs_w,
                                                acc_t<T> (&v)[MAXT]) {
  unsigned in = 0;
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    const int h = h0 + tap_h[t], wc = w0 + tap_w[t];
    const bool ok = t < RS && h >= 0 && h < H && wc >= 0 && wc < W;
    v[t] = ok ? static_cast<acc_t<T>>(xn[h * xs_h + wc * xs_w]) : acc_t<T>(0);
    in |= static_cast<unsigned>(ok) << t;
  }
  return in;
}

// One pixel's terms, as round 2 added them: gv * x for the taps in the image, gv alone for
// the bias tap RS.
template <typename A, int MAXT>
__device__ __forceinline__ void add_taps(A (&acc)[MAXT], A gv, const A (&v)[MAXT], unsigned in, int RS) {
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    if ((in >> t) & 1u) {
      acc[t] += gv * v[t];
    } else if (t == RS) {
      acc[t] += gv;
    }
  }
}

// Pixels gathered together a thread: two for up to 10 taps (the 3x3 layers; float: 80
// registers NCHW, 64 channels_last), one for up to 26 (two would hold 52 values).
template <int MAXT>
constexpr int wgrad_pix() {
  return MAXT <= 10 ? 2 : 1;
}

// Steps the (n, pq) position of a pixel by `by` (<= 256) without a 64-bit division; pq + by
// cannot overflow: P * Q < 2^31 - 1024 (launcher).
__device__ __forceinline__ void step_pixel(int64_t& n, int& pq, int by, int64_t PQ) {
  pq += by;
  while (pq >= PQ) {
    pq -= static_cast<int>(PQ);
    ++n;
  }
}

// NCHW, all taps per thread (round 2): block per (k, chunk); each thread walks pixels
// first + tid, first + tid + 256, ... of the chunk, reads grad_output once per pixel and keeps
// the R*S (+ bias) tap sums in registers (MAXT >= taps); then a fixed-order warp shuffle
// reduction per tap and the 8 warps summed in order.  partial[chunk][tap][k] as above.
template <typename T, int MAXT>
__global__ void __launch_bounds__(kTileThreads)
    dw_wgrad_taps_kernel(const T* __restrict__ go, const T* __restrict__ x, acc_t<T>* __restrict__ part, DwGradGeom g) {
  using A = acc_t<T>;
  __shared__ A warp_sums[kTileThreads / 32][MAXT];
  const DwGeom& d = g.x;
  const int64_t k = blockIdx.x % d.K, chunk = blockIdx.x / d.K;
  const int R = static_cast<int>(d.R), S = static_cast<int>(d.S), RS = R * S;
  const int P = static_cast<int>(d.P), Q = static_cast<int>(d.Q), H = static_cast<int>(d.H), W = static_cast<int>(d.W);
  const int sh = static_cast<int>(d.sh), sw = static_cast<int>(d.sw), ph = static_cast<int>(d.ph),
            pw = static_cast<int>(d.pw), dh = static_cast<int>(d.dh), dw = static_cast<int>(d.dw);
  const int xs_h = static_cast<int>(d.xs_h), xs_w = static_cast<int>(d.xs_w);
  const int gs_h = static_cast<int>(g.gs_h), gs_w = static_cast<int>(g.gs_w);
  const int64_t first = chunk * g.chunk_len;
  const int64_t last = first + g.chunk_len < g.pixels ? first + g.chunk_len : g.pixels;
  const int64_t PQ = static_cast<int64_t>(P) * Q;
  A acc[MAXT];
  int tap_h[MAXT], tap_w[MAXT];  // r*dh, s*dw of tap t (compile-time indices only: registers)
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    acc[t] = A(0);
    const int r = t / S;
    tap_h[t] = r * dh;
    tap_w[t] = (t - r * S) * dw;
  }
  const T* gk = go + k * g.gs_c;
  const T* xk = x + (k / d.Kg) * d.xs_c;
  // (n, pq) of the pixel stepped incrementally: no 64-bit division in the loop.  PIX pixels
  // kTileThreads apart per iteration, their loads issued together, added in pixel order.
  constexpr int PIX = wgrad_pix<MAXT>();
  int64_t n = (first + threadIdx.x) / PQ;
  int pq = static_cast<int>(first + threadIdx.x - n * PQ);
  for (int64_t pix = first + threadIdx.x; pix < last; pix += PIX * kTileThreads) {
    A gv[PIX], v[PIX][MAXT];
    unsigned in[PIX];
#pragma unroll
    for (int u = 0; u < PIX; ++u) {
      in[u] = 0;
      gv[u] = A(0);
      if (u == 0 || pix + u * kTileThreads < last) {
        const int p = pq / Q, q = pq - p * Q;
        gv[u] = static_cast<A>(gk[n * g.gs_n + p * gs_h + q * gs_w]);
        in[u] = gather_taps<T, MAXT>(xk + n * d.xs_n, p * sh - ph, q * sw - pw, tap_h, tap_w, RS, H, W, xs_h, xs_w,
                                     v[u]);
      }
      step_pixel(n, pq, kTileThreads, PQ);
    }
#pragma unroll
    for (int u = 0; u < PIX; ++u) {
      if (u == 0 || pix + u * kTileThreads < last) add_taps<A, MAXT>(acc, gv[u], v[u], in[u], RS);
    }
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    A v = acc[t];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) warp_sums[warp][t] = v;
  }
  __syncthreads();
  for (int t = threadIdx.x; t <= RS; t += kTileThreads) {
    A v = 0;
    for (int wi = 0; wi < kTileThreads / 32; ++wi) v += warp_sums[wi][t];
    part[(chunk * g.taps + t) * d.K + k] = v;
  }
}

// channels_last, all taps per thread (round 2): block of 32 channel lanes x 8 pixel groups
// per (32-channel tile, chunk); group g walks pixels first + g, first + g + 8, ... (loads
// coalesced along the channels) with the R*S (+ bias) tap sums in registers; the 8 groups are
// then summed in group order through shared memory.  partial[chunk][tap][k].
template <typename T, int MAXT>
__global__ void __launch_bounds__(kTileThreads)
    dw_wgrad_taps_cl_kernel(const T* __restrict__ go, const T* __restrict__ x, acc_t<T>* __restrict__ part,
                            DwGradGeom g) {
  using A = acc_t<T>;
  __shared__ A sums[MAXT][kClLanes];
  const DwGeom& d = g.x;
  const int tiles_c = static_cast<int>((d.K + kClLanes - 1) / kClLanes);
  const int tc = static_cast<int>(blockIdx.x % static_cast<unsigned>(tiles_c));  // 32-bit divisions
  const int64_t chunk = blockIdx.x / static_cast<unsigned>(tiles_c);
  const int lane = threadIdx.x % kClLanes, grp = threadIdx.x / kClLanes;
  const int64_t k = static_cast<int64_t>(tc) * kClLanes + lane;
  const bool live = k < d.K;
  const int R = static_cast<int>(d.R), S = static_cast<int>(d.S), RS = R * S;
  const int P = static_cast<int>(d.P), Q = static_cast<int>(d.Q), H = static_cast<int>(d.H), W = static_cast<int>(d.W);
  const int sh = static_cast<int>(d.sh), sw = static_cast<int>(d.sw), ph = static_cast<int>(d.ph),
            pw = static_cast<int>(d.pw), dh = static_cast<int>(d.dh), dw = static_cast<int>(d.dw);
  const int xs_h = static_cast<int>(d.xs_h), xs_w = static_cast<int>(d.xs_w);
  const int gs_h = static_cast<int>(g.gs_h), gs_w = static_cast<int>(g.gs_w);
  const int64_t first = chunk * g.chunk_len;
  const int64_t last = first + g.chunk_len < g.pixels ? first + g.chunk_len : g.pixels;
  const int64_t PQ = static_cast<int64_t>(P) * Q;
  A acc[MAXT];
  int tap_h[MAXT], tap_w[MAXT];
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    acc[t] = A(0);
    const int r = t / S;
    tap_h[t] = r * dh;
    tap_w[t] = (t - r * S) * dw;
  }
  const T* gk = go + (live ? k : 0) * g.gs_c;
  const T* xk = x + (live ? static_cast<int>(k) / static_cast<int>(d.Kg) : 0) * d.xs_c;  // K < 2^21 (launcher)
  constexpr int PIX = wgrad_pix<MAXT>();
  int64_t n = (first + grp) / PQ;
  int pq = static_cast<int>(first + grp - n * PQ);
  for (int64_t pix = first + grp; pix < last; pix += PIX * kClGroups) {
    A gv[PIX], v[PIX][MAXT];
    unsigned in[PIX];
#pragma unroll
    for (int u = 0; u < PIX; ++u) {
      in[u] = 0;
      gv[u] = A(0);
      if (live && (u == 0 || pix + u * kClGroups < last)) {
        const int p = pq / Q, q = pq - p * Q;
        gv[u] = static_cast<A>(gk[n * g.gs_n + p * gs_h + q * gs_w]);
        in[u] = gather_taps<T, MAXT>(xk + n * d.xs_n, p * sh - ph, q * sw - pw, tap_h, tap_w, RS, H, W, xs_h, xs_w,
                                     v[u]);
      }
      step_pixel(n, pq, kClGroups, PQ);
    }
    if (live) {
#pragma unroll
      for (int u = 0; u < PIX; ++u) {
        if (u == 0 || pix + u * kClGroups < last) add_taps<A, MAXT>(acc, gv[u], v[u], in[u], RS);
      }
    }
  }
  for (int gi = 0; gi < kClGroups; ++gi) {  // fixed group order
    if (grp == gi) {
#pragma unroll
      for (int t = 0; t < MAXT; ++t) sums[t][lane] = gi == 0 ? acc[t] : sums[t][lane] + acc[t];
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < (RS + 1) * kClLanes; e += kTileThreads) {
    const int t = e / kClLanes, l = e % kClLanes;
    const int64_t kk = static_cast<int64_t>(tc) * kClLanes + l;
    if (kk < d.K) part[(chunk * g.taps + t) * d.K + kk] = sums[t][l];
  }
}

// Sums the chunks in order: thread per (tap, k).
template <typename T>
__global__ void dw_wgrad_reduce_kernel(const acc_t<T>* __restrict__ part, T* __restrict__ gw, T* __restrict__ gb,
                                       int64_t gw_sk, int64_t gw_sr, int64_t gw_ss, DwGradGeom g) {
  const DwGeom& d = g.x;
  const int64_t total = g.taps * d.K;
  CONVRNN_GRID_STRIDE(int64_t, e, total) {
    const int64_t k = e % d.K, tap = e / d.K;
    acc_t<T> acc = 0;
    for (int c = 0; c < g.chunks; ++c) acc += part[static_cast<int64_t>(c) * total + e];
    if (tap == d.R * d.S) {
      if (gb != nullptr) gb[k] = static_cast<T>(acc);
    } else if (gw != nullptr) {
      gw[k * gw_sk + (tap / d.S) * gw_sr + (tap % d.S) * gw_ss] = static_cast<T>(acc);
    }
  }
}

}  // namespace dwconv
}  // namespace convrnn
