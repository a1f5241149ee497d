// The persistent recurrence's kernels and their device helpers (rnn_persistent.cu has the
// design, the host side and the launch).  A header of its own so that tests/native can run this
// very code on the CPU (rnn_persistent_emulation.cpp: a thread per CUDA thread) where no GPU is.
#pragma once

#if defined(__CUDACC__)
#include <cooperative_groups.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "rnn_cells.h"

// The block's dynamic shared memory (the CPU emulation defines its own).
#if !defined(CONVRNN_PERSISTENT_SMEM)
#define CONVRNN_PERSISTENT_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace convrnn {
namespace persistent {

namespace cg = cooperative_groups;

constexpr int kPThreads = 256;
constexpr int kWarps = kPThreads / 32;
constexpr int kTR = 4;  // W rows of a warp tile
constexpr int kTB = 8;  // batch rows of a warp tile
static_assert(kTR * kTB == 32, "the reduce-scatter leaves one of a tile's sums in each lane");
constexpr int kPartMin = 32 * kWarps;  // floats of split-k partial sums (see smem_layout)

enum class Kind { kLstm, kGru, kRnn };

template <Kind C>
constexpr int kGates = C == Kind::kLstm ? 4 : (C == Kind::kGru ? 3 : 1);

// ---- device helpers ----

// Byte offsets of the shared-memory sections: the W slice (rows x K), the staged operand
// (chunk x K; two of them, one per step parity, when the blocks exchange it through distributed
// shared memory: Sync::kClusterDsmem below), the partial sums.  The partials hold ks * nc * rows
// floats: nc * rows when k is not split, else at most 32 * kWarps (ks * tiles <= kWarps, a tile
// covers 32 (b, r) pairs).
struct SmemLayout {
  int64_t stage, part, total;
};

CONVRNN_HD int64_t align16(int64_t n) {
  return (n + 15) / 16 * 16;
}

CONVRNN_HD SmemLayout smem_layout(int rows, int K, int chunk, int elem, int stages = 1) {
  SmemLayout s;
  s.stage = align16(int64_t(rows) * K * elem);
  s.part = s.stage + stages * align16(int64_t(chunk) * K * elem);
  const int64_t partials = int64_t(chunk) * rows > kPartMin ? int64_t(chunk) * rows : kPartMin;
  s.total = s.part + 4 * partials;
  return s;
}

// Rows and first row of step t: from the uploaded batch_sizes/offsets, or B rows per step.
struct StepRows {
  int64_t n, off;
};

__device__ __forceinline__ StepRows step_rows(const int64_t* steps, int64_t T, int64_t B, int64_t t) {
  return steps != nullptr ? StepRows{steps[t], steps[T + t]} : StepRows{B, t * B};
}

// How the blocks end a step and share its results.
//  - kGrid: a cooperative launch; grid.sync() ends the step, and each block stages the next
//    step's operand (h rows, or gate-gradient rows) from L2.
//  - kCluster: the whole grid is ONE thread-block cluster (sm_90+, at most 16 blocks); the
//    cluster's hardware barrier (arrive.release / wait.acquire at cluster scope) ends the step,
//    staging as kGrid.  A grid barrier is a global atomic plus polling through L2, a few
//    microseconds a step at batch 1; the cluster barrier is a fraction of that.
//  - kClusterDsmem: kCluster, and the operand travels through distributed shared memory: each
//    block stores the values its cells produce straight into every block's staging buffer for
//    the next step (st.shared::cluster, before the barrier), so no block reads L2 for it.  Two
//    staging buffers by step parity: the values for step k + 1 go to buffer (k + 1) % 2 while
//    the blocks read buffer k % 2; a block writes buffer k % 2 again only during step k + 1 (for
//    step k + 2), after the barrier that every block reached once done reading it in step k.
//    Needs the whole batch in one chunk.
enum class Sync : int { kGrid = 0, kCluster = 1, kClusterDsmem = 2 };

#if defined(__CUDACC__)
// The cluster barrier and a peer block's shared memory (sm_90+; the host never picks a cluster
// plan below that, and the emulation in tests/native defines its own).
__device__ __forceinline__ void cluster_sync() {
#if defined(_CG_HAS_CLUSTER_GROUP)
  cg::this_cluster().sync();
#else
  __trap();
#endif
}

template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, int rank) {
#if defined(_CG_HAS_CLUSTER_GROUP)
  return cg::this_cluster().map_shared_rank(p, rank);
#else
  __trap();
  return p;
#endif
}
#endif

// The barrier that ends a step.
__device__ __forceinline__ void step_barrier(Sync sync) {
  if (sync == Sync::kGrid) {
    cg::this_grid().sync();
  } else {
    cluster_sync();
  }
}

// v into element i of every block's buffer `buf` (a shared-memory address in this block, the
// same offset in each peer), for kClusterDsmem.
template <typename T>
__device__ __forceinline__ void publish(T* buf, int64_t i, T v, int blocks) {
  for (int r = 0; r < blocks; ++r) cluster_peer(buf, r)[i] = v;
}

// Loads through L2 only (ld.global.cg), for data other blocks wrote earlier in this kernel.
__device__ __forceinline__ float load_cg(const float* p) {
  return __ldcg(p);
}
__device__ __forceinline__ c10::Half load_cg(const c10::Half* p) {
  return c10::Half(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits());
}
__device__ __forceinline__ c10::BFloat16 load_cg(const c10::BFloat16* p) {
  return c10::BFloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::BFloat16::from_bits());
}
__device__ __forceinline__ uint4 load_cg(const uint4* p) {
  return __ldcg(p);
}

// store(i, load(i)) for i < n over the block, kBatch loads in flight per thread before their
// stores (these copies are latency-bound: one L2 or DRAM round trip per batch).
template <typename V, typename Load, typename Store>
__device__ __forceinline__ void copy_batched(int n, Load load, Store store) {
  constexpr int kBatch = sizeof(V) >= 16 ? 4 : 8;
  for (int i0 = threadIdx.x; i0 < n; i0 += kBatch * kPThreads) {
    V v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u * kPThreads;
      if (i < n) v[u] = load(i);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u * kPThreads;
      if (i < n) store(i, v[u]);
    }
  }
}

// n elements from global memory (through L2) into shared memory: 16-byte words when vec (the
// host checked that both ends are 16-byte aligned and n a whole number of words).
template <typename T>
__device__ __forceinline__ void stage_rows(T* dst, const T* src, int n, bool vec) {
  if (vec) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    copy_batched<uint4>(n / int(16 / sizeof(T)), [&](int i) { return load_cg(s + i); },
                        [&](int i, uint4 v) { d[i] = v; });
  } else {
    copy_batched<T>(n, [&](int i) { return load_cg(src + i); }, [&](int i, T v) { dst[i] = v; });
  }
}

// The G gate rows of hidden units [u0, u0 + U) of a (G H, H) matrix w into dst, gate-major:
// dst row g U + u = w row g H + u0 + u (the forward kernels' shared-memory slices).
template <typename T>
__device__ __forceinline__ void stage_gate_rows(T* dst, const T* w, int G, int U, int u0, int H) {
  copy_batched<T>(
      G * U * H,
      [&](int i) {
        const int r = i / H, g = r / U;
        return w[int64_t(g * H + u0 + r - g * U) * H + (i - r * H)];
      },
      [&](int i, T v) { dst[i] = v; });
}

// Butterfly reduce-scatter: lane l returns the sum over the warp of v[l].  Each step exchanges
// half of the values still held with the lane Half away: the lane whose bit Half is set keeps
// the upper half, so after the steps Half = 16, 8, 4, 2, 1 lane l holds index l.  31 shuffles
// for 32 sums.  (Templates, not loops: every index must be a constant for v to stay in registers.)
template <int Half>
__device__ __forceinline__ void exchange_halves(float (&v)[32], int lane) {
  const bool upper = (lane & Half) != 0;
#pragma unroll
  for (int i = 0; i < Half; ++i) {
    const float give = upper ? v[i] : v[i + Half];
    const float keep = upper ? v[i + Half] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, give, Half);
  }
  if constexpr (Half > 1) exchange_halves<Half / 2>(v, lane);
}

__device__ __forceinline__ float reduce_scatter(float (&v)[32], int lane) {
  exchange_halves<16>(v, lane);
  return v[0];
}

// Ways k is split so that the warps have work: the largest power of two with ks * tiles <= kWarps.
__device__ __forceinline__ int k_splits(int rows, int nc) {
  const int tiles = ((rows + kTR - 1) / kTR) * ((nc + kTB - 1) / kTB);
  int ks = 1;
  while (2 * ks * tiles <= kWarps) ks *= 2;
  return ks;
}

// One batch row (nc == 1: generation at batch 1): a warp's tile is kTR W rows, lane l sums
// k = l, l + 32, ... for each, and two halving exchanges (xor 16, 8) then a butterfly over the
// remaining 8 lanes (xor 4, 2, 1) leave row (l >> 3) & 3's sum in lane l: 6 shuffles, where
// the 8-row tile computes and reduces 8x the products it keeps (~370 instructions a warp a step
// at H = 128 by count, against ~90; measured on an H200: 2.74 -> 2.36 us a step, LSTM forward).
__device__ __forceinline__ float reduce_rows4(float (&v)[kTR], int lane) {
  static_assert(kTR == 4, "two halving exchanges for four rows");
  const bool up16 = (lane & 16) != 0, up8 = (lane & 8) != 0;
  float w[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float give = up16 ? v[i] : v[i + 2];
    const float keep = up16 ? v[i + 2] : v[i];
    w[i] = keep + __shfl_xor_sync(0xffffffffu, give, 16);
  }
  const float give = up8 ? w[0] : w[1];
  float x = (up8 ? w[1] : w[0]) + __shfl_xor_sync(0xffffffffu, give, 8);
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x;
}

template <typename T>
__device__ void row_products(const T* A, const T* W, int rows, int K, int ks, float* part) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tiles = (rows + kTR - 1) / kTR;
  const int span = ((K + ks - 1) / ks + 31) / 32 * 32;
  for (int task = warp; task < tiles * ks; task += kWarps) {
    const int q = task / tiles, r0 = (task - q * tiles) * kTR;
    const int k_end = min(K, (q + 1) * span);
    int wrow[kTR];
#pragma unroll
    for (int i = 0; i < kTR; ++i) wrow[i] = min(r0 + i, rows - 1) * K;
    float acc[kTR];
#pragma unroll
    for (int i = 0; i < kTR; ++i) acc[i] = 0.0f;
#pragma unroll 4
    for (int k = q * span + lane; k < k_end; k += 32) {
      const float a = static_cast<float>(A[k]);
#pragma unroll
      for (int i = 0; i < kTR; ++i) acc[i] = fmaf(static_cast<float>(W[wrow[i] + k]), a, acc[i]);
    }
    const float sum = reduce_rows4(acc, lane);
    const int r = r0 + ((lane >> 3) & 3);
    if ((lane & 7) == 0 && r < rows) part[q * rows + r] = sum;
  }
}

// part[(q * nc + b) * rows + r] = sum over k in range q of A[b][k] * W[r][k], for b < nc,
// r < rows, q < ks; A (nc x K) and W (rows x K) row-major in shared memory.  Tile rows past
// rows or nc repeat the last one (computed, never stored), so the loop has no branches.
template <typename T>
__device__ void tile_products(const T* A, int nc, const T* W, int rows, int K, int ks, float* part) {
  if (nc == 1) {
    row_products(A, W, rows, K, ks, part);
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tiles_r = (rows + kTR - 1) / kTR, tiles = tiles_r * ((nc + kTB - 1) / kTB);
  const int span = ((K + ks - 1) / ks + 31) / 32 * 32;
  for (int task = warp; task < tiles * ks; task += kWarps) {
    const int q = task / tiles, tile = task - q * tiles;
    const int r0 = (tile % tiles_r) * kTR, b0 = (tile / tiles_r) * kTB;
    const int k_end = min(K, (q + 1) * span);
    int wrow[kTR], arow[kTB];
#pragma unroll
    for (int i = 0; i < kTR; ++i) wrow[i] = min(r0 + i, rows - 1) * K;
#pragma unroll
    for (int i = 0; i < kTB; ++i) arow[i] = min(b0 + i, nc - 1) * K;
    float acc[kTR * kTB];
#pragma unroll
    for (int i = 0; i < kTR * kTB; ++i) acc[i] = 0.0f;
#pragma unroll 2
    for (int k = q * span + lane; k < k_end; k += 32) {
      float w[kTR], a[kTB];
#pragma unroll
      for (int i = 0; i < kTR; ++i) w[i] = static_cast<float>(W[wrow[i] + k]);
#pragma unroll
      for (int i = 0; i < kTB; ++i) a[i] = static_cast<float>(A[arow[i] + k]);
#pragma unroll
      for (int i = 0; i < kTR; ++i) {
#pragma unroll
        for (int j = 0; j < kTB; ++j) acc[i * kTB + j] = fmaf(w[i], a[j], acc[i * kTB + j]);
      }
    }
    const float sum = reduce_scatter(acc, lane);
    const int r = r0 + lane / kTB, b = b0 + lane % kTB;
    if (r < rows && b < nc) part[(q * nc + b) * rows + r] = sum;
  }
}

// The dot product of batch row b (of the chunk) with W row r: its ks partial sums, in order.
__device__ __forceinline__ float partial_sum(const float* part, int ks, int nc, int rows, int b, int r) {
  float s = part[b * rows + r];
  for (int q = 1; q < ks; ++q) s += part[(q * nc + b) * rows + r];
  return s;
}

// ---- forward kernel ----

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* x;                  // (N, G*H) input projections
  const scalar_t* w;                  // (G*H, H) W_hh
  const scalar_t* b_ih;               // (G*H) or null (then b_hh is null too)
  const scalar_t* b_hh;
  const scalar_t* h0;                 // (B, H)
  const scalar_t* c0;                 // (B, H), LSTM
  scalar_t* out;                      // (N, H) every step's h
  scalar_t* cs;                       // (N, H) every step's c, LSTM
  scalar_t* ws;                       // (N, 4H) the cell workspace, or null (no backward to follow)
  const int64_t* steps;        // batch_sizes[T] then offsets[T], or null: B rows per step
  int64_t T, B;
  int H, units, chunk;         // hidden size, units per block, batch rows staged at once
  bool reverse, relu, vec;     // vec: out and h0 rows are whole 16-byte words
  Sync sync;                   // the step barrier and how h travels (Sync above)
};

// What the forward cell of one (batch row, unit) reads besides the products: the input
// projections with the biases summed in (LSTM and RNN: x + (b_ih + b_hh); GRU: x + b_ih, and
// b_hh apart, for n's r * (hW + b_hh)), and the c the row enters the step with (LSTM; this
// block wrote it at the previous step).  Independent of the products, so the kernel loads a
// thread's first set before them.
template <Kind C>
struct ForwardIn {
  float x[kGates<C>], b_hh[C == Kind::kGru ? 3 : 1], cx;
};

template <typename T, Kind C>
__device__ __forceinline__ ForwardIn<C> forward_inputs(const ForwardArgs<T>& p, int64_t row, int64_t b, int j,
                                                       StepRows prev, int64_t np) {
  constexpr int G = kGates<C>;
  const int64_t H = p.H;
  ForwardIn<C> in;
  const T* x = p.x + row * G * H + j;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    in.x[g] = static_cast<float>(x[g * H]);
    if constexpr (C == Kind::kGru) {
      if (p.b_ih != nullptr) in.x[g] += static_cast<float>(p.b_ih[g * H + j]);
      in.b_hh[g] = p.b_hh != nullptr ? static_cast<float>(p.b_hh[g * H + j]) : 0.0f;
    } else if (p.b_ih != nullptr) {
      in.x[g] += static_cast<float>(p.b_ih[g * H + j]) + static_cast<float>(p.b_hh[g * H + j]);
    }
  }
  in.cx = 0.0f;
  if constexpr (C == Kind::kLstm) {
    in.cx = static_cast<float>(b < np ? load_cg(p.cs + (prev.off + b) * H + j) : p.c0[b * H + j]);
  }
  return in;
}

// The cell of unit j for the batch row at `row` of the (N, ...) blocks: gh[g] are the products
// h_prev . W_hh[g H + j]; hx the h this row enters the step with (GRU).  Returns the new h as
// stored.
template <typename T, Kind C>
__device__ __forceinline__ T forward_cell(const ForwardArgs<T>& p, const ForwardIn<C>& in,
                                          const float (&gh)[kGates<C>], int64_t row, int j, float hx) {
  const int64_t H = p.H, e = row * H + j;
  T hv;
  if constexpr (C == Kind::kLstm) {
    float pre[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) pre[g] = in.x[g] + gh[g];
    const LstmGates<float> a = lstm_gates(pre[0], pre[1], pre[2], pre[3]);
    float h, c;
    lstm_update(a, in.cx, h, c);
    hv = static_cast<T>(h);
    p.cs[e] = static_cast<T>(c);
    if (p.ws != nullptr) {
      T* w = p.ws + row * 4 * H + j;
      w[0] = static_cast<T>(a.i);
      w[H] = static_cast<T>(a.f);
      w[2 * H] = static_cast<T>(a.g);
      w[3 * H] = static_cast<T>(a.o);
    }
  } else if constexpr (C == Kind::kGru) {
    const float hn = gh[2] + in.b_hh[2];
    float r, z, n, h;
    gru_forward(in.x[0], in.x[1], in.x[2], gh[0] + in.b_hh[0], gh[1] + in.b_hh[1], hn, hx, r, z, n, h);
    hv = static_cast<T>(h);
    if (p.ws != nullptr) {
      T* w = p.ws + row * 4 * H + j;
      w[0] = static_cast<T>(r);
      w[H] = static_cast<T>(z);
      w[2 * H] = static_cast<T>(n);
      w[3 * H] = static_cast<T>(hn);
    }
  } else {
    hv = static_cast<T>(rnn_activation(in.x[0] + gh[0], p.relu));
  }
  p.out[e] = hv;
  return hv;
}

template <typename T, Kind C>
__global__ void __launch_bounds__(kPThreads, 2) forward_kernel(const ForwardArgs<T> p) {
  constexpr int G = kGates<C>;
  CONVRNN_PERSISTENT_SMEM(smem);
  const int H = p.H, u0 = blockIdx.x * p.units, U = min(p.units, H - u0), rows = G * U;
  const int blocks = (H + p.units - 1) / p.units;
  const bool dsmem = p.sync == Sync::kClusterDsmem;  // then one chunk holds the whole batch
  const SmemLayout lay = smem_layout(G * p.units, H, p.chunk, sizeof(T), dsmem ? 2 : 1);
  T* w_s = reinterpret_cast<T*>(smem);  // row g U + u = W_hh row g H + u0 + u
  T* const stages = reinterpret_cast<T*>(smem + lay.stage);
  const int64_t stage_elems = align16(int64_t(p.chunk) * H * sizeof(T)) / int64_t(sizeof(T));
  float* part = reinterpret_cast<float*>(smem + lay.part);
  stage_gate_rows(w_s, p.w, G, U, u0, H);
  if (dsmem) cluster_sync();  // every block of the cluster runs before any stores into its shared memory
  StepRows prev{0, 0};
  for (int64_t k = 0; k < p.T; ++k) {
    const StepRows cur = step_rows(p.steps, p.T, p.B, p.reverse ? p.T - 1 - k : k);
    const int64_t np = k > 0 ? prev.n : 0;  // rows [0, np) enter from the previous step, the rest from h0
    T* const stage = dsmem ? stages + (k & 1) * stage_elems : stages;
    for (int64_t c0 = 0; c0 < cur.n; c0 += p.chunk) {
      const int nc = static_cast<int>(min(int64_t(p.chunk), cur.n - c0));
      // This thread's first cell's inputs, loaded now: their latency hides behind the staging
      // and the products (e = threadIdx.x below).
      ForwardIn<C> first;
      if (int(threadIdx.x) < nc * U) {
        const int bl = threadIdx.x / U;
        first = forward_inputs<T, C>(p, cur.off + c0 + bl, c0 + bl, u0 + int(threadIdx.x) - bl * U, prev, np);
      }
      // Rows entering from the previous step: from L2, or (dsmem) already here.
      const int64_t split = max(c0, min(np, c0 + nc));
      if (split > c0 && !dsmem) stage_rows(stage, p.out + (prev.off + c0) * H, int(split - c0) * H, p.vec);
      if (c0 + nc > split) stage_rows(stage + (split - c0) * H, p.h0 + split * H, int(c0 + nc - split) * H, p.vec);
      __syncthreads();  // the staged rows (and, at the first step, the W slice) are in place
      const int ks = k_splits(rows, nc);
      tile_products(stage, nc, w_s, rows, H, ks, part);
      __syncthreads();
      for (int e = threadIdx.x; e < nc * U; e += kPThreads) {
        const int bl = e / U, u = e - bl * U, j = u0 + u;
        const int64_t b = c0 + bl;
        float gh[G];
#pragma unroll
        for (int g = 0; g < G; ++g) gh[g] = partial_sum(part, ks, nc, rows, bl, g * U + u);
        const ForwardIn<C> in =
            e == int(threadIdx.x) ? first : forward_inputs<T, C>(p, cur.off + b, b, j, prev, np);
        const T h = forward_cell<T, C>(p, in, gh, cur.off + b, j, static_cast<float>(stage[bl * H + j]));
        if (dsmem && k + 1 < p.T) publish(stages + ((k + 1) & 1) * stage_elems, b * H + j, h, blocks);
      }
      __syncthreads();  // the next chunk overwrites stage (the GRU's cells read it) and part
    }
    prev = cur;
    if (k + 1 < p.T) step_barrier(p.sync);  // every block's h (and c) of this step written and visible
  }
}

// ---- backward kernel ----

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* w;         // (G*H, H) W_hh
  const scalar_t* gout;      // (N, H) gradient of the output, or null
  const scalar_t* out;       // (N, H) the forward's h of every step
  const scalar_t* cs;        // (N, H) the forward's c of every step, LSTM
  const scalar_t* ws;        // (N, 4H) the forward's workspace, LSTM and GRU
  const scalar_t* h0;        // (B, H)
  const scalar_t* c0;        // (B, H), LSTM
  scalar_t* dh;              // (B, H) in: grad_hn or zeros; out: grad_h0
  scalar_t* dc;              // (B, H) in: grad_cn or zeros; out: grad_c0 (LSTM)
  scalar_t* g_hidden;        // (N, G*H) gradients of the hidden-side pre-activations
  scalar_t* g_input;         // (N, 3H) GRU: of the input-side ones
  float* dh_acc;      // (B, H) the carried dh in float (each block its own columns)
  float* dc_acc;      // (B, H) the carried dc in float, LSTM
  const int64_t* steps;
  int64_t T, B;
  int H, units, chunk;
  bool reverse, relu, vec;  // vec: g_hidden rows are whole 16-byte words
  Sync sync;                // the step barrier and how the gate gradients travel (Sync above)
};

// The step geometry that the forward and the backward kernels' arguments both carry (host; the
// launcher and the CPU emulation tests set it alike).
template <typename Args>
void set_step_geometry(Args& a, const int64_t* steps, int64_t T, int64_t B, int H, int units, int chunk,
                       bool reverse, bool relu, Sync sync = Sync::kGrid) {
  a.sync = sync;
  a.steps = steps;
  a.T = T;
  a.B = B;
  a.H = H;
  a.units = units;
  a.chunk = chunk;
  a.reverse = reverse;
  a.relu = relu;
}

// What the backward cell of one (batch row b, unit j) reads besides the carried dh and dc: the
// output's gradient, the saved workspace (LSTM i, f, g, o; GRU r, z, n, hn), the entering and
// new c (LSTM), the entering h (GRU), the new h (vanilla RNN).  None of it depends on the
// products, so the kernel loads a thread's first set before them.  (rows cur; the previous
// processed step's rows prev, of which [0, np) hold this step's entering state.)
struct BackwardIn {
  float gout, w[4], a, b;  // a, b: LSTM cx, cy; GRU hx; RNN hy
};

template <typename T, Kind C>
__device__ __forceinline__ BackwardIn backward_inputs(const BackwardArgs<T>& p, StepRows cur, StepRows prev,
                                                      int64_t np, int64_t b, int j) {
  const int64_t H = p.H, row = cur.off + b, e = row * H + j, s = b * H + j;
  BackwardIn in;
  in.gout = p.gout != nullptr ? static_cast<float>(p.gout[e]) : 0.0f;
  in.b = 0.0f;
  if constexpr (C != Kind::kRnn) {
    const T* w = p.ws + row * 4 * H + j;
#pragma unroll
    for (int q = 0; q < 4; ++q) in.w[q] = static_cast<float>(w[q * H]);
  }
  if constexpr (C == Kind::kLstm) {
    in.a = static_cast<float>(b < np ? p.cs[(prev.off + b) * H + j] : p.c0[s]);
    in.b = static_cast<float>(p.cs[e]);
  } else if constexpr (C == Kind::kGru) {
    in.a = static_cast<float>(b < np ? p.out[(prev.off + b) * H + j] : p.h0[s]);
  } else {
    in.a = static_cast<float>(p.out[e]);
  }
  return in;
}

// The cell backward of unit j for batch row b at a step.  Reads the carried dh (and dc), writes
// the step's gradient rows (passing each hidden-side gate gradient q, as stored, to out(q, v)),
// and leaves in dh_acc the cell's direct contribution to the entering h's gradient (the GRU's
// z * ghy; 0 for the others): the next step processed adds g W_hh to it.
template <typename T, Kind C, typename Out>
__device__ __forceinline__ void backward_cell(const BackwardArgs<T>& p, const BackwardIn& in, StepRows cur,
                                              int64_t b, int j, Out&& out) {
  const int64_t H = p.H, row = cur.off + b, s = b * H + j;
  const float ghy = p.dh_acc[s] + in.gout;
  if constexpr (C == Kind::kLstm) {
    const LstmGates<float> a{in.w[0], in.w[1], in.w[2], in.w[3]};
    float d[4], gcx;
    lstm_backward(a, in.a, in.b, ghy, p.dc_acc[s], d, gcx);
    T* g = p.g_hidden + row * 4 * H + j;
#pragma unroll
    for (int q = 0; q < 4; ++q) out(q, g[q * H] = static_cast<T>(d[q]));
    p.dc_acc[s] = gcx;
    p.dh_acc[s] = 0.0f;
  } else if constexpr (C == Kind::kGru) {
    float dx[3], dhh[3], ghx;
    gru_backward(in.w[0], in.w[1], in.w[2], in.w[3], in.a, ghy, dx, dhh, ghx);
    T* gi = p.g_input + row * 3 * H + j;
    T* gh = p.g_hidden + row * 3 * H + j;
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      gi[q * H] = static_cast<T>(dx[q]);
      out(q, gh[q * H] = static_cast<T>(dhh[q]));
    }
    p.dh_acc[s] = ghx;
  } else {
    out(0, p.g_hidden[row * H + j] = static_cast<T>(rnn_activation_grad(ghy, in.a, p.relu)));
    p.dh_acc[s] = 0.0f;
  }
}

template <typename T, Kind C>
__global__ void __launch_bounds__(kPThreads, 2) backward_kernel(const BackwardArgs<T> p) {
  constexpr int G = kGates<C>;
  CONVRNN_PERSISTENT_SMEM(smem);
  const int H = p.H, GH = G * H, u0 = blockIdx.x * p.units, U = min(p.units, H - u0);
  const int blocks = (H + p.units - 1) / p.units;
  const bool dsmem = p.sync == Sync::kClusterDsmem;  // then one chunk holds the whole batch
  const SmemLayout lay = smem_layout(p.units, GH, p.chunk, sizeof(T), dsmem ? 2 : 1);
  T* wt_s = reinterpret_cast<T*>(smem);  // row u = column u0 + u of W_hh (G H values)
  T* const stages = reinterpret_cast<T*>(smem + lay.stage);
  const int64_t stage_elems = align16(int64_t(p.chunk) * GH * sizeof(T)) / int64_t(sizeof(T));
  float* part = reinterpret_cast<float*>(smem + lay.part);
  copy_batched<T>(
      U * GH, [&](int i) { return p.w[int64_t(i / U) * H + u0 + i % U]; },
      [&](int i, T v) { wt_s[(i % U) * GH + i / U] = v; });
  for (int64_t e = threadIdx.x; e < p.B * U; e += kPThreads) {
    const int64_t s = (e / U) * H + u0 + e % U;
    p.dh_acc[s] = static_cast<float>(p.dh[s]);
    if constexpr (C == Kind::kLstm) p.dc_acc[s] = static_cast<float>(p.dc[s]);
  }
  if (dsmem) cluster_sync();  // every block of the cluster runs before any stores into its shared memory
  // Processed steps k = T-1 .. 0 (the forward's order reversed), then k = -1 for the products of
  // step 0's gradients, which give grad_h0.
  for (int64_t k = p.T - 1; k >= -1; --k) {
    // This step's rows, and this thread's first cell's inputs, loaded before the products.
    const StepRows cur = k >= 0 ? step_rows(p.steps, p.T, p.B, p.reverse ? p.T - 1 - k : k) : StepRows{0, 0};
    const StepRows prev = k > 0 ? step_rows(p.steps, p.T, p.B, p.reverse ? p.T - k : k - 1) : StepRows{0, 0};
    const int64_t np = k > 0 ? prev.n : 0;
    BackwardIn first;
    if (int64_t(threadIdx.x) < cur.n * U) {
      first = backward_inputs<T, C>(p, cur, prev, np, threadIdx.x / U, u0 + int(threadIdx.x % U));
    }
    // dsmem: step k+1's gradient rows arrived in buffer (k + 1) % 2; this step's go to k % 2.
    T* const stage = dsmem ? stages + ((k + 1) & 1) * stage_elems : stages;
    T* const next = dsmem && k >= 0 ? stages + (k & 1) * stage_elems : nullptr;
    if (k + 1 < p.T) {  // dh_acc[b][own] += g(step k+1)[b] . W_hh[:, own], for the rows active in it
      const StepRows nx = step_rows(p.steps, p.T, p.B, p.reverse ? p.T - 2 - k : k + 1);
      for (int64_t c0 = 0; c0 < nx.n; c0 += p.chunk) {
        const int nc = static_cast<int>(min(int64_t(p.chunk), nx.n - c0));
        if (!dsmem) stage_rows(stage, p.g_hidden + (nx.off + c0) * GH, nc * GH, p.vec);
        __syncthreads();
        const int ks = k_splits(U, nc);
        tile_products(stage, nc, wt_s, U, GH, ks, part);
        __syncthreads();
        for (int e = threadIdx.x; e < nc * U; e += kPThreads) {
          const int bl = e / U, u = e - bl * U;
          p.dh_acc[(c0 + bl) * H + u0 + u] += partial_sum(part, ks, nc, U, bl, u);
        }
        __syncthreads();  // part and stage are rewritten by the next chunk
      }
    }
    if (k < 0) break;
    __syncthreads();  // dh_acc (written by other threads of this block) is complete
    for (int64_t e = threadIdx.x; e < cur.n * U; e += kPThreads) {
      const int64_t b = e / U;
      const int j = u0 + static_cast<int>(e % U);
      const BackwardIn in = e == int64_t(threadIdx.x) ? first : backward_inputs<T, C>(p, cur, prev, np, b, j);
      backward_cell<T, C>(p, in, cur, b, j, [&](int q, T v) {
        if (next != nullptr) publish(next, b * GH + q * H + j, v, blocks);
      });
    }
    step_barrier(p.sync);  // every block's g rows of this step written and visible
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < p.B * U; e += kPThreads) {
    const int64_t s = (e / U) * H + u0 + e % U;
    p.dh[s] = static_cast<T>(p.dh_acc[s]);
    if constexpr (C == Kind::kLstm) p.dc[s] = static_cast<T>(p.dc_acc[s]);
  }
}


// ---- the plan (host): grid and chunk sizes ----

struct Plan {
  int units = 0, blocks = 0, chunk = 0;  // hidden units per block, blocks, batch rows staged at once
  int64_t smem = 0;                      // dynamic shared memory per block, bytes
  double step_ns = 0;                    // modelled time of one step
  Sync sync = Sync::kGrid;               // the step barrier and how the operand travels
};

// Modelled nanoseconds of one step on an H100/H200-class GPU; it only ranks the candidates
// (benchmarks/NOTES-rnn-seq.md): the step barrier (grid: 600 ns plus serialised arrivals;
// cluster: 300 ns), every block staging the step's B x K operand from L2 (500 ns latency, ~4
// TB/s = 4000 bytes/ns shared by all blocks), and one block's products (a warp tile costs K/32
// x (kTR + kTB) shared-memory wavefronts plus 32 shuffles, ~1 per clock at 1.7 GHz).  Through
// distributed shared memory there is no staging; instead each cell's thread stores its
// `stores` values (1 forward, G backward) into every block, one after another: 200 ns + 13 ns
// a store (fitted to the H200's batch-1 steps, 2026-11-26: against L2 staging, -0.10 us a step
// forward (16 stores a thread), +0.52 us LSTM and +0.30 us GRU backward (64 and 48)).
inline double step_ns(int blocks, int rows, int K, int64_t B, int elem, Sync sync = Sync::kGrid, int units = 1,
                      int stores = 1) {
  const double tiles = std::ceil(rows / double(kTR)) * std::ceil(double(B) / kTB);
  const double barrier = sync == Sync::kGrid ? 600.0 + 4.0 * blocks : 300.0;
  const double rounds = std::ceil(double(units) * double(B) / kPThreads);  // cells a thread
  const double staging = sync == Sync::kClusterDsmem
                             ? 200.0 + 13.0 * stores * blocks * rounds
                             : 500.0 + double(blocks) * double(B) * K * elem / 4000.0;
  const double products = tiles * (std::ceil(K / 32.0) * (kTR + kTB) + 32.0) / 1.7;
  return barrier + staging + products;
}

// Every power-of-two number of units per block (and H itself) whose shared memory fits in
// smem_optin, with the batch staged in chunks of 8-row multiples (all of it when they fit),
// fastest modelled first.  rows_per_unit: G (forward: a unit's gate rows) or 1 (backward: its
// column of W_hh); K: the length of those rows (H, or G H).  Grids of at most max_cluster blocks
// are also offered as one thread-block cluster (kCluster), and as kClusterDsmem where the whole
// batch fits one chunk with two staging buffers (dsmem false: not offered).
inline std::vector<Plan> plan_candidates(int rows_per_unit, int K, int64_t B, int H, int elem, int64_t smem_optin,
                                         int max_cluster = 0, bool dsmem = true) {
  std::vector<Plan> plans;
  for (int units = 1;; units = units * 2 > H ? H : units * 2) {
    Plan p;
    p.units = units;
    p.blocks = (H + units - 1) / units;
    const int rows = rows_per_unit * units;
    int chunk = B < kTB ? static_cast<int>(B) : static_cast<int>(std::min<int64_t>((B + kTB - 1) / kTB * kTB, 1 << 16));
    while (chunk > kTB && smem_layout(rows, K, chunk, elem).total > smem_optin) chunk -= kTB;
    p.chunk = chunk;
    p.smem = smem_layout(rows, K, chunk, elem).total;
    p.step_ns = step_ns(p.blocks, rows, K, B, elem);
    if (p.smem <= smem_optin) {
      plans.push_back(p);
      if (p.blocks <= max_cluster) {
        Plan c = p;
        c.sync = Sync::kCluster;
        c.step_ns = step_ns(p.blocks, rows, K, B, elem, c.sync);
        plans.push_back(c);
        const int64_t two = smem_layout(rows, K, chunk, elem, 2).total;
        if (dsmem && chunk >= B && two <= smem_optin) {
          c.sync = Sync::kClusterDsmem;
          c.smem = two;
          c.step_ns = step_ns(p.blocks, rows, K, B, elem, c.sync, units, K / H);  // K / H: values a cell
          plans.push_back(c);
        }
      }
    }
    if (units >= H) break;
  }
  std::stable_sort(plans.begin(), plans.end(), [](const Plan& a, const Plan& b) { return a.step_ns < b.step_ns; });
  return plans;
}

// ---- the stacked forward: every layer of a unidirectional stack in one kernel ----
//
// Inference (no backward to follow) of L >= 2 layers at a small batch (generation): a layer-by-
// layer run pays T step barriers a layer, each a chain of fixed latencies (barrier, staging, a
// short dot product, the cell, the exchange) that the arithmetic of a batch-1 step does not
// fill.  Here layer l runs its step t at wavefront step s = t + l: at step s every layer whose
// t is in [0, T) steps at once, so L layers take T + L - 1 barriers instead of L T.  Layer l >= 1
// reads its input h_{l-1}(t) (made by layer l - 1 at step s - 1) and its own h_l(t - 1) (made by
// itself at step s - 1): both come from the step before, as in the one-layer kernel, so the
// double-buffered exchange of Sync::kClusterDsmem carries them.  Layer 0's input projections
// are one GEMM before the kernel; layer l >= 1's are computed per step from its W_ih slice.
//
// Blocks: [first[l], first[l + 1]) serve layer l, units[l] hidden units each.  A layer-0 block
// holds its units' G gate rows of W_hh (one segment); a block of a later layer holds its units'
// G rows of W_ih then G rows of W_hh (two segments, both H long: no projection, one direction).
// The staging buffers hold every layer's h for the batch: slot l = rows [l B, l B + B) of H.
// The whole grid is one thread-block cluster (<= 16 blocks, sm_90+): each cell's thread stores
// its h into the staging buffer of every block that reads it (layers l and l + 1).

constexpr int kMaxStack = 8;  // layers of one stacked launch
// The largest batch the host gives the stacked kernel.  Its one cluster (<= 16 blocks) holds
// every layer, so each block does several times the one-layer plan's products a step: a win
// where the step is the chain of latencies (small batches: generation), not where the products
// grow with the batch (training shapes, where the layer-by-layer grid plans spread them over
// 32-64 blocks and measured 1.7-3.3x cuDNN).  The plan model cannot rank the two (it sums a
// block's tiles as if one warp ran them), so the cut is this bound.
constexpr int64_t kStackMaxBatch = 8;

// A stacked launch's geometry (the host's plan; the emulation sets it alike).  The shared-memory
// offsets are the same in every block: peers store into the staging buffers by offset.
struct StackPlan {
  int L = 0, blocks = 0;
  int units[kMaxStack] = {};
  int first[kMaxStack + 1] = {};
  int64_t stage_off = 0, stage_elems = 0, part_off = 0, smem = 0;
  double step_ns = 0;
};

// Fills blocks, first and the shared-memory layout of p (L and units set) for batch B, hidden
// size H, G gates and elem-byte elements.
inline void stack_geometry(StackPlan& p, int64_t B, int H, int G, int elem) {
  int64_t rows = 0, seg_rows = 0;  // the most W rows a block holds, and a segment's
  p.first[0] = 0;
  for (int l = 0; l < p.L; ++l) {
    p.first[l + 1] = p.first[l] + (H + p.units[l] - 1) / p.units[l];
    const int64_t r = int64_t(G) * p.units[l];
    seg_rows = r > seg_rows ? r : seg_rows;
    rows = (l == 0 ? 1 : 2) * r > rows ? (l == 0 ? 1 : 2) * r : rows;
  }
  p.blocks = p.first[p.L];
  p.stage_off = align16(rows * H * elem);
  p.stage_elems = align16(int64_t(p.L) * B * H * elem) / elem;
  p.part_off = p.stage_off + 2 * p.stage_elems * elem;
  const int64_t partials = B * seg_rows > kPartMin ? B * seg_rows : kPartMin;  // a segment's (smem_layout)
  p.smem = p.part_off + 2 * 4 * partials;
}

template <typename scalar_t>
struct StackArgs {
  const scalar_t* x;                  // (T B, G H) layer 0's input projections
  const scalar_t* w_ih[kMaxStack];    // (G H, H) layer l's W_ih, l >= 1 ([0] unused)
  const scalar_t* w_hh[kMaxStack];    // (G H, H)
  const scalar_t* b_ih[kMaxStack];    // (G H) each, or null (then b_hh[l] is null too)
  const scalar_t* b_hh[kMaxStack];
  const scalar_t* h0;                 // (L, B, H)
  const scalar_t* c0;                 // (L, B, H), LSTM
  scalar_t* out;                      // (T B, H) the last layer's h of every step
  scalar_t* hn;                       // (L, B, H) every layer's h after step T - 1
  scalar_t* cn;                       // (L, B, H) LSTM: every layer's c as it goes, c_n at the end
  int64_t T, B;
  int H;
  bool relu;
  StackPlan plan;
};

// What the cell of (layer l, batch row b, unit j) at step t reads besides the products: layer
// 0's input projections, the biases, the c it enters with (LSTM; this thread wrote it at the
// layer's previous step).  Loaded for a thread's first cell before the products.
template <Kind C>
struct StackIn {
  float x[kGates<C>], b_ih[kGates<C>], b_hh[kGates<C>], cx;
};

template <typename T, Kind C>
__device__ __forceinline__ StackIn<C> stack_inputs(const StackArgs<T>& p, int l, int64_t t, int64_t b, int j) {
  constexpr int G = kGates<C>;
  const int64_t H = p.H;
  StackIn<C> in;
  const T* x = p.x + (t * p.B + b) * G * H + j;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    in.x[g] = l == 0 ? static_cast<float>(x[g * H]) : 0.0f;
    in.b_ih[g] = p.b_ih[l] != nullptr ? static_cast<float>(p.b_ih[l][g * H + j]) : 0.0f;
    in.b_hh[g] = p.b_hh[l] != nullptr ? static_cast<float>(p.b_hh[l][g * H + j]) : 0.0f;
  }
  in.cx = 0.0f;
  if constexpr (C == Kind::kLstm) {
    const int64_t s = (int64_t(l) * p.B + b) * H + j;
    in.cx = static_cast<float>(t == 0 ? p.c0[s] : p.cn[s]);
  }
  return in;
}

template <typename T, Kind C>
__global__ void __launch_bounds__(kPThreads, 1) stack_forward_kernel(const StackArgs<T> p) {
  constexpr int G = kGates<C>;
  CONVRNN_PERSISTENT_SMEM(smem);
  const StackPlan& pl = p.plan;
  int l = 0;
  while (int(blockIdx.x) >= pl.first[l + 1]) ++l;
  const int H = p.H, L = pl.L, u0 = (int(blockIdx.x) - pl.first[l]) * pl.units[l], U = min(pl.units[l], H - u0);
  const int R = G * U, segs = l == 0 ? 1 : 2, nc = static_cast<int>(p.B);
  const int64_t BH = p.B * H;
  T* w_s = reinterpret_cast<T*>(smem);  // segment q, row g U + u: (q < segs - 1 ? W_ih : W_hh) row g H + u0 + u
  T* const stages = reinterpret_cast<T*>(smem + pl.stage_off);
  float* const part = reinterpret_cast<float*>(smem + pl.part_off);
  for (int q = 0; q < segs; ++q) stage_gate_rows(w_s + q * R * H, q == segs - 1 ? p.w_hh[l] : p.w_ih[l], G, U, u0, H);
  // Layer m first reads its h0 at step m, from buffer m % 2; no block stores into that slot of
  // that buffer before step m + 1 (layer m's stores at step s go to buffer (s + 1) % 2).
  for (int64_t i = threadIdx.x; i < L * BH; i += kPThreads) stages[((i / BH) & 1) * pl.stage_elems + i] = p.h0[i];
  // every block of the cluster runs, its W slice and h0 slots in place, before any peer's stores
  cluster_sync();
  const int targets0 = pl.first[l], targets1 = pl.first[min(l + 2, L)];  // the blocks that read this layer's h
  const int ks = k_splits(R, nc);
  float* const part_x = part;  // segment 0's partial sums (layers >= 1: W_ih h_{l-1})
  float* const part_h = segs == 2 ? part + int64_t(ks) * nc * R : part;
  const int64_t steps = p.T + L - 1;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = s - l;
    if (t >= 0 && t < p.T) {
      const T* const cur = stages + (s & 1) * pl.stage_elems;
      T* const nxt = stages + ((s + 1) & 1) * pl.stage_elems;
      StackIn<C> first;
      if (int(threadIdx.x) < nc * U) {
        const int bl = threadIdx.x / U;
        first = stack_inputs<T, C>(p, l, t, bl, u0 + int(threadIdx.x) - bl * U);
      }
      if (segs == 2) tile_products(cur + (l - 1) * BH, nc, w_s, R, H, ks, part_x);
      tile_products(cur + l * BH, nc, w_s + (segs - 1) * R * H, R, H, ks, part_h);
      __syncthreads();
      const bool publish_h = t + 1 < p.T || l + 1 < L;  // someone reads h_l(t) at step s + 1
      for (int e = threadIdx.x; e < nc * U; e += kPThreads) {
        const int bl = e / U, u = e - bl * U, j = u0 + u;
        const StackIn<C> in = e == int(threadIdx.x) ? first : stack_inputs<T, C>(p, l, t, bl, j);
        float gx[G], gh[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          gx[g] = (segs == 2 ? partial_sum(part_x, ks, nc, R, bl, g * U + u) : in.x[g]) + in.b_ih[g];
          gh[g] = partial_sum(part_h, ks, nc, R, bl, g * U + u) + in.b_hh[g];
        }
        const int64_t sidx = int64_t(l) * BH + bl * H + j;
        float h;
        if constexpr (C == Kind::kLstm) {
          const LstmGates<float> a = lstm_gates(gx[0] + gh[0], gx[1] + gh[1], gx[2] + gh[2], gx[3] + gh[3]);
          float c;
          lstm_update(a, in.cx, h, c);
          p.cn[sidx] = static_cast<T>(c);
        } else if constexpr (C == Kind::kGru) {
          float r, z, n;
          gru_forward(gx[0], gx[1], gx[2], gh[0], gh[1], gh[2], static_cast<float>(cur[sidx]), r, z, n, h);
        } else {
          h = rnn_activation(gx[0] + gh[0], p.relu);
        }
        const T hv = static_cast<T>(h);
        if (l == L - 1) p.out[(t * p.B + bl) * H + j] = hv;
        if (t == p.T - 1) p.hn[sidx] = hv;
        if (publish_h) {
          for (int r = targets0; r < targets1; ++r) cluster_peer(nxt, r)[sidx] = hv;
        }
      }
    }
    if (s + 1 < steps) cluster_sync();  // every h of step s stored into its readers' buffers
  }
}

// Modelled nanoseconds of one wavefront step (the one-layer model's terms, step_ns above): the
// cluster barrier, each cell's stores into the blocks that read it (the slowest layer's), and
// the block with the most products.
inline double stack_step_ns(const StackPlan& p, int64_t B, int H, int G) {
  double products = 0, stores = 0;
  for (int l = 0; l < p.L; ++l) {
    const double tiles = (l == 0 ? 1 : 2) * std::ceil(G * p.units[l] / double(kTR)) * std::ceil(double(B) / kTB);
    products = std::max(products, tiles * (std::ceil(H / 32.0) * (kTR + kTB) + 32.0) / 1.7);
    const int targets = p.first[std::min(l + 2, p.L)] - p.first[l];
    const double rounds = std::ceil(double(p.units[l]) * double(B) / kPThreads);
    stores = std::max(stores, targets * rounds);
  }
  return 300.0 + 200.0 + 13.0 * stores + products;
}

// The stacked plans that fit (at most max_blocks blocks, smem_optin bytes a block), fastest
// modelled first: units[0] any power of two (or H), later layers units[0] or half of it (their
// blocks hold two segments, so half the units balances the products).
inline std::vector<StackPlan> stack_candidates(int L, int64_t B, int H, int G, int elem, int64_t smem_optin,
                                               int max_blocks) {
  std::vector<StackPlan> plans;
  if (L < 2 || L > kMaxStack) return plans;
  for (int units = 1;; units = units * 2 > H ? H : units * 2) {
    for (int half = 0; half < 2; ++half) {
      if (half == 1 && units == 1) continue;
      StackPlan p;
      p.L = L;
      p.units[0] = units;
      for (int l = 1; l < L; ++l) p.units[l] = half ? (units + 1) / 2 : units;
      stack_geometry(p, B, H, G, elem);
      if (p.blocks > max_blocks || p.smem > smem_optin) continue;
      p.step_ns = stack_step_ns(p, B, H, G);
      plans.push_back(p);
    }
    if (units >= H) break;
  }
  std::stable_sort(plans.begin(), plans.end(),
                   [](const StackPlan& a, const StackPlan& b) { return a.step_ns < b.step_ns; });
  return plans;
}


}  // namespace persistent
}  // namespace convrnn
