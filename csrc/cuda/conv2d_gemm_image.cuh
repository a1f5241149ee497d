// conv2d CUDA: the image GEMM kernels (forward and backward data), SIMT and tensor cores.
// Shared pieces and the layouts: conv2d_gemm.cuh.
#pragma once

#include "cuda/conv2d_gemm.cuh"

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

// ---- backward data of few input channels: direct, a thread per input pixel ----
//
// The image GEMM of a C = 3 layer's backward data has 3 columns: its 16-wide tile wastes
// 13/16 of the FMAs in a shared-memory-bound micro-kernel (AlexNet CONV1: ~0.6 ms of its
// 1.05 ms backward on the H200, against cuDNN's 0.22 ms for the whole backward).  Here a
// block is the image GEMM's block of 256 rows of one stride phase (image_block, one column
// tile, one group) and a thread owns one row, i.e. one input pixel, and all its CG channels:
// the phase's packed weight rows (kr = (tr, ts, k), k fastest, as the GEMM reads them) are
// staged in shared memory as [kr][4] (the same address in every thread: a broadcast), and
// each thread sums grad_output(p, q, k) * w(kr, c) over its valid taps and every k in kr
// order, as the SIMT GEMM does (float32: the same bits, up to the sign of a zero sum).
// grad_output rows are read as 16-byte vectors along k when VEC (cpg and cs multiples of
// 16 bytes' worth, 16-byte aligned).  The launcher checks kr_count <= small_c_rows<T>().
template <typename T>
constexpr int small_c_rows() {
  return 32768 / (4 * static_cast<int>(sizeof(decltype(Num<T>::to_float(T())))));  // 32 KB of weights
}

template <typename T, int CG, bool VEC>
__global__ void __launch_bounds__(kGemmThreads) dgrad_small_c_kernel(const ImageGemmArgs a) {
  using A = decltype(Num<T>::to_float(T()));
  constexpr int V = VEC ? 16 / static_cast<int>(sizeof(T)) : 1;
  __shared__ __align__(32) A ws[small_c_rows<T>() * 4];
  ImageBlock b;
  if (!image_block<kGemmThreads, 16>(a, b)) return;  // uniform over the block
  const T* __restrict__ wgt = static_cast<const T*>(a.wgt);
  for (int e = threadIdx.x; e < b.kr_count * 4; e += blockDim.x) {
    const int kr = e / 4, c = e % 4;
    ws[e] = c < CG ? Num<T>::to_float(wgt[(b.brow0 + kr) * a.ldb + c]) : A(0);
  }
  __syncthreads();
  const int64_t m = b.m0 + threadIdx.x;
  if (m >= b.m_count) return;
  const int64_t j = m % b.aw.len, t = m / b.aw.len;
  const int64_t i = t % b.ah.len, n = t / b.ah.len;
  const int h0 = static_cast<int>(i) * b.ah.src_mul + b.ah.src_base;
  const int w0 = static_cast<int>(j) * b.aw.src_mul + b.aw.src_base;
  const T* __restrict__ src = static_cast<const T*>(a.src) + n * b.ah.src_len * b.aw.src_len * a.cs;
  A acc[CG];
#pragma unroll
  for (int c = 0; c < CG; ++c) acc[c] = A(0);
  for (int tr = 0; tr < b.ah.taps; ++tr) {
    const int p = h0 + tr * b.ah.src_tap;
    if (p < 0 || p >= b.ah.src_len) continue;
    for (int ts = 0; ts < b.aw.taps; ++ts) {
      const int q = w0 + ts * b.aw.src_tap;
      if (q < 0 || q >= b.aw.src_len) continue;
      const T* __restrict__ g = src + (static_cast<int64_t>(p) * b.aw.src_len + q) * a.cs;
      const A* __restrict__ w = ws + (tr * b.aw.taps + ts) * a.cpg * 4;
      for (int k0 = 0; k0 < a.cpg; k0 += V) {
        const Vec<T, V> gv = vec_load<T, V>(g + k0);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const A gk = Num<T>::to_float(gv.v[e]);
          const Vec<A, 4> wk = *reinterpret_cast<const Vec<A, 4>*>(w + (k0 + e) * 4);
#pragma unroll
          for (int c = 0; c < CG; ++c) acc[c] = fma(gk, wk.v[c], acc[c]);
        }
      }
    }
  }
  T* __restrict__ dst = static_cast<T*>(a.dst);
  const int64_t d = n * a.dst_sn + (i * b.ah.dst_mul + b.ah.dst_base) * a.dst_sh + (j * b.aw.dst_mul + b.aw.dst_base) * a.dst_sw;
#pragma unroll
  for (int c = 0; c < CG; ++c) {
    if (c < a.ncols) dst[d + c * a.dst_sc] = Num<T>::from_acc(acc[c]);
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
