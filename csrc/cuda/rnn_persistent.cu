// Persistent recurrence: every step of one layer and direction of an LSTM, GRU or vanilla RNN
// in ONE cooperative kernel, forward and backward (opt-in: csrc/rnn_persistent.h).
//
// What it computes: the recurrent part of rnn_layers.cpp's lstm_layer / gru_layer / rnn_layer
// and of their backward ops: the same inputs, the same saved tensors (so either backward runs
// after either forward), the gate formulas of rnn_cells.h.  The input projections (one GEMM
// before the forward) and the weight gradients (one GEMM after the backward) stay cuBLAS's.
//
//   forward,  step k:  gates = x_proj[t] + h_prev W_hh^T (+ biases); cell; out[t] (cs[t], ws[t])
//   backward, step k:  dh = g[step after] W_hh (+ the cell's direct term); cell backward; g[t]
//
// How the work is split:
//  - block i owns hidden units [i U, i U + U) (the last block may own fewer) and stages, once
//    for all steps, the W_hh entries those units need in shared memory:
//      forward:  the G gate rows of each unit: G U rows of H          (gates[b][g H + u])
//      backward: the column of each unit: U rows of G H (W_hh^T rows)  (dh[b][u])
//  - per step every block stages the step's whole left operand (the h rows the step reads, or
//    the gate gradients of the step processed before) from L2 into shared memory, a chunk of
//    batch rows at a time; computes its outputs' dot products (below); applies the cell to its
//    own units and writes them; then one grid-wide barrier (cooperative groups) ends the step.
//    Data written by other blocks earlier in the kernel is read with ld.global.cg (L2, never a
//    stale L1 line); every row of out/cs/g is written once, so no step overwrites what another
//    block may still be reading.
//  - dot products: a warp takes a tile of kTR W rows x kTB batch rows and a range of k; lane l
//    takes k = l, l + 32, ... (consecutive lanes read consecutive shared-memory words: no bank
//    conflicts) and a butterfly reduce-scatter leaves the tile's 32 sums one per lane.  Where
//    the tiles are fewer than the warps, k is split into ranges whose sums are added afterwards
//    in a fixed order.  Every sum has a fixed order: results are deterministic.
//  - the grid: the host picks U among powers of two by a per-step time model (barrier, L2
//    staging, products) among the sizes whose slices fit in shared memory and whose grid is
//    co-resident (occupancy query); none fits: it declines and rnn_layers.cpp runs its loop.
//
// Sections: device helpers / forward kernel / backward kernel / host: plan and launch.
#include <cooperative_groups.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda/launch.cuh"
#include "rnn_cells.h"
#include "rnn_persistent.h"

namespace convrnn {
namespace {

namespace cg = cooperative_groups;
using at::Tensor;

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
// (chunk x K), the partial sums.  The partials hold ks * nc * rows floats: nc * rows when k is
// not split, else at most 32 * kWarps (ks * tiles <= kWarps, a tile covers 32 (b, r) pairs).
struct SmemLayout {
  int64_t stage, part, total;
};

CONVRNN_HD int64_t align16(int64_t n) {
  return (n + 15) / 16 * 16;
}

CONVRNN_HD SmemLayout smem_layout(int rows, int K, int chunk, int elem) {
  SmemLayout s;
  s.stage = align16(int64_t(rows) * K * elem);
  s.part = s.stage + align16(int64_t(chunk) * K * elem);
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

// part[(q * nc + b) * rows + r] = sum over k in range q of A[b][k] * W[r][k], for b < nc,
// r < rows, q < ks; A (nc x K) and W (rows x K) row-major in shared memory.  Tile rows past
// rows or nc repeat the last one (computed, never stored), so the loop has no branches.
template <typename T>
__device__ void tile_products(const T* A, int nc, const T* W, int rows, int K, int ks, float* part) {
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
};

// The cell of unit j for the batch row at `row` of the (N, ...) blocks: gh[g] are the products
// h_prev . W_hh[g H + j]; hx and cx the h (GRU) and c (LSTM) this row enters the step with.
template <typename T, Kind C>
__device__ __forceinline__ void forward_cell(const ForwardArgs<T>& p, const float (&gh)[kGates<C>], int64_t row,
                                             int j, float hx, float cx) {
  constexpr int G = kGates<C>;
  const int64_t H = p.H;
  const T* x = p.x + row * G * H + j;
  const T* bi = p.b_ih != nullptr ? p.b_ih + j : nullptr;
  const T* bh = p.b_hh != nullptr ? p.b_hh + j : nullptr;
  const int64_t e = row * H + j;
  if constexpr (C == Kind::kLstm) {
    float pre[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) {  // as the fused cell kernel: (x + h W) + (b_ih + b_hh)
      pre[g] = static_cast<float>(x[g * H]) + gh[g];
      if (bi != nullptr) pre[g] += static_cast<float>(bi[g * H]) + static_cast<float>(bh[g * H]);
    }
    const LstmGates<float> a = lstm_gates(pre[0], pre[1], pre[2], pre[3]);
    float h, c;
    lstm_update(a, cx, h, c);
    p.out[e] = static_cast<T>(h);
    p.cs[e] = static_cast<T>(c);
    if (p.ws != nullptr) {
      T* w = p.ws + row * 4 * H + j;
      w[0] = static_cast<T>(a.i);
      w[H] = static_cast<T>(a.f);
      w[2 * H] = static_cast<T>(a.g);
      w[3 * H] = static_cast<T>(a.o);
    }
  } else if constexpr (C == Kind::kGru) {
    float xb[3], hb[3];
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      xb[g] = static_cast<float>(x[g * H]) + (bi != nullptr ? static_cast<float>(bi[g * H]) : 0.0f);
      hb[g] = gh[g] + (bh != nullptr ? static_cast<float>(bh[g * H]) : 0.0f);
    }
    float r, z, n, h;
    gru_forward(xb[0], xb[1], xb[2], hb[0], hb[1], hb[2], hx, r, z, n, h);
    p.out[e] = static_cast<T>(h);
    if (p.ws != nullptr) {
      T* w = p.ws + row * 4 * H + j;
      w[0] = static_cast<T>(r);
      w[H] = static_cast<T>(z);
      w[2 * H] = static_cast<T>(n);
      w[3 * H] = static_cast<T>(hb[2]);
    }
  } else {
    float pre = static_cast<float>(x[0]) + gh[0];
    if (bi != nullptr) pre += static_cast<float>(bi[0]) + static_cast<float>(bh[0]);
    p.out[e] = static_cast<T>(rnn_activation(pre, p.relu));
  }
}

template <typename T, Kind C>
__global__ void __launch_bounds__(kPThreads, 2) forward_kernel(const ForwardArgs<T> p) {
  constexpr int G = kGates<C>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int H = p.H, u0 = blockIdx.x * p.units, U = min(p.units, H - u0), rows = G * U;
  const SmemLayout lay = smem_layout(G * p.units, H, p.chunk, sizeof(T));
  T* w_s = reinterpret_cast<T*>(smem);  // row g U + u = W_hh row g H + u0 + u
  T* stage = reinterpret_cast<T*>(smem + lay.stage);
  float* part = reinterpret_cast<float*>(smem + lay.part);
  copy_batched<T>(
      rows * H,
      [&](int i) {
        const int r = i / H, g = r / U;
        return p.w[int64_t(g * H + u0 + r - g * U) * H + (i - r * H)];
      },
      [&](int i, T v) { w_s[i] = v; });
  cg::grid_group grid = cg::this_grid();
  StepRows prev{0, 0};
  for (int64_t k = 0; k < p.T; ++k) {
    const StepRows cur = step_rows(p.steps, p.T, p.B, p.reverse ? p.T - 1 - k : k);
    const int64_t np = k > 0 ? prev.n : 0;  // rows [0, np) enter from the previous step, the rest from h0
    for (int64_t c0 = 0; c0 < cur.n; c0 += p.chunk) {
      const int nc = static_cast<int>(min(int64_t(p.chunk), cur.n - c0));
      const int64_t split = max(c0, min(np, c0 + nc));
      if (split > c0) stage_rows(stage, p.out + (prev.off + c0) * H, int(split - c0) * H, p.vec);
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
        float cx = 0.0f;  // the LSTM's entering c: this block wrote it at the previous step
        if constexpr (C == Kind::kLstm) {
          cx = static_cast<float>(b < np ? load_cg(p.cs + (prev.off + b) * H + j) : p.c0[b * H + j]);
        }
        forward_cell<T, C>(p, gh, cur.off + b, j, static_cast<float>(stage[bl * H + j]), cx);
      }
      __syncthreads();  // the next chunk overwrites stage (the GRU's cells read it) and part
    }
    prev = cur;
    if (k + 1 < p.T) grid.sync();  // every block's h (and c) of this step written and visible
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
};

// The cell backward of unit j for batch row b at a step (rows cur; the previous processed
// step's rows prev, of which [0, np) hold this step's entering state).  Reads the carried
// dh (and dc), writes the step's gradient rows, and leaves in dh_acc the cell's direct
// contribution to the entering h's gradient (the GRU's z * ghy; 0 for the others): the next
// step processed adds g W_hh to it.
template <typename T, Kind C>
__device__ __forceinline__ void backward_cell(const BackwardArgs<T>& p, StepRows cur, StepRows prev, int64_t np,
                                              int64_t b, int j) {
  const int64_t H = p.H, row = cur.off + b, e = row * H + j, s = b * H + j;
  const float ghy = p.dh_acc[s] + (p.gout != nullptr ? static_cast<float>(p.gout[e]) : 0.0f);
  if constexpr (C == Kind::kLstm) {
    const T* w = p.ws + row * 4 * H + j;
    const LstmGates<float> a{static_cast<float>(w[0]), static_cast<float>(w[H]), static_cast<float>(w[2 * H]),
                             static_cast<float>(w[3 * H])};
    const float cx = static_cast<float>(b < np ? p.cs[(prev.off + b) * H + j] : p.c0[s]);
    float d[4], gcx;
    lstm_backward(a, cx, static_cast<float>(p.cs[e]), ghy, p.dc_acc[s], d, gcx);
    T* g = p.g_hidden + row * 4 * H + j;
#pragma unroll
    for (int q = 0; q < 4; ++q) g[q * H] = static_cast<T>(d[q]);
    p.dc_acc[s] = gcx;
    p.dh_acc[s] = 0.0f;
  } else if constexpr (C == Kind::kGru) {
    const T* w = p.ws + row * 4 * H + j;
    const float hx = static_cast<float>(b < np ? p.out[(prev.off + b) * H + j] : p.h0[s]);
    float dx[3], dhh[3], ghx;
    gru_backward(static_cast<float>(w[0]), static_cast<float>(w[H]), static_cast<float>(w[2 * H]),
                 static_cast<float>(w[3 * H]), hx, ghy, dx, dhh, ghx);
    T* gi = p.g_input + row * 3 * H + j;
    T* gh = p.g_hidden + row * 3 * H + j;
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      gi[q * H] = static_cast<T>(dx[q]);
      gh[q * H] = static_cast<T>(dhh[q]);
    }
    p.dh_acc[s] = ghx;
  } else {
    p.g_hidden[e] = static_cast<T>(rnn_activation_grad(ghy, static_cast<float>(p.out[e]), p.relu));
    p.dh_acc[s] = 0.0f;
  }
}

template <typename T, Kind C>
__global__ void __launch_bounds__(kPThreads, 2) backward_kernel(const BackwardArgs<T> p) {
  constexpr int G = kGates<C>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int H = p.H, GH = G * H, u0 = blockIdx.x * p.units, U = min(p.units, H - u0);
  const SmemLayout lay = smem_layout(p.units, GH, p.chunk, sizeof(T));
  T* wt_s = reinterpret_cast<T*>(smem);  // row u = column u0 + u of W_hh (G H values)
  T* stage = reinterpret_cast<T*>(smem + lay.stage);
  float* part = reinterpret_cast<float*>(smem + lay.part);
  copy_batched<T>(
      U * GH, [&](int i) { return p.w[int64_t(i / U) * H + u0 + i % U]; },
      [&](int i, T v) { wt_s[(i % U) * GH + i / U] = v; });
  for (int64_t e = threadIdx.x; e < p.B * U; e += kPThreads) {
    const int64_t s = (e / U) * H + u0 + e % U;
    p.dh_acc[s] = static_cast<float>(p.dh[s]);
    if constexpr (C == Kind::kLstm) p.dc_acc[s] = static_cast<float>(p.dc[s]);
  }
  cg::grid_group grid = cg::this_grid();
  // Processed steps k = T-1 .. 0 (the forward's order reversed), then k = -1 for the products of
  // step 0's gradients, which give grad_h0.
  for (int64_t k = p.T - 1; k >= -1; --k) {
    if (k + 1 < p.T) {  // dh_acc[b][own] += g(step k+1)[b] . W_hh[:, own], for the rows active in it
      const StepRows nx = step_rows(p.steps, p.T, p.B, p.reverse ? p.T - 2 - k : k + 1);
      for (int64_t c0 = 0; c0 < nx.n; c0 += p.chunk) {
        const int nc = static_cast<int>(min(int64_t(p.chunk), nx.n - c0));
        stage_rows(stage, p.g_hidden + (nx.off + c0) * GH, nc * GH, p.vec);
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
    const StepRows cur = step_rows(p.steps, p.T, p.B, p.reverse ? p.T - 1 - k : k);
    const StepRows prev = k > 0 ? step_rows(p.steps, p.T, p.B, p.reverse ? p.T - k : k - 1) : StepRows{0, 0};
    const int64_t np = k > 0 ? prev.n : 0;
    for (int64_t e = threadIdx.x; e < cur.n * U; e += kPThreads) {
      backward_cell<T, C>(p, cur, prev, np, e / U, u0 + static_cast<int>(e % U));
    }
    grid.sync();  // every block's g rows of this step written and visible
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < p.B * U; e += kPThreads) {
    const int64_t s = (e / U) * H + u0 + e % U;
    p.dh[s] = static_cast<T>(p.dh_acc[s]);
    if constexpr (C == Kind::kLstm) p.dc[s] = static_cast<T>(p.dc_acc[s]);
  }
}

// ---- host: plan and launch ----

int gates_of(RnnCell c) {
  return c == RnnCell::kLstm ? 4 : (c == RnnCell::kGru ? 3 : 1);
}

struct Plan {
  int units = 0, blocks = 0, chunk = 0;
  int64_t smem = 0;
};

// Modelled nanoseconds of one step on an H100/H200-class GPU; it only ranks the candidates
// (benchmarks/NOTES-rnn-seq.md): the grid barrier (serialised arrivals), every block staging
// the step's B x K operand from L2 (~4 TB/s shared by all), and one block's products (a tile
// costs K/32 x (kTR + kTB) shared-memory wavefronts plus 32 shuffles, ~1 per clock at 1.7 GHz).
double step_ns(int blocks, int rows, int K, int64_t B, int elem) {
  const double tiles = std::ceil(rows / double(kTR)) * std::ceil(B / double(kTB));
  const double barrier = 600.0 + 4.0 * blocks;
  const double staging = 500.0 + double(blocks) * double(B) * K * elem / 4.0;
  const double products = tiles * (std::ceil(K / 32.0) * (kTR + kTB) + 32.0) / 1.7;
  return barrier + staging + products;
}

// Blocks of `kernel` that fit on one SM with `smem` dynamic shared memory (cached: the
// attribute call and the query cost microseconds, and a layer calls this per launch).
int blocks_per_sm(const void* kernel, int device, int64_t smem, int64_t smem_optin) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int64_t>, int> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, smem);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  // Allow the most the device allows once (also what the launch needs, smem <= optin).
  const auto attr_key = std::make_tuple(kernel, device, int64_t(-1));
  if (cache.find(attr_key) == cache.end()) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_optin)));
    cache[attr_key] = 0;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kPThreads, static_cast<size_t>(smem)));
  cache[key] = n;
  return n;
}

// The grid: units per block among powers of two (and H itself), by step_ns, among the ones
// whose shared memory fits (the batch staged in chunks of 8-row multiples) and whose grid is
// co-resident.  rows_per_unit: G (forward: the gate rows of a unit) or 1 (backward: its column);
// K: the length of those rows (H, or G H).  blocks == 0: none fits.
Plan choose_plan(const void* kernel, int device, int rows_per_unit, int K, int64_t B, int H, int elem) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  const int64_t optin = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  std::vector<std::pair<double, Plan>> candidates;
  for (int units = 1;; units = units < H && units * 2 > H ? H : units * 2) {
    Plan p;
    p.units = units;
    p.blocks = (H + units - 1) / units;
    const int rows = rows_per_unit * units;
    int chunk = B < kTB ? static_cast<int>(B) : static_cast<int>(std::min<int64_t>((B + kTB - 1) / kTB * kTB, 1 << 16));
    while (chunk > kTB && smem_layout(rows, K, chunk, elem).total > optin) chunk -= kTB;
    p.chunk = chunk;
    p.smem = smem_layout(rows, K, chunk, elem).total;
    if (p.smem <= optin) candidates.emplace_back(step_ns(p.blocks, rows, K, B, elem), p);
    if (units >= H) break;
  }
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& c : candidates) {
    const int per_sm = blocks_per_sm(kernel, device, c.second.smem, optin);
    if (int64_t(per_sm) * prop->multiProcessorCount >= c.second.blocks) return c.second;
  }
  return Plan{};
}

// batch_sizes then offsets as an int64 device tensor (packed input), or undefined.
Tensor upload_steps(const PersistentLayer& l, const at::Device& device) {
  if (l.bs == nullptr) return Tensor();
  Tensor host = at::empty({2 * l.T}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.mutable_data_ptr<int64_t>();
  std::copy(l.bs->begin(), l.bs->end(), h);
  std::copy(l.off->begin(), l.off->end(), h + l.T);
  return host.to(device, /*non_blocking=*/true);
}

template <typename T>
const T* ptr_of(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_ptr_of(Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// What every launch needs: a layer with steps, a dtype we instantiate, int-sized dims and a
// device that launches cooperative kernels.
bool served(const PersistentLayer& l, const Tensor& x) {
  const auto st = x.scalar_type();
  if (!x.is_cuda() || l.T < 1 || l.B < 1 || l.H < 1) return false;
  if (st != at::kFloat && st != at::kHalf && st != at::kBFloat16) return false;
  if (int64_t(gates_of(l.cell)) * l.H * 4 > std::numeric_limits<int>::max()) return false;
  return at::cuda::getDeviceProperties(x.get_device())->cooperativeLaunch != 0;
}

// Calls f(T*{}, integral_constant<Kind>{}) for the dtype and cell (dtypes: `served` checked).
template <typename F>
void dispatch(at::ScalarType st, RnnCell cell, F&& f) {
  auto by_cell = [&](auto tag) {
    switch (cell) {
      case RnnCell::kLstm: f(tag, std::integral_constant<Kind, Kind::kLstm>{}); break;
      case RnnCell::kGru: f(tag, std::integral_constant<Kind, Kind::kGru>{}); break;
      default: f(tag, std::integral_constant<Kind, Kind::kRnn>{}); break;
    }
  };
  if (st == at::kFloat) {
    by_cell(static_cast<float*>(nullptr));
  } else if (st == at::kHalf) {
    by_cell(static_cast<c10::Half*>(nullptr));
  } else {
    by_cell(static_cast<c10::BFloat16*>(nullptr));
  }
}

template <typename Args>
void launch(const void* kernel, const Plan& plan, Args& args, cudaStream_t stream) {
  void* params[] = {&args};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kPThreads), params,
                                             static_cast<size_t>(plan.smem), stream));
  note_persistent_launch();
}

}  // namespace

bool persistent_forward(const PersistentLayer& l, const Tensor& x, Tensor& out, Tensor& cs, Tensor& ws) {
  if (!served(l, x)) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device(), H = static_cast<int>(l.H), G = gates_of(l.cell);
  const Tensor w = l.w_hh.contiguous();
  const Tensor bi = l.b_ih.has_value() ? l.b_ih->contiguous() : Tensor();
  const Tensor bh = l.b_hh.has_value() ? l.b_hh->contiguous() : Tensor();
  bool launched = false;
  dispatch(x.scalar_type(), l.cell, [&](auto tag, auto cell) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr Kind C = decltype(cell)::value;
    const void* kernel = reinterpret_cast<const void*>(&forward_kernel<T, C>);
    const Plan plan = choose_plan(kernel, device, G, H, l.B, H, sizeof(T));
    if (plan.blocks == 0) return;
    const Tensor steps = upload_steps(l, x.device());
    ForwardArgs<T> a{};
    a.x = x.const_data_ptr<T>();
    a.w = w.const_data_ptr<T>();
    a.b_ih = ptr_of<T>(bi);
    a.b_hh = ptr_of<T>(bh);
    a.h0 = l.h0.const_data_ptr<T>();
    a.c0 = ptr_of<T>(l.c0);
    a.out = out.mutable_data_ptr<T>();
    a.cs = mutable_ptr_of<T>(cs);
    a.ws = mutable_ptr_of<T>(ws);
    a.steps = steps.defined() ? steps.const_data_ptr<int64_t>() : nullptr;
    a.T = l.T;
    a.B = l.B;
    a.H = H;
    a.units = plan.units;
    a.chunk = plan.chunk;
    a.reverse = l.reverse;
    a.relu = l.cell == RnnCell::kRelu;
    a.vec = (int64_t(H) * sizeof(T)) % 16 == 0 && aligned16(a.out) && aligned16(a.h0);
    launch(kernel, plan, a, at::cuda::getCurrentCUDAStream());
    launched = true;
  });
  return launched;
}

bool persistent_backward(const PersistentLayer& l, const Tensor& grad_out, const Tensor& out, const Tensor& cs,
                         const Tensor& ws, Tensor& dh, Tensor& dc, Tensor& g_hidden, Tensor& g_input) {
  if (!served(l, out)) return false;
  const c10::cuda::CUDAGuard guard(out.device());
  const int device = out.get_device(), H = static_cast<int>(l.H), G = gates_of(l.cell);
  const Tensor w = l.w_hh.contiguous();
  bool launched = false;
  dispatch(out.scalar_type(), l.cell, [&](auto tag, auto cell) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr Kind C = decltype(cell)::value;
    const void* kernel = reinterpret_cast<const void*>(&backward_kernel<T, C>);
    const Plan plan = choose_plan(kernel, device, 1, G * H, l.B, H, sizeof(T));
    if (plan.blocks == 0) return;
    const Tensor steps = upload_steps(l, out.device());
    Tensor acc = at::empty({C == Kind::kLstm ? 2 : 1, l.B, l.H}, out.options().dtype(at::kFloat));
    BackwardArgs<T> a{};
    a.w = w.const_data_ptr<T>();
    a.gout = ptr_of<T>(grad_out);
    a.out = out.const_data_ptr<T>();
    a.cs = ptr_of<T>(cs);
    a.ws = ptr_of<T>(ws);
    a.h0 = l.h0.const_data_ptr<T>();
    a.c0 = ptr_of<T>(l.c0);
    a.dh = dh.mutable_data_ptr<T>();
    a.dc = mutable_ptr_of<T>(dc);
    a.g_hidden = g_hidden.mutable_data_ptr<T>();
    a.g_input = mutable_ptr_of<T>(g_input);
    a.dh_acc = acc.mutable_data_ptr<float>();
    a.dc_acc = C == Kind::kLstm ? a.dh_acc + l.B * l.H : nullptr;
    a.steps = steps.defined() ? steps.const_data_ptr<int64_t>() : nullptr;
    a.T = l.T;
    a.B = l.B;
    a.H = H;
    a.units = plan.units;
    a.chunk = plan.chunk;
    a.reverse = l.reverse;
    a.relu = l.cell == RnnCell::kRelu;
    a.vec = (int64_t(G) * H * sizeof(T)) % 16 == 0 && aligned16(a.g_hidden);
    launch(kernel, plan, a, at::cuda::getCurrentCUDAStream());
    launched = true;
  });
  return launched;
}

}  // namespace convrnn
