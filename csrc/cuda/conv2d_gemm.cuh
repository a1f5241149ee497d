// conv2d CUDA: the implicit-GEMM kernels (direct convolution, no im2col buffer): arguments,
// element types, the SIMT and tensor-core micro-kernels shared by the kernels of
// conv2d_gemm_image.cuh (forward, backward data) and conv2d_gemm_wgrad.cuh (backward weight).
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
#include "cuda/lanes.cuh"

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
  int sms;                                 // the device's SMs (round 3); 0: round 2's kernels only
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
using Vec = Lanes<T, V>;

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

// ---- launchers, one per dtype, defined in conv2d_gemm_*.cu ----

// Forward / backward data.  tf32 (float only): tensor cores with TF32 inputs.  With round 3
// on (a.sms > 0) backward data of 2-4 input channels runs the direct kernel where it applies
// (conv2d_gemm_launch.cuh: dgrad_small_c) and the float32 SIMT tile is fitted to a.sms.
// Returns whether a round-3 kernel ran.
bool image_gemm_float(ImageGemmArgs a, bool tf32, cudaStream_t stream);
bool image_gemm_double(ImageGemmArgs a, cudaStream_t stream);
bool image_gemm_half(ImageGemmArgs a, cudaStream_t stream);
bool image_gemm_bfloat16(ImageGemmArgs a, cudaStream_t stream);
// Backward weight into acc_t<T> partials [chunks][K][R*S*Cg].
void wgrad_gemm_float(WgradArgs a, bool tf32, cudaStream_t stream);
void wgrad_gemm_double(WgradArgs a, cudaStream_t stream);
void wgrad_gemm_half(WgradArgs a, cudaStream_t stream);
void wgrad_gemm_bfloat16(WgradArgs a, cudaStream_t stream);

// The split-K chunk length must be a multiple of every kernel's BK.
constexpr int kWgradChunkAlign = 32;

}  // namespace conv
}  // namespace convrnn
