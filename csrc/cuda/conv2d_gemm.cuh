// conv2d CUDA: the implicit-GEMM kernels (direct convolution, no im2col buffer).
//
// Two GEMM shapes (see conv2d_plan.cuh for the index plans):
//  * image GEMM, forward and backward data: C[m][n], m = destination pixel, n = channel,
//    A gathered from an NHWC image (the input, or grad_output), B = the packed weight.
//  * weight GEMM, backward weight: C[k][(r,s,c)] over a chunk of output pixels (split-K),
//    A = grad_output (NHWC), B gathered from the NHWC input; chunk partials are summed in
//    chunk order by a separate kernel (deterministic, no atomics).
//
// Each comes in two flavours sharing the loaders and the block set-up:
//  * SIMT (float, double): 256 threads, BK = 8, double-buffered shared tiles with register
//    prefetch, each thread an (BM/16) x (BN/16) register tile, acc_t<T> accumulators.
//  * tensor cores (half, bfloat16, and float as TF32): nvcuda::wmma 16x16x16 (TF32:
//    16x16x8) with float accumulators, 8 warps, 16-byte vector loads when the channel
//    counts allow (VEC), else element loads.
//
// Shared-memory layouts (k = the reduction index):
//  SIMT:  As[k][m], Bs[k][n] (both k-major, so a thread reads its m and n fragments as vectors).
//  wmma image GEMM:  As[m][k] (row_major A: the image is contiguous along k = channel),
//                    Bs[k][n] (row_major B).
//  wmma weight GEMM: As[k][m] (col_major A: grad_output is contiguous along m = k_out),
//                    Bs[k][n] (row_major B: the input is contiguous along n's channel).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cuda/conv2d_plan.cuh"

namespace convrnn {
namespace conv {

constexpr int kGemmThreads = 256;

// Forward / backward-data GEMM over one image.  Type-erased so that each dtype's kernels live
// in their own translation unit.
struct ImageGemmArgs {
  const void* src;   // NHWC dense [nimg][src_len_h][src_len_w][cs]
  const void* wgt;   // packed weight [rows][ldb], zero beyond ncols
  const void* bias;  // [groups*ncols] or nullptr (forward only)
  void* dst;         // destination image, any strides (elements)
  int64_t dst_sn, dst_sc, dst_sh, dst_sw;
  int nimg, cs;      // source images and channels (C forward, K backward data)
  int cpg;           // reduction channels per group (Cg forward, Kg backward data)
  int ncols, ldb;    // GEMM columns per group (Kg forward, Cg backward data), packed row length
  int groups, R, S;
  bool dgrad;
  int H, W, P, Q, sh, sw, ph, pw, dh, dw;  // the convolution's geometry
  int phases_h, phases_w;                  // 1, 1 forward; sh, sw backward data
  int64_t tiles_m;                         // filled by the launcher
  int tiles_n;
};

// Backward-weight GEMM of one chunk of output pixels.
struct WgradArgs {
  const void* go;  // NHWC dense grad_output [N][P][Q][K]
  const void* x;   // NHWC dense input [N][H][W][C]
  void* partial;   // acc_t<T> [chunks][K][R*S*Cg], (r, s, c) with c fastest
  int H, W, C, K, P, Q, R, S, Cg, Kg, groups;
  int sh, sw, ph, pw, dh, dw;
  int64_t pixels;     // N*P*Q
  int64_t chunk_len;  // a multiple of every BK
  int chunks;
  int tiles_m, tiles_n;  // filled by the launcher
};

// ---- element types ----

template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float zero() { return 0.0f; }
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};
template <>
struct Num<double> {
  static __device__ __forceinline__ double zero() { return 0.0; }
  static __device__ __forceinline__ double to_float(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ __half zero() { return __float2half(0.0f); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __float2bfloat16(0.0f); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

// V elements loaded or stored as one (up to 16-byte) access; the address must be aligned to it.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> vec_zero() {
  Vec<T, V> r;
#pragma unroll
  for (int i = 0; i < V; ++i) r.v[i] = Num<T>::zero();
  return r;
}

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> vec_load(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void vec_store(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

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

// ---- SIMT micro-kernel: acc[TM][TN] += As[k][rows] * Bs[k][cols] over BK ----

// Fragment i of a thread's TM rows (or TN columns): groups of VW consecutive rows, the
// groups 16*VW apart, so the 16 threads along a dimension read 16 consecutive vectors.
template <int VW>
__device__ __forceinline__ int frag_index(int i, int t) {
  return (i / VW) * 16 * VW + t * VW + (i % VW);
}

template <typename T>
constexpr int simt_vec(int tile) {
  return (16 / static_cast<int>(sizeof(T))) < tile ? 16 / static_cast<int>(sizeof(T)) : tile;
}

template <typename T, int BK, int LDA, int LDB, int TM, int TN>
__device__ __forceinline__ void simt_tile(const T* As, const T* Bs, int tx, int ty, T (&acc)[TM][TN]) {
  constexpr int VM = simt_vec<T>(TM), VN = simt_vec<T>(TN);
#pragma unroll
  for (int kk = 0; kk < BK; ++kk) {
    T af[TM], bf[TN];
#pragma unroll
    for (int q = 0; q < TM / VM; ++q) {
      const Vec<T, VM> v = vec_load<T, VM>(As + kk * LDA + q * 16 * VM + ty * VM);
#pragma unroll
      for (int e = 0; e < VM; ++e) af[q * VM + e] = v.v[e];
    }
#pragma unroll
    for (int q = 0; q < TN / VN; ++q) {
      const Vec<T, VN> v = vec_load<T, VN>(Bs + kk * LDB + q * 16 * VN + tx * VN);
#pragma unroll
      for (int e = 0; e < VN; ++e) bf[q * VN + e] = v.v[e];
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fma(af[i], bf[j], acc[i][j]);
    }
  }
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

// ---- tensor cores ----

template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  using frag_t = __half;
  static constexpr int K = 16;   // wmma k
  static constexpr int BK = 32;  // block k
};
template <>
struct Mma<__nv_bfloat16> {
  using frag_t = __nv_bfloat16;
  static constexpr int K = 16;
  static constexpr int BK = 32;
};
template <>
struct Mma<float> {  // TF32
  using frag_t = nvcuda::wmma::precision::tf32;
  static constexpr int K = 8;
  static constexpr int BK = 16;
};

template <typename T, typename Frag>
__device__ __forceinline__ void to_tf32(Frag& f) {
  if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = nvcuda::wmma::__float_to_tf32(f.x[i]);
  }
}

// FM x FN accumulator fragments of one warp, its A fragments from As (layout LayoutA, leading
// dimension LDA; a_step(i, kk) is the element offset of fragment i at k = kk) and B from
// Bs[k][n] row-major.
template <typename T, typename LayoutA, int FM, int FN>
struct WarpTile {
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, Mma<T>::K, typename Mma<T>::frag_t, LayoutA>;
  using BFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, Mma<T>::K, typename Mma<T>::frag_t,
                                       nvcuda::wmma::row_major>;
  using CFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, Mma<T>::K, float>;
  CFrag acc[FM][FN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  // As_w: the warp's first A row (m) at k = 0; Bs_w: the warp's first column at k = 0.
  template <int BK, int LDA, int LDB>
  __device__ __forceinline__ void step(const T* As_w, const T* Bs_w) {
    constexpr bool a_row_major = std::is_same<LayoutA, nvcuda::wmma::row_major>::value;
#pragma unroll
    for (int kk = 0; kk < BK; kk += Mma<T>::K) {
      AFrag af[FM];
      BFrag bf[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        // row_major A: element (m, k) at m*LDA + k; col_major A: at k*LDA + m.
        const T* p = a_row_major ? As_w + i * 16 * LDA + kk : As_w + kk * LDA + i * 16;
        nvcuda::wmma::load_matrix_sync(af[i], p, LDA);
        to_tf32<T>(af[i]);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        nvcuda::wmma::load_matrix_sync(bf[j], Bs_w + kk * LDB + j * 16, LDB);
        to_tf32<T>(bf[j]);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) nvcuda::wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
  }

  // Hands each accumulator element (row, col within the warp tile, value) to f, through a
  // 16x16 float scratch of the warp's own; lanes take consecutive columns (coalesced).
  template <typename F>
  __device__ __forceinline__ void for_each(float* scratch, F&& f) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        nvcuda::wmma::store_matrix_sync(scratch, acc[i][j], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int idx = lane + 32 * e;
          f(i * 16 + idx / 16, j * 16 + idx % 16, scratch[idx]);
        }
        __syncwarp();
      }
    }
  }
};

constexpr int round_up_int(int v, int m) { return (v + m - 1) / m * m; }

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

// ---- weight GEMM (backward weight) ----

struct WgradBlock {
  int grp, m0, n0, chunk;
  int64_t pix0;  // first pixel of the chunk
  int kr_count;  // pixels in the chunk
  int rsc;       // R*S*Cg
};

template <int BM, int BN>
__device__ __forceinline__ void wgrad_block(const WgradArgs& a, WgradBlock& b) {
  int64_t bid = blockIdx.x;
  b.m0 = static_cast<int>(bid % a.tiles_m) * BM;
  bid /= a.tiles_m;
  b.n0 = static_cast<int>(bid % a.tiles_n) * BN;
  bid /= a.tiles_n;
  b.chunk = static_cast<int>(bid % a.chunks);
  b.grp = static_cast<int>(bid / a.chunks);
  b.pix0 = static_cast<int64_t>(b.chunk) * a.chunk_len;
  const int64_t left = a.pixels - b.pix0;
  b.kr_count = static_cast<int>(left < a.chunk_len ? left : a.chunk_len);
  b.rsc = a.R * a.S * a.Cg;
}

// Output-pixel counter of one B-loader pass: (n, p, q) of pixel pix0 + krow + k0, advanced
// by BK per tile (no division in the loop).
struct PixelCursor {
  int n, p, q;
  __device__ __forceinline__ void init(int64_t pixel, int P, int Q) {
    q = static_cast<int>(pixel % Q);
    const int64_t t = pixel / Q;
    p = static_cast<int>(t % P);
    n = static_cast<int>(t / P);
  }
  __device__ __forceinline__ void advance(int by, int P, int Q) {
    q += by;
    while (q >= Q) {
      q -= Q;
      ++p;
    }
    while (p >= P) {
      p -= P;
      ++n;
    }
  }
};

// The B column (r, s, c) of one loader thread, fixed for the block.
struct WgradColumn {
  int roff, soff;  // r*dh - ph, s*dw - pw
  int64_t chan;    // grp*Cg + c, or -1 past R*S*Cg
  __device__ __forceinline__ void init(const WgradArgs& a, const WgradBlock& b, int n) {
    if (n < b.rsc) {
      const int c = n % a.Cg, rs = n / a.Cg;
      roff = (rs / a.S) * a.dh - a.ph;
      soff = (rs % a.S) * a.dw - a.pw;
      chan = static_cast<int64_t>(b.grp) * a.Cg + c;
    } else {
      roff = soff = 0;
      chan = -1;
    }
  }
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> wgrad_b_load(const T* __restrict__ x, const WgradArgs& a, const WgradColumn& col,
                                                  const PixelCursor& pc, bool pixel_ok) {
  const int h = pc.p * a.sh + col.roff, w = pc.q * a.sw + col.soff;
  if (pixel_ok && col.chan >= 0 && h >= 0 && h < a.H && w >= 0 && w < a.W) {
    return vec_load<T, V>(x + ((static_cast<int64_t>(pc.n) * a.H + h) * a.W + w) * a.C + col.chan);
  }
  return vec_zero<T, V>();
}

// SIMT (float, double): As[k][m] from grad_output, Bs[k][n] from the input.
template <typename T, int BM, int BN>
__global__ void __launch_bounds__(kGemmThreads) wgrad_simt_kernel(const WgradArgs a) {
  constexpr int BK = 8, PAD = 4, LDA = BM + PAD, LDB = BN + PAD;
  constexpr int TM = BM / 16, TN = BN / 16;
  constexpr int A_PASSES = BK * BM / kGemmThreads, B_PASSES = BK * BN / kGemmThreads;
  constexpr int A_KROWS = kGemmThreads / BM, B_KROWS = kGemmThreads / BN;  // k rows per pass
  static_assert(A_PASSES * kGemmThreads == BK * BM && B_PASSES * kGemmThreads == BK * BN, "tile shape");
  __shared__ __align__(16) T As[2][BK * LDA];
  __shared__ __align__(16) T Bs[2][BK * LDB];

  WgradBlock b;
  wgrad_block<BM, BN>(a, b);
  const T* __restrict__ go = static_cast<const T*>(a.go);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int tid = threadIdx.x;
  const int a_m = tid % BM, a_k = tid / BM;  // A: m fastest (contiguous in grad_output)
  const int b_n = tid % BN, b_k = tid / BN;  // B: n fastest (contiguous channel)
  const int64_t a_chan = static_cast<int64_t>(b.grp) * a.Kg + b.m0 + a_m;
  const bool a_ok = b.m0 + a_m < a.Kg;
  WgradColumn col;
  col.init(a, b, b.n0 + b_n);
  PixelCursor pc[B_PASSES];
#pragma unroll
  for (int p = 0; p < B_PASSES; ++p) pc[p].init(b.pix0 + b_k + p * B_KROWS, a.P, a.Q);
  T ra[A_PASSES], rb[B_PASSES];

  auto load = [&](int k0) {
#pragma unroll
    for (int p = 0; p < A_PASSES; ++p) {
      const int kr = k0 + a_k + p * A_KROWS;
      ra[p] = (a_ok && kr < b.kr_count) ? go[(b.pix0 + kr) * a.K + a_chan] : Num<T>::zero();
    }
#pragma unroll
    for (int p = 0; p < B_PASSES; ++p) {
      const int kr = k0 + b_k + p * B_KROWS;
      rb[p] = wgrad_b_load<T, 1>(x, a, col, pc[p], kr < b.kr_count).v[0];
      pc[p].advance(BK, a.P, a.Q);
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int p = 0; p < A_PASSES; ++p) As[buf][(a_k + p * A_KROWS) * LDA + a_m] = ra[p];
#pragma unroll
    for (int p = 0; p < B_PASSES; ++p) Bs[buf][(b_k + p * B_KROWS) * LDB + b_n] = rb[p];
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
    if (more) load(k0 + BK);
    simt_tile<T, BK, LDA, LDB, TM, TN>(As[buf], Bs[buf], tx, ty, acc);
    if (more) store(buf ^ 1);
    __syncthreads();
    buf ^= 1;
  }

  T* __restrict__ part = static_cast<T*>(a.partial);
  constexpr int VM = simt_vec<T>(TM), VN = simt_vec<T>(TN);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int m = b.m0 + frag_index<VM>(i, ty);
    if (m >= a.Kg) continue;
    const int64_t row = (static_cast<int64_t>(b.chunk) * a.K + static_cast<int64_t>(b.grp) * a.Kg + m) * b.rsc;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int n = b.n0 + frag_index<VN>(j, tx);
      if (n < b.rsc) part[row + n] = acc[i][j];
    }
  }
}

// Tensor cores: As[k][m] (col_major A), Bs[k][n]; VEC: Kg and Cg multiples of 16 bytes' worth.
template <typename T, int BM, int BN, int BK, int WARPS_M, bool VEC>
__global__ void __launch_bounds__(kGemmThreads) wgrad_wmma_kernel(const WgradArgs a) {
  constexpr int WARPS_N = 8 / WARPS_M;
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N, FM = WTM / 16, FN = WTN / 16;
  constexpr int V16 = 16 / static_cast<int>(sizeof(T));
  constexpr int V = VEC ? V16 : 1;
  constexpr int LDA = BM + V16, LDB = BN + V16;
  constexpr int A_VPR = BM / V, B_VPR = BN / V;  // vectors per k row
  constexpr int A_KROWS = kGemmThreads / A_VPR, B_KROWS = kGemmThreads / B_VPR;
  constexpr int A_PASSES = BK / A_KROWS, B_PASSES = BK / B_KROWS;
  static_assert(FM * 16 == WTM && FN * 16 == WTN && BK % Mma<T>::K == 0, "tile shape");
  static_assert(A_PASSES * A_KROWS == BK && B_PASSES * B_KROWS == BK && A_KROWS >= 1 && B_KROWS >= 1, "passes");
  constexpr int A_BYTES = round_up_int(2 * BK * LDA * static_cast<int>(sizeof(T)), 128);
  constexpr int B_BYTES = round_up_int(2 * BK * LDB * static_cast<int>(sizeof(T)), 128);
  constexpr int SCRATCH_BYTES = 8 * 256 * 4;
  constexpr int TILE_BYTES = A_BYTES + B_BYTES > SCRATCH_BYTES ? A_BYTES + B_BYTES : SCRATCH_BYTES;
  __shared__ __align__(128) unsigned char smem[TILE_BYTES];
  T* As = reinterpret_cast<T*>(smem);            // [2][BK][LDA]
  T* Bs = reinterpret_cast<T*>(smem + A_BYTES);  // [2][BK][LDB]

  WgradBlock b;
  wgrad_block<BM, BN>(a, b);
  const T* __restrict__ go = static_cast<const T*>(a.go);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int a_mv = tid % A_VPR, a_k = tid / A_VPR;
  const int b_nv = tid % B_VPR, b_k = tid / B_VPR;
  const int a_m = b.m0 + a_mv * V;  // VEC: Kg % V == 0, so the vector is all in or all out
  const int64_t a_chan = static_cast<int64_t>(b.grp) * a.Kg + a_m;
  const bool a_ok = a_m < a.Kg;
  WgradColumn col;
  col.init(a, b, b.n0 + b_nv * V);  // VEC: Cg % V == 0, so the vector shares (r, s)
  PixelCursor pc[B_PASSES];
#pragma unroll
  for (int p = 0; p < B_PASSES; ++p) pc[p].init(b.pix0 + b_k + p * B_KROWS, a.P, a.Q);
  Vec<T, V> ra[A_PASSES], rb[B_PASSES];

  auto load = [&](int k0) {
#pragma unroll
    for (int p = 0; p < A_PASSES; ++p) {
      const int kr = k0 + a_k + p * A_KROWS;
      ra[p] = (a_ok && kr < b.kr_count) ? vec_load<T, V>(go + (b.pix0 + kr) * a.K + a_chan) : vec_zero<T, V>();
    }
#pragma unroll
    for (int p = 0; p < B_PASSES; ++p) {
      const int kr = k0 + b_k + p * B_KROWS;
      rb[p] = wgrad_b_load<T, V>(x, a, col, pc[p], kr < b.kr_count);
      pc[p].advance(BK, a.P, a.Q);
    }
  };
  auto store = [&](int buf) {
    T* as = As + buf * BK * LDA;
    T* bs = Bs + buf * BK * LDB;
#pragma unroll
    for (int p = 0; p < A_PASSES; ++p) vec_store<T, V>(as + (a_k + p * A_KROWS) * LDA + a_mv * V, ra[p]);
#pragma unroll
    for (int p = 0; p < B_PASSES; ++p) vec_store<T, V>(bs + (b_k + p * B_KROWS) * LDB + b_nv * V, rb[p]);
  };

  WarpTile<T, nvcuda::wmma::col_major, FM, FN> wt;
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
    wt.template step<BK, LDA, LDB>(As + buf * BK * LDA + wm * WTM, Bs + buf * BK * LDB + wn * WTN);
    if (more) store(buf ^ 1);
    __syncthreads();
    buf ^= 1;
  }

  float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
  float* __restrict__ part = static_cast<float*>(a.partial);
  wt.for_each(scratch, [&](int r, int c, float v) {
    const int m = b.m0 + wm * WTM + r, n = b.n0 + wn * WTN + c;
    if (m >= a.Kg || n >= b.rsc) return;
    part[(static_cast<int64_t>(b.chunk) * a.K + static_cast<int64_t>(b.grp) * a.Kg + m) * b.rsc + n] = v;
  });
}

// ---- launchers, one per dtype, defined in conv2d_gemm_*.cu ----

// Forward / backward data.  tf32 (float only): tensor cores with TF32 inputs.
void image_gemm_float(ImageGemmArgs a, bool tf32, cudaStream_t stream);
void image_gemm_double(ImageGemmArgs a, cudaStream_t stream);
void image_gemm_half(ImageGemmArgs a, cudaStream_t stream);
void image_gemm_bfloat16(ImageGemmArgs a, cudaStream_t stream);
// Backward weight into acc_t<T> partials [chunks][K][R*S*Cg].
void wgrad_gemm_float(WgradArgs a, bool tf32, cudaStream_t stream);
void wgrad_gemm_double(WgradArgs a, cudaStream_t stream);
void wgrad_gemm_half(WgradArgs a, cudaStream_t stream);
void wgrad_gemm_bfloat16(WgradArgs a, cudaStream_t stream);

// The split-K chunk length must be a multiple of every kernel's BK.
constexpr int kWgradChunkAlign = 32;

}  // namespace conv
}  // namespace convrnn
