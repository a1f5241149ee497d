// conv2d CUDA: the weight GEMM kernels (backward weight, split-K), SIMT and tensor cores.
// Shared pieces and the layouts: conv2d_gemm.cuh.
#pragma once

#include "cuda/conv2d_gemm.cuh"

namespace convrnn {
namespace conv {

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

}  // namespace conv
}  // namespace convrnn
