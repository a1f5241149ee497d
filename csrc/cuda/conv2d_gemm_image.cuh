// conv2d CUDA: the image GEMM kernels (forward and backward data), SIMT and tensor cores.
// Shared pieces and the layouts: conv2d_gemm.cuh.
#pragma once

#include "cuda/conv2d_gemm.cuh"
#include "cuda/stage.cuh"

namespace convrnn {
namespace conv {

// ---- image GEMM block set-up (shared by the SIMT and the wmma kernel) ----

struct ImageBlock {
  AxisPlan ah, aw;
  int grp, n0, kr_count;
  int64_t m0, m_count, brow0;
};

// Decomposes the 1-D block index (m tile fastest, so neighbouring blocks share the weight
// tile) into tile, phase and group; false when the m tile is past this phase's rows.
template <int BM, int BN>
__device__ __forceinline__ bool image_block(const ImageGemmArgs& a, ImageBlock& b) {
  int64_t bid = blockIdx.x;
  const int64_t tm = bid % a.tiles_m;
  bid /= a.tiles_m;
  const int tn = static_cast<int>(bid % a.tiles_n);
  bid /= a.tiles_n;
  const int phw = static_cast<int>(bid % a.phases_w);
  bid /= a.phases_w;
  const int phh = static_cast<int>(bid % a.phases_h);
  b.grp = static_cast<int>(bid / a.phases_h);
  b.ah = axis_plan(a.dgrad, a.H, a.R, a.sh, a.ph, a.dh, a.P, phh);
  b.aw = axis_plan(a.dgrad, a.W, a.S, a.sw, a.pw, a.dw, a.Q, phw);
  b.m_count = static_cast<int64_t>(a.nimg) * b.ah.len * b.aw.len;
  b.m0 = tm * BM;
  b.n0 = tn * BN;
  b.kr_count = b.ah.taps * b.aw.taps * a.cpg;
  b.brow0 = phase_row0(b.ah, b.aw, a.S, a.groups, a.cpg) + static_cast<int64_t>(b.grp) * b.kr_count;
  return b.m0 < b.m_count;
}

// Per-row tables of the block's BM GEMM rows: the source image offset of the row's image and
// group (-1: row past the end), the tap-0 source row/column, and the destination offset.
template <int BM>
__device__ __forceinline__ void image_rows(const ImageGemmArgs& a, const ImageBlock& b, int64_t* src_off,
                                           int* src_h, int* src_w, int64_t* dst_off) {
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    const int64_t m = b.m0 + r;
    int64_t so = -1, d = -1;
    int hh = 0, ww = 0;
    if (m < b.m_count) {
      const int64_t j = m % b.aw.len, t = m / b.aw.len;
      const int64_t i = t % b.ah.len, n = t / b.ah.len;
      hh = static_cast<int>(i) * b.ah.src_mul + b.ah.src_base;
      ww = static_cast<int>(j) * b.aw.src_mul + b.aw.src_base;
      so = n * b.ah.src_len * b.aw.src_len * a.cs + static_cast<int64_t>(b.grp) * a.cpg;
      d = n * a.dst_sn + (i * b.ah.dst_mul + b.ah.dst_base) * a.dst_sh + (j * b.aw.dst_mul + b.aw.dst_base) * a.dst_sw;
    }
    src_off[r] = so;
    src_h[r] = hh;
    src_w[r] = ww;
    dst_off[r] = d;
  }
}

// One A element/vector of the image GEMM: row `row` of the block, reduction channels
// [t.c, t.c + V) of tap (t.tr, t.ts).  Zero outside the image (padding) or past the rows.
template <typename T, int V, bool ONE>
__device__ __forceinline__ Vec<T, V> image_a_load(const T* __restrict__ src, const ImageGemmArgs& a,
                                                  const ImageBlock& b, const int64_t* src_off, const int* src_h,
                                                  const int* src_w, int row, int dh, int dw, int c) {
  const int64_t off = src_off[row];
  const int h = src_h[row] + dh, w = src_w[row] + dw;
  // ONE (1x1, no padding): every tap is inside the image (see conv2d.cu).
  const bool inside = ONE || (h >= 0 && h < b.ah.src_len && w >= 0 && w < b.aw.src_len);
  if (off >= 0 && inside) {
    return vec_load<T, V>(src + off + (static_cast<int64_t>(h) * b.aw.src_len + w) * a.cs + c);
  }
  return vec_zero<T, V>();
}

// ---- image GEMM, SIMT (float, double) ----

template <typename T, int BM, int BN, bool ONE>
__global__ void __launch_bounds__(kGemmThreads, 2) image_gemm_simt_kernel(const ImageGemmArgs a) {
  constexpr int BK = 8, PAD = 4, LDA = BM + PAD, LDB = BN + PAD;
  constexpr int TM = BM / 16, TN = BN / 16;
  constexpr int A_ROWS = kGemmThreads / BK;  // rows per pass of the A loader
  constexpr int A_PASSES = BM / A_ROWS;
  constexpr int B_PASSES = (BK * BN + kGemmThreads - 1) / kGemmThreads;
  static_assert(BM % A_ROWS == 0 && TM * 16 == BM && TN * 16 == BN, "tile shape");
  __shared__ __align__(16) T As[2][BK * LDA];
  __shared__ __align__(16) T Bs[2][BK * LDB];
  __shared__ int64_t s_src[BM], s_dst[BM];
  __shared__ int s_h[BM], s_w[BM];

  ImageBlock b;
  if (!image_block<BM, BN>(a, b)) return;  // uniform over the block
  image_rows<BM>(a, b, s_src, s_h, s_w, s_dst);
  __syncthreads();

  const T* __restrict__ src = static_cast<const T*>(a.src);
  const T* __restrict__ wgt = static_cast<const T*>(a.wgt);
  const int tid = threadIdx.x;
  const int a_k = tid % BK, a_row = tid / BK;
  T ra[A_PASSES], rb[B_PASSES];

  // (A TapCursor here, as in the wmma kernel, costs the 3 registers that make the 128 x 128
  // tile spill under its 128-register cap; two divisions per k tile are cheaper.)
  auto load = [&](int k0) {
    const int kr = k0 + a_k;
    if (kr < b.kr_count) {
      const Tap t = ONE ? Tap{0, 0, kr} : split_kr(kr, a.cpg, b.aw.taps);
      const int dh = t.tr * b.ah.src_tap, dw = t.ts * b.aw.src_tap;
#pragma unroll
      for (int p = 0; p < A_PASSES; ++p)
        ra[p] = image_a_load<T, 1, ONE>(src, a, b, s_src, s_h, s_w, a_row + p * A_ROWS, dh, dw, t.c).v[0];
    } else {
#pragma unroll
      for (int p = 0; p < A_PASSES; ++p) ra[p] = Num<T>::zero();
    }
#pragma unroll
    for (int p = 0; p < B_PASSES; ++p) {
      const int e = tid + p * kGemmThreads;
      const int kr = k0 + e / BN, n = b.n0 + e % BN;
      rb[p] = (e < BK * BN && kr < b.kr_count && n < a.ldb) ? wgt[(b.brow0 + kr) * a.ldb + n] : Num<T>::zero();
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int p = 0; p < A_PASSES; ++p) As[buf][a_k * LDA + a_row + p * A_ROWS] = ra[p];
#pragma unroll
    for (int p = 0; p < B_PASSES; ++p) {
      const int e = tid + p * kGemmThreads;
      if (e < BK * BN) Bs[buf][(e / BN) * LDB + e % BN] = rb[p];
    }
  };

  const int tx = tid % 16, ty = tid / 16;
  T acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = Num<T>::zero();

  int buf = 0;
  if (b.kr_count > 0) {
    load(0);
    store(0);
  }
  __syncthreads();
  for (int k0 = 0; k0 < b.kr_count; k0 += BK) {
    const bool more = k0 + BK < b.kr_count;
    if (more) load(k0 + BK);  // global loads in flight during the tile's arithmetic
    simt_tile<T, BK, LDA, LDB, TM, TN>(As[buf], Bs[buf], tx, ty, acc);
    if (more) store(buf ^ 1);  // buf ^ 1 was last read before the previous barrier
    __syncthreads();
    buf ^= 1;
  }

  // Epilogue: bias (forward), conversion, strided store; rows and columns bounds-checked.
  T* __restrict__ dst = static_cast<T*>(a.dst);
  const T* __restrict__ bias = static_cast<const T*>(a.bias);
  constexpr int VM = simt_vec<T>(TM), VN = simt_vec<T>(TN);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t off = s_dst[frag_index<VM>(i, ty)];
    if (off < 0) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int col = b.n0 + frag_index<VN>(j, tx);
      if (col >= a.ncols) continue;
      const int64_t ch = static_cast<int64_t>(b.grp) * a.ncols + col;
      T v = acc[i][j];
      if (bias != nullptr) v += bias[ch];
      dst[off + ch * a.dst_sc] = v;
    }
  }
}

// ---- backward data of few input channels: direct, 8 lanes a pixel ----
//
// The image GEMM of a C = 3 layer's backward data has 3 columns: its 16-wide tile wastes
// 13/16 of the FMAs in a shared-memory-bound micro-kernel.  Here a block owns 128 rows of
// one stride phase (image_block, one column tile, one group), i.e. 128 input pixels, and all
// their CG channels.  Eight lanes share a pixel and split its reduction channels k (grad_output
// channels): lane g reads k = kv*8V + g*V .. +V as one 16-byte vector, so the 8 lanes read a
// pixel's 8V channels as one contiguous 128-byte piece and a warp's load is 4 such pieces (the
// first version gave each thread a whole pixel: 32 scattered 16-byte reads a warp load, 486 us
// of AlexNet CONV1's backward on the H200 against cuDNN's 96).  Each lane group owns 4 pixels,
// 32 rows apart, so that one weight read serves 4 pixels.  The phase's packed weight rows
// (kr = (tr, ts, k), as the GEMM reads them) are staged in shared memory as
// [tap][kv][e][g][4] (a warp's 8 lanes read 128 contiguous bytes; its 4 lane groups the same
// ones), zero past cpg and past CG.  Each lane sums its k over every valid tap (taps in order,
// its k in order), then the 8 lanes' sums are added by a butterfly of shuffles (every lane
// ends with the same bits) and lane c < CG stores channel c.  Deterministic; float32 differs
// from the SIMT GEMM's one-order sum by rounding only.  The launcher checks cpg % V == 0, cs
// % V == 0, a 16-byte aligned source and small_c_entries() <= small_c_capacity<T>().
constexpr int kSmallCLanes = 8;  // lanes that split one pixel's k
constexpr int kSmallCPix = 4;    // pixels a lane group owns
constexpr int kSmallCBlockRows = kGemmThreads / kSmallCLanes * kSmallCPix;  // 128 pixels a block

template <typename T>
constexpr int small_c_kstep() {  // k a lane group reads a step: 8 lanes x one 16-byte vector
  return kSmallCLanes * (16 / static_cast<int>(sizeof(T)));
}
template <typename T>
constexpr int small_c_capacity() {  // staged weight entries (4 accumulators each): 32 KB
  return 32768 / (4 * static_cast<int>(sizeof(decltype(Num<T>::to_float(T())))));
}
// Entries a phase of `taps` taps stages: every tap's k rounded up to whole steps.
template <typename T>
__host__ __device__ inline int64_t small_c_entries(int64_t taps, int cpg) {
  return taps * ((cpg + small_c_kstep<T>() - 1) / small_c_kstep<T>()) * small_c_kstep<T>();
}

// Stages the block's phase weights in ws as [tap][kv][e][g][4] (zero past cpg and CG), then
// the block's barrier; returns the k steps a tap (kvs).
template <typename T, int CG>
__device__ __forceinline__ int small_c_stage_weights(const ImageGemmArgs& a, const ImageBlock& b,
                                                     decltype(Num<T>::to_float(T()))* ws) {
  using A = decltype(Num<T>::to_float(T()));
  constexpr int V = 16 / static_cast<int>(sizeof(T)), G = kSmallCLanes, KSTEP = G * V;
  const T* __restrict__ wgt = static_cast<const T*>(a.wgt);
  const int kvs = (a.cpg + KSTEP - 1) / KSTEP;
  const int entries = b.ah.taps * b.aw.taps * kvs * KSTEP;
  stage_batched<8>(
      threadIdx.x, entries * 4, blockDim.x,
      [&](int idx) {
        const int c = idx % 4, ent = idx / 4;
        const int g = ent % G, e = (ent / G) % V, tk = ent / KSTEP;  // tk = tap * kvs + kv
        const int k = (tk % kvs) * KSTEP + g * V + e;
        return c < CG && k < a.cpg ? Num<T>::to_float(wgt[(b.brow0 + (tk / kvs) * a.cpg + k) * a.ldb + c]) : A(0);
      },
      [&](int idx, A v) { ws[idx] = v; });
  __syncthreads();
  return kvs;
}

// The 8 lanes' partial sums of each of P pixels: a butterfly of shuffles, the same bits in
// every lane of the group.
template <typename A, int P, int CG>
__device__ __forceinline__ void small_c_butterfly(A (&acc)[P][CG]) {
#pragma unroll
  for (int s = kSmallCLanes / 2; s >= 1; s /= 2)
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int c = 0; c < CG; ++c) acc[p][c] += __shfl_xor_sync(0xffffffffu, acc[p][c], s);
}

template <typename T, int CG>
__global__ void __launch_bounds__(kGemmThreads) dgrad_small_c_kernel(const ImageGemmArgs a) {
  using A = decltype(Num<T>::to_float(T()));
  constexpr int V = 16 / static_cast<int>(sizeof(T)), G = kSmallCLanes, KSTEP = G * V, PIX = kSmallCPix;
  constexpr int STRIDE = kSmallCBlockRows / PIX;  // rows between a lane group's pixels (32)
  __shared__ __align__(16) A ws[small_c_capacity<T>() * 4];
  ImageBlock b;
  if (!image_block<kSmallCBlockRows, 16>(a, b)) return;  // uniform over the block
  const int kvs = small_c_stage_weights<T, CG>(a, b, ws);

  const int lane = threadIdx.x % 32, g = lane % G;
  const int row0 = threadIdx.x / 32 * (32 / G) + lane / G;  // pixel p of the group: row0 + p * STRIDE
  const T* __restrict__ src = static_cast<const T*>(a.src);
  int64_t off[PIX];  // the pixel's image in src, -1 past the rows
  int h0[PIX], w0[PIX];
#pragma unroll
  for (int p = 0; p < PIX; ++p) {
    const int64_t m = b.m0 + row0 + p * STRIDE;
    off[p] = -1;
    h0[p] = w0[p] = 0;
    if (m < b.m_count) {
      const int64_t j = m % b.aw.len, t = m / b.aw.len;
      const int64_t i = t % b.ah.len, n = t / b.ah.len;
      h0[p] = static_cast<int>(i) * b.ah.src_mul + b.ah.src_base;
      w0[p] = static_cast<int>(j) * b.aw.src_mul + b.aw.src_base;
      off[p] = n * b.ah.src_len * b.aw.src_len * a.cs;
    }
  }
  A acc[PIX][CG];
#pragma unroll
  for (int p = 0; p < PIX; ++p)
#pragma unroll
    for (int c = 0; c < CG; ++c) acc[p][c] = A(0);

  for (int tr = 0; tr < b.ah.taps; ++tr) {
    for (int ts = 0; ts < b.aw.taps; ++ts) {
      const T* gp[PIX];  // the tap's grad_output row of each pixel, nullptr outside
      bool any = false;
#pragma unroll
      for (int p = 0; p < PIX; ++p) {
        const int h = h0[p] + tr * b.ah.src_tap, w = w0[p] + ts * b.aw.src_tap;
        const bool in = off[p] >= 0 && h >= 0 && h < b.ah.src_len && w >= 0 && w < b.aw.src_len;
        gp[p] = in ? src + off[p] + (static_cast<int64_t>(h) * b.aw.src_len + w) * a.cs : nullptr;
        any = any || in;
      }
      if (!any) continue;  // a lane group's choice: its 8 lanes agree
      const A* wt = ws + (tr * b.aw.taps + ts) * kvs * KSTEP * 4 + g * 4;
      for (int kv = 0; kv < kvs; ++kv) {
        const int k0 = kv * KSTEP + g * V;
        Vec<T, V> gv[PIX];
#pragma unroll
        for (int p = 0; p < PIX; ++p) gv[p] = gp[p] != nullptr && k0 < a.cpg ? vec_load<T, V>(gp[p] + k0) : vec_zero<T, V>();
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const Vec<A, 4> wk = *reinterpret_cast<const Vec<A, 4>*>(wt + (kv * KSTEP + e * G) * 4);
#pragma unroll
          for (int p = 0; p < PIX; ++p) {
            const A gk = Num<T>::to_float(gv[p].v[e]);
#pragma unroll
            for (int c = 0; c < CG; ++c) acc[p][c] = fma(gk, wk.v[c], acc[p][c]);
          }
        }
      }
    }
  }
  small_c_butterfly<A, PIX, CG>(acc);

  T* __restrict__ dst = static_cast<T*>(a.dst);
#pragma unroll
  for (int p = 0; p < PIX; ++p) {
    const int64_t m = b.m0 + row0 + p * STRIDE;
    if (off[p] < 0) continue;
    const int64_t j = m % b.aw.len, t = m / b.aw.len;
    const int64_t i = t % b.ah.len, n = t / b.ah.len;
    const int64_t d = n * a.dst_sn + (i * b.ah.dst_mul + b.ah.dst_base) * a.dst_sh + (j * b.aw.dst_mul + b.aw.dst_base) * a.dst_sw;
#pragma unroll
    for (int c = 0; c < CG; ++c) {
      if (c == g && c < a.ncols) dst[d + c * a.dst_sc] = Num<T>::from_acc(acc[p][c]);
    }
  }
}

// ---- backward data of few input channels: runs of 4 pixels along a phase row ----
//
// dgrad_small_c_kernel above reads grad_output once per (pixel, tap): 1.13 GB for AlexNet
// CONV1's backward data, 234 us on the H200 (4.8 TB/s, the L2's bandwidth: the block's window
// does not stay in L1).  Along a phase row, pixel j's tap s reads grad_output column
// q = j + base - s (src_tap = -1: dilation 1, or any dilation whose lcm with the stride is the
// stride), so the 4 pixels j0..j0+3 and taps 0..S'-1 need only 4 + S' - 1 distinct columns of
// each grad_output row, not 4 S'.  Here a lane group (8 lanes splitting k, as above) owns such
// a run: for each tap row and k step it loads the run's 4 + S' - 1 columns once into registers
// and applies each to every (pixel, tap) pair that reads it (CONV1: 6 loads for 12 pairs, the
// 7x7/2 stem: 7 for 16).  A block is 32 runs of one stride phase; weights staged as above.
// Deterministic; each pixel sums over (tap row, k step, tap column, k) in that order, then the
// butterfly.  The launcher (dgrad_small_c) takes it where every phase has src_tap == -1 along
// w (or a single tap) and at most kSmallCRunTaps taps along w; grid: small_c_run_tiles.
constexpr int kSmallCRun = 4;       // consecutive phase columns of a run
constexpr int kSmallCRunTaps = 5;   // most taps along w (registers: 4 + 5 - 1 vectors)
constexpr int kSmallCRunsPerBlock = kGemmThreads / kSmallCLanes;  // 32

// Runs of the largest phase (image_grid's rows, in runs): the launcher's and the native
// check's tiles_m.
CONVRNN_HD int64_t small_c_run_tiles(const ImageGemmArgs& a) {
  int64_t most = 0;
  for (int ph = 0; ph < a.phases_h; ++ph) {
    for (int pw = 0; pw < a.phases_w; ++pw) {
      const AxisPlan ah = backward_data_axis(a.H, a.R, a.sh, a.ph, a.dh, a.P, ph);
      const AxisPlan aw = backward_data_axis(a.W, a.S, a.sw, a.pw, a.dw, a.Q, pw);
      const int64_t runs = static_cast<int64_t>(a.nimg) * ah.len * ((aw.len + kSmallCRun - 1) / kSmallCRun);
      most = runs > most ? runs : most;
    }
  }
  return (most + kSmallCRunsPerBlock - 1) / kSmallCRunsPerBlock;
}

// Whether every phase suits the run kernel (see above).
CONVRNN_HD bool small_c_run_ok(const ImageGemmArgs& a) {
  for (int pw = 0; pw < a.phases_w; ++pw) {
    const AxisPlan aw = backward_data_axis(a.W, a.S, a.sw, a.pw, a.dw, a.Q, pw);
    if (aw.taps > kSmallCRunTaps || (aw.taps > 1 && aw.src_tap != -1)) return false;
  }
  return true;
}

template <typename T, int CG>
__global__ void __launch_bounds__(kGemmThreads) dgrad_small_c_run_kernel(const ImageGemmArgs a) {
  using A = decltype(Num<T>::to_float(T()));
  constexpr int V = 16 / static_cast<int>(sizeof(T)), G = kSmallCLanes, KSTEP = G * V;
  constexpr int RUN = kSmallCRun, MT = kSmallCRunTaps, NQ = RUN + MT - 1;
  __shared__ __align__(16) A ws[small_c_capacity<T>() * 4];
  ImageBlock b;
  // image_block with BM = 32: b.m0 = 32 * (m tile) is the block's first run; its own check
  // (m0 against the phase's pixels) is weaker than the runs' one below.
  if (!image_block<kSmallCRunsPerBlock, 16>(a, b)) return;  // uniform over the block
  const int runs_w = (b.aw.len + RUN - 1) / RUN;
  const int64_t runs = static_cast<int64_t>(a.nimg) * b.ah.len * runs_w;
  if (b.m0 >= runs) return;  // uniform
  const int kvs = small_c_stage_weights<T, CG>(a, b, ws);

  const int g = threadIdx.x % G;
  const int64_t run = b.m0 + threadIdx.x / G;
  const bool live = run < runs;
  int64_t n = 0;
  int i = 0, j0 = 0, nu = 0;  // the run's image, phase row, first phase column, live pixels
  if (live) {
    const int64_t t = run / runs_w;
    j0 = static_cast<int>(run - t * runs_w) * RUN;
    i = static_cast<int>(t % b.ah.len);
    n = t / b.ah.len;
    nu = b.aw.len - j0 < RUN ? b.aw.len - j0 : RUN;
  }
  const T* __restrict__ img = static_cast<const T*>(a.src) + n * b.ah.src_len * b.aw.src_len * a.cs;
  const int qb = j0 * b.aw.src_mul + b.aw.src_base;  // column of pixel u, tap s: qb + u - s
  A acc[RUN][CG];
#pragma unroll
  for (int u = 0; u < RUN; ++u)
#pragma unroll
    for (int c = 0; c < CG; ++c) acc[u][c] = A(0);

  for (int tr = 0; tr < b.ah.taps; ++tr) {
    const int p = i * b.ah.src_mul + b.ah.src_base + tr * b.ah.src_tap;
    if (!live || p < 0 || p >= b.ah.src_len) continue;  // the lane group's choice
    const T* __restrict__ row = img + static_cast<int64_t>(p) * b.aw.src_len * a.cs;
    const A* wt = ws + tr * b.aw.taps * kvs * KSTEP * 4 + g * 4;
    for (int kv = 0; kv < kvs; ++kv) {
      const int k0 = kv * KSTEP + g * V;
      Vec<T, V> dv[NQ];  // dv[x]: column qb + x - (MT - 1), the offset o = u - s = x - (MT - 1)
#pragma unroll
      for (int x = 0; x < NQ; ++x) {
        const int o = x - (MT - 1), q = qb + o;
        const bool need = o > -b.aw.taps && o < nu && k0 < a.cpg && q >= 0 && q < b.aw.src_len;
        dv[x] = need ? vec_load<T, V>(row + static_cast<int64_t>(q) * a.cs + k0) : vec_zero<T, V>();
      }
#pragma unroll
      for (int ts = 0; ts < MT; ++ts) {
        if (ts >= b.aw.taps) break;
        const A* wk = wt + (ts * kvs + kv) * KSTEP * 4;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const Vec<A, 4> w4 = *reinterpret_cast<const Vec<A, 4>*>(wk + e * G * 4);
#pragma unroll
          for (int u = 0; u < RUN; ++u) {
            const A d = Num<T>::to_float(dv[u - ts + MT - 1].v[e]);
#pragma unroll
            for (int c = 0; c < CG; ++c) acc[u][c] = fma(d, w4.v[c], acc[u][c]);
          }
        }
      }
    }
  }
  small_c_butterfly<A, RUN, CG>(acc);

  T* __restrict__ dst = static_cast<T*>(a.dst);
  const int64_t d0 = n * a.dst_sn + (static_cast<int64_t>(i) * b.ah.dst_mul + b.ah.dst_base) * a.dst_sh;
#pragma unroll
  for (int u = 0; u < RUN; ++u) {
    if (u >= nu) break;
    const int64_t d = d0 + (static_cast<int64_t>(j0 + u) * b.aw.dst_mul + b.aw.dst_base) * a.dst_sw;
#pragma unroll
    for (int c = 0; c < CG; ++c) {
      if (c == g && c < a.ncols) dst[d + c * a.dst_sc] = Num<T>::from_acc(acc[u][c]);
    }
  }
}

// ---- image GEMM, tensor cores ----

template <typename T, int BN, bool VEC>
__global__ void __launch_bounds__(kGemmThreads) image_gemm_wmma_kernel(const ImageGemmArgs a) {
  constexpr int BM = 128, WARPS_M = 4, WARPS_N = 2;
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N, FM = WTM / 16, FN = WTN / 16;
  constexpr int BK = Mma<T>::BK;
  constexpr int V16 = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
  constexpr int VA = VEC ? V16 : 1;
  constexpr int LDA = BK + V16, LDB = BN + V16;  // 16-byte padding
  constexpr int A_VPR = BK / VA;                 // A vectors per row
  constexpr int A_ROWS = kGemmThreads / A_VPR;   // rows per pass
  constexpr int A_PASSES = BM / A_ROWS;
  constexpr int B_VPR = BN / V16;
  constexpr int B_PASSES = (BK * B_VPR + kGemmThreads - 1) / kGemmThreads;
  static_assert(FM * 16 == WTM && FN * 16 == WTN && BM % A_ROWS == 0, "tile shape");
  constexpr int A_BYTES = round_up_int(2 * BM * LDA * static_cast<int>(sizeof(T)), 128);
  constexpr int B_BYTES = round_up_int(2 * BK * LDB * static_cast<int>(sizeof(T)), 128);
  constexpr int SCRATCH_BYTES = 8 * 256 * 4;
  constexpr int TILE_BYTES = A_BYTES + B_BYTES > SCRATCH_BYTES ? A_BYTES + B_BYTES : SCRATCH_BYTES;
  __shared__ __align__(128) unsigned char smem[TILE_BYTES];
  __shared__ int64_t s_src[BM], s_dst[BM];
  __shared__ int s_h[BM], s_w[BM];
  T* As = reinterpret_cast<T*>(smem);            // [2][BM][LDA]
  T* Bs = reinterpret_cast<T*>(smem + A_BYTES);  // [2][BK][LDB]

  ImageBlock b;
  if (!image_block<BM, BN>(a, b)) return;
  image_rows<BM>(a, b, s_src, s_h, s_w, s_dst);
  __syncthreads();

  const T* __restrict__ src = static_cast<const T*>(a.src);
  const T* __restrict__ wgt = static_cast<const T*>(a.wgt);
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int a_kv = tid % A_VPR, a_row = tid / A_VPR;
  Vec<T, VA> ra[A_PASSES];
  Vec<T, V16> rb[B_PASSES];

  TapCursor cur{};  // (tr, ts, c) of this thread's kr = k0 + a_kv*VA
  if (b.kr_count > 0) cur.init(a_kv * VA, a.cpg, b.aw.taps);

  auto load = [&](int k0) {  // called for k0 = 0, BK, 2*BK, ... in order
    const int kr = k0 + a_kv * VA;  // VEC: cpg % VA == 0, so the VA channels share one tap
    const Tap t = cur.t;
    cur.advance(BK, a.cpg, b.aw.taps);
    if (kr < b.kr_count) {
      const int dh = t.tr * b.ah.src_tap, dw = t.ts * b.aw.src_tap;
#pragma unroll
      for (int p = 0; p < A_PASSES; ++p)
        ra[p] = image_a_load<T, VA, false>(src, a, b, s_src, s_h, s_w, a_row + p * A_ROWS, dh, dw, t.c);
    } else {
#pragma unroll
      for (int p = 0; p < A_PASSES; ++p) ra[p] = vec_zero<T, VA>();
    }
#pragma unroll
    for (int p = 0; p < B_PASSES; ++p) {
      const int e = tid + p * kGemmThreads;
      const int kr = k0 + e / B_VPR, n = b.n0 + (e % B_VPR) * V16;
      // ldb is a multiple of V16, so a vector starting below ldb lies inside the row.
      rb[p] = (e < BK * B_VPR && kr < b.kr_count && n < a.ldb) ? vec_load<T, V16>(wgt + (b.brow0 + kr) * a.ldb + n)
                                                                : vec_zero<T, V16>();
    }
  };
  auto store = [&](int buf) {
    T* as = As + buf * BM * LDA;
    T* bs = Bs + buf * BK * LDB;
#pragma unroll
    for (int p = 0; p < A_PASSES; ++p) vec_store<T, VA>(as + (a_row + p * A_ROWS) * LDA + a_kv * VA, ra[p]);
#pragma unroll
    for (int p = 0; p < B_PASSES; ++p) {
      const int e = tid + p * kGemmThreads;
      if (e < BK * B_VPR) vec_store<T, V16>(bs + (e / B_VPR) * LDB + (e % B_VPR) * V16, rb[p]);
    }
  };

  WarpTile<T, nvcuda::wmma::row_major, FM, FN> wt;
  wt.zero();
  int buf = 0;
  if (b.kr_count > 0) {
    load(0);
    store(0);
  }
  __syncthreads();
  for (int k0 = 0; k0 < b.kr_count; k0 += BK) {
    const bool more = k0 + BK < b.kr_count;
    if (more) load(k0 + BK);
    wt.template step<BK, LDA, LDB>(As + buf * BM * LDA + wm * WTM * LDA, Bs + buf * BK * LDB + wn * WTN);
    if (more) store(buf ^ 1);
    __syncthreads();
    buf ^= 1;
  }

  // Epilogue through a per-warp scratch in the (now idle) tile memory.
  float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
  T* __restrict__ dst = static_cast<T*>(a.dst);
  const T* __restrict__ bias = static_cast<const T*>(a.bias);
  wt.for_each(scratch, [&](int r, int c, float v) {
    const int64_t off = s_dst[wm * WTM + r];
    const int col = b.n0 + wn * WTN + c;
    if (off < 0 || col >= a.ncols) return;
    const int64_t ch = static_cast<int64_t>(b.grp) * a.ncols + col;
    if (bias != nullptr) v += Num<T>::to_float(bias[ch]);
    dst[off + ch * a.dst_sc] = Num<T>::from_acc(v);
  });
}

}  // namespace conv
}  // namespace convrnn
