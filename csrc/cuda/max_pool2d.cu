// CUDA max_pool2d forward and backward.
//
// Everything here moves memory; the arithmetic that matters is index arithmetic, so
// 32-bit indices where sizes allow, and linear indices split by precomputed divisors
// (PosDividers: a multiply-high, no divide instruction) rather than by `/` and `%`.
//
// Forward: each thread computes outputs in the output's memory order (NCHW: ow fastest;
// channels_last: c fastest), a block taking kThreads*V consecutive outputs and thread i its
// outputs i, i + kThreads, ... so that neighbouring threads load neighbouring inputs.
// Each output writes its value, torch's int64 index when asked, and the tap-number argmax
// the backward reads when autograd needs it.
//  - 2x2 and 3x3 windows (forward_unrolled_kernel): V = 4 or 2 outputs a thread, whose
//    windows are all loaded (load_window, out-of-image taps as -inf) before any is scanned
//    (max_loaded_window), so 16-18 loads a thread are in flight: enough bytes in flight to
//    reach memory bandwidth, where one scalar load at a time is latency bound;
//  - NCHW 3x3 windows with column stride 2: forward_pair_kernel, two outputs of a row a
//    thread sharing their middle column; or, for 2-byte types with W % 8 == 0 and no argmax
//    (where it measured faster; CONVRNN_MAXPOOL_R3=0 turns it off), round 3's
//    forward_quad_kernel: four outputs a thread from 16-byte row pieces;
//  - round 4 (CONVRNN_MAXPOOL_R4=0 turns it off): NCHW 2x2/2 windows all inside the image with
//    W % 8 == 0, forward_row4_kernel, four outputs of a row an item from 16-byte row pieces; and
//    channels_last 2x2 / 3x3 with C % 4 == 0, 4 channels an item in forward_unrolled_kernel;
//  - round 5 (CONVRNN_MAXPOOL_R5=0 turns it off, =2 keeps only its values-only form): in the
//    2-byte types, channels_last 2x2 / 3x3 with C % 8 == 0, 8 channels an item (16-byte loads);
//    and the values-only forms of the unrolled, pair and row4 kernels (no indices or argmax to
//    write: maxima by a NaN-propagating max instruction, the scan only where the result is NaN
//    or a zero); and
//    4 channels a backward cell in channels_last where the reach (below) is at most 1;
//  - other windows (forward_kernel): one output a thread, scanned by max_window (the CPU
//    kernels' function).
// Backward, deterministic and without atomics, from the saved argmax (1 byte per output;
// the input is not read), every grad_input element written exactly once (no memset):
//  - windows reaching at most 2 outputs back (R = cell_reach <= 2: non-overlapping windows
//    such as 2x2/2, and 3x3/2, 3x3/1), backward_cells_kernel: one thread per cell of
//    sh x sw input positions loads the (R+1)^2 outputs whose windows can cover the cell
//    and writes the cell's gradients (cell_grads): the gradient at each position that is
//    an argmax, summed in a fixed order where windows overlap, 0 elsewhere (positions
//    that no window covers included);
//  - otherwise (gather_kernel) one thread per input element gathers grad_output over the
//    outputs whose windows cover it and whose argmax is this element, in the same fixed
//    order (torch's scheme; gather_grad).
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "cuda/max_pool2d_items.cuh"
#include "cuda/pool_dims.cuh"
#include "max_pool2d.h"
#include "switches.h"

namespace convrnn {
namespace {

using at::Tensor;

constexpr int kMaxItems = 4;  // outputs per thread, at most (the index type's headroom)

// Output items per thread of forward_unrolled_kernel (an item: L channels): about 16 loads in
// flight per thread; 3x3 with L = 2 takes 1 item (9 loads of 2 channels: as many bytes in
// flight as 2 items of 1, and no spill: 2 items of 2 spill at 32-bit indices on sm_90).
// 2x2 with 8-byte taps (f32 with L = 2) takes 2 items (8 loads of 8 bytes; 4 spill on sm_90).
constexpr int forward_items(int kh, int kw, int L = 1, int elem_size = 4) {
  return kh * kw <= 4 ? (L * elem_size > 4 ? 2 : 4) : (L == 1 ? 2 : 1);
}

// Pairs per thread of forward_pair_kernel: 2x2: 2 pairs (2 x 2 rows of 4 columns: 4
// 4-wide loads, or 16 scalar ones); 3x3: 1 pair (3 rows of 5 columns, 15 loads).
constexpr int forward_pair_items(int kw) {
  return kw == 2 ? 2 : 1;
}

template <bool CL, typename T, typename index_t, typename tap_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t* __restrict__ indices,
                   tap_t* __restrict__ taps, PoolDims<index_t> d, PosDividers<index_t> out_div, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    const Pos<index_t> p = decompose<CL>(e, out_div);
    const index_t hstart = p.row * d.sh - d.ph, wstart = p.col * d.sw - d.pw;
    const Taps th = window_taps<index_t>(hstart, d.H, d.kh, d.dh), tw = window_taps<index_t>(wstart, d.W, d.kw, d.dw);
    acc_t<T> best;
    index_t tap;
    max_window<T, index_t>(x + plane_offset<CL>(p.n, p.c, d.C, d.H, d.W), d.W, plane_stride<CL>(d.C), hstart, wstart,
                           th, tw, d.kw, d.dh, d.dw, best, tap);
    y[e] = static_cast<T>(best);
    if (indices != nullptr) indices[e] = tap_index<index_t>(tap, hstart, wstart, d.kw, d.dh, d.dw, d.W);
    if (taps != nullptr) taps[e] = has_taps(th, tw) ? static_cast<tap_t>(tap) : no_tap<tap_t>();
  }
}

// forward_kernel for a KH x KW window (d.kh == KH, d.kw == KW), V outputs a thread: all
// their taps are loaded first, then scanned.  L > 1 (channels_last, C a multiple of L, x
// aligned to L elements): each output item is L adjacent channels, read a tap at a time by
// one L-wide load and written by one L-wide store (out_div divides by C / L, total counts
// items); every lane computed exactly as alone.  VALUES (round 5: no indices or taps to
// write, the inference forward): each value by max_values_window, the same bits.
template <int KH, int KW, int L, bool CL, bool VALUES, typename T, typename index_t, typename tap_t>
__global__ void __launch_bounds__(kThreads)
    forward_unrolled_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t* __restrict__ indices,
                            tap_t* __restrict__ taps, PoolDims<index_t> d, PosDividers<index_t> out_div,
                            index_t total) {
  static_assert(L == 1 || CL, "lanes are adjacent channels of channels_last");
  constexpr int V = forward_items(KH, KW, L, static_cast<int>(sizeof(T)));
  const index_t chunk = static_cast<index_t>(kThreads) * V;
  for (index_t base = static_cast<index_t>(blockIdx.x) * chunk; base < total;
       base += static_cast<index_t>(gridDim.x) * chunk) {
    T v[V][L][KH * KW];
    index_t hstart[V], wstart[V], first[V];
    bool any[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const index_t e = base + j * kThreads + static_cast<index_t>(threadIdx.x);
      if (e >= total) continue;
      Pos<index_t> p = decompose<CL>(e, out_div);
      p.c *= L;
      hstart[j] = p.row * d.sh - d.ph;
      wstart[j] = p.col * d.sw - d.pw;
      const Taps th = window_taps<index_t>(hstart[j], d.H, KH, d.dh), tw = window_taps<index_t>(wstart[j], d.W, KW, d.dw);
      first[j] = static_cast<index_t>(th.lo) * KW + static_cast<index_t>(tw.lo);
      any[j] = has_taps(th, tw);
      load_window<KH, KW, L, T, index_t>(x + plane_offset<CL>(p.n, p.c, d.C, d.H, d.W), d.W, plane_stride<CL>(d.C),
                                         hstart[j], wstart[j], th, tw, d.dh, d.dw, v[j]);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const index_t e = base + j * kThreads + static_cast<index_t>(threadIdx.x);
      if (e >= total) continue;
      Lanes<T, L> out;
      Lanes<tap_t, L> out_tap;
#pragma unroll
      for (int l = 0; l < L; ++l) {
        index_t tap;
        out.v[l] = static_cast<T>(window_max<VALUES, KH, KW, T, index_t>(v[j][l], first[j], tap));
        if constexpr (!VALUES) {
          out_tap.v[l] = any[j] ? static_cast<tap_t>(tap) : no_tap<tap_t>();
          if (indices != nullptr) indices[e * L + l] = tap_index<index_t>(tap, hstart[j], wstart[j], KW, d.dh, d.dw, d.W);
        }
      }
      *reinterpret_cast<Lanes<T, L>*>(y + e * L) = out;
      if constexpr (!VALUES) {
        if (taps != nullptr) *reinterpret_cast<Lanes<tap_t, L>*>(taps + e * L) = out_tap;
      }
    }
  }
}

// forward_unrolled_kernel for NCHW windows KH x KW (2x2 or 3x3) with column stride 2 and
// column dilation 1, an item being the two adjacent outputs (oh, 2q) and (oh, 2q + 1) of
// a row (pair_div divides by (C, OH, ceil(OW / 2)), total counts items): the pair shares
// its row's window bounds and index work, loads its KW + 2 columns once
// (load_window_pair), and stores its values and argmax bytes by one 2-wide store when both
// outputs exist and the pair is aligned (OW odd: every other row is not). Each output is
// scanned by max_loaded_window from its own first tap: the same results as alone; VALUES
// (round 5: no indices or taps to write): each value by max_values_window, the same bits.
// (32-bit indices: minimum 4 blocks an SM, which lets ptxas use 64 registers; left to
// itself it picks 48 and spills 4 bytes in the 2x2 kernel. 64-bit indices need ~75.)
template <int KH, int KW, bool VALUES, typename T, typename index_t, typename tap_t>
__global__ void __launch_bounds__(kThreads, sizeof(index_t) == 4 ? 4 : 1)
    forward_pair_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t* __restrict__ indices,
                        tap_t* __restrict__ taps, PoolDims<index_t> d, PosDividers<index_t> pair_div, index_t total) {
  constexpr int V = forward_pair_items(KW);
  const index_t chunk = static_cast<index_t>(kThreads) * V;
  for (index_t base = static_cast<index_t>(blockIdx.x) * chunk; base < total;
       base += static_cast<index_t>(gridDim.x) * chunk) {
    T v[V][2][KH * KW];
    index_t hstart[V], wstart[V], o0[V], first[V][2];
    bool any[V][2], second[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const index_t e = base + j * kThreads + static_cast<index_t>(threadIdx.x);
      if (e >= total) continue;
      const Pos<index_t> p = decompose<false>(e, pair_div);
      const index_t ow = 2 * p.col;
      hstart[j] = p.row * d.sh - d.ph;
      wstart[j] = ow * 2 - d.pw;
      const Taps th = window_taps<index_t>(hstart[j], d.H, KH, d.dh);
#pragma unroll
      for (int l = 0; l < 2; ++l) {
        const Taps tw = window_taps<index_t>(wstart[j] + 2 * l, d.W, KW, index_t(1));
        first[j][l] = static_cast<index_t>(th.lo) * KW + static_cast<index_t>(tw.lo);
        any[j][l] = has_taps(th, tw);
      }
      second[j] = ow + 1 < d.OW;
      o0[j] = ((p.n * d.C + p.c) * d.OH + p.row) * d.OW + ow;
      load_window_pair<KH, KW, T, index_t>(x + plane_offset<false>(p.n, p.c, d.C, d.H, d.W), d.W, hstart[j],
                                           wstart[j], th, d.dh, v[j]);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const index_t e = base + j * kThreads + static_cast<index_t>(threadIdx.x);
      if (e >= total) continue;
      Lanes<T, 2> out;
      Lanes<tap_t, 2> out_tap;
#pragma unroll
      for (int l = 0; l < 2; ++l) {
        index_t tap;
        out.v[l] = static_cast<T>(window_max<VALUES, KH, KW, T, index_t>(v[j][l], first[j][l], tap));
        if constexpr (!VALUES) {
          out_tap.v[l] = any[j][l] ? static_cast<tap_t>(tap) : no_tap<tap_t>();
          if (indices != nullptr && (l == 0 || second[j])) {
            indices[o0[j] + l] = tap_index<index_t>(tap, hstart[j], wstart[j] + 2 * l, KW, d.dh, index_t(1), d.W);
          }
        }
      }
      if (second[j] && o0[j] % 2 == 0) {
        *reinterpret_cast<Lanes<T, 2>*>(y + o0[j]) = out;
        if constexpr (!VALUES) {
          if (taps != nullptr) *reinterpret_cast<Lanes<tap_t, 2>*>(taps + o0[j]) = out_tap;
        }
      } else {
        y[o0[j]] = out.v[0];
        if (second[j]) y[o0[j] + 1] = out.v[1];
        if constexpr (!VALUES) {
          if (taps != nullptr) {
            taps[o0[j]] = out_tap.v[0];
            if (second[j]) taps[o0[j] + 1] = out_tap.v[1];
          }
        }
      }
    }
  }
}

// Round 3's NCHW forward for 3x3 windows with column stride 2 and column dilation 1 (any row
// geometry, padding, ceil_mode, OW), values only (no argmax, no indices: the inference
// forward): an item is the four outputs (oh, 4q .. 4q + 3) of a row (quad_div divides by
// (C, OH, ceil(OW / 4)), total counts items).  The item loads its 9 columns of each of the 3
// rows once (load_rows_quad: V-wide pieces where the row allows; 2 loads a row for the stem in
// half types), against the pair kernel's 15 scalar loads for 2 outputs, spends the index work
// and window bounds once for four outputs, and takes the values from max_values_quad (26
// one-instruction maxima for four outputs, fixed up by the scan where a result is NaN or zero).
// Stores: one 4-wide store when vec_store (OW % 4 == 0 and y aligned: every item then holds 4
// outputs at a multiple of 4), else scalar ones; the branch is uniform.  Bit-identical to the
// pair and unrolled kernels.  The launcher takes it only where it measured faster (below);
// its per-element code, and the argmax variant measured slower, are checked on the CPU by
// tests/native/max_pool2d_items_check.cpp.  (Registers, sm_90, half types: 40-47.)
template <int V, typename T, typename index_t>
__global__ void __launch_bounds__(kThreads)
    forward_quad_kernel(const T* __restrict__ x, T* __restrict__ y, PoolDims<index_t> d,
                        PosDividers<index_t> quad_div, index_t total, bool vec_store) {
  const unsigned x_mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(x) / sizeof(T));
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    T r[3][kQuadCols];
    const QuadItem<index_t> q = load_quad_item<V>(x, x_mis, d, quad_div, e, r);
    acc_t<T> best[4];
    max_values_quad<3, T>(r, best);
    Lanes<T, 4> out;
#pragma unroll
    for (int l = 0; l < 4; ++l) out.v[l] = static_cast<T>(best[l]);
    if (vec_store) {
      *reinterpret_cast<Lanes<T, 4>*>(y + q.o0) = out;
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        if (l < q.count) y[q.o0 + l] = out.v[l];
      }
    }
  }
}

// Round 4's NCHW forward for 2x2 windows with stride 2, no padding, dilation 1, every window
// inside the image and W % 8 == 0 (VGG's 2x2/2 pools): an item is the four outputs
// (oh, 4q .. 4q + 3) of a row, read by load_row4_item as 16-byte row pieces (2 rows of 8
// columns), V items a thread, all loaded before any is scanned; each output is scanned by
// max_loaded_window (the unrolled kernel's scan: the same values, argmax and indices), or by
// max_values_window with VALUES (round 5: nothing but values to write; the same bits), and
// the four values (and argmax bytes) stored by one vector store each (OW % 4 == 0, y and
// taps aligned: the launcher checks).
template <int V, bool VALUES, typename T, typename index_t, typename tap_t>
__global__ void __launch_bounds__(kThreads)
    forward_row4_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t* __restrict__ indices,
                        tap_t* __restrict__ taps, PoolDims<index_t> d, PosDividers<index_t> row4_div, index_t total) {
  const index_t chunk = static_cast<index_t>(kThreads) * V;
  for (index_t base = static_cast<index_t>(blockIdx.x) * chunk; base < total;
       base += static_cast<index_t>(gridDim.x) * chunk) {
    T r[V][2][kRow4Cols];
    index_t o0[V], hstart[V], wstart[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const index_t e = base + j * kThreads + static_cast<index_t>(threadIdx.x);
      if (e < total) o0[j] = load_row4_item<T, index_t>(x, d, row4_div, e, hstart[j], wstart[j], r[j]);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const index_t e = base + j * kThreads + static_cast<index_t>(threadIdx.x);
      if (e >= total) continue;
      Lanes<T, 4> out;
      Lanes<tap_t, 4> out_tap;
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        T v[4];
        row4_window<T>(r[j], l, v);
        index_t tap;
        out.v[l] = static_cast<T>(window_max<VALUES, 2, 2, T, index_t>(v, index_t(0), tap));
        if constexpr (!VALUES) {
          out_tap.v[l] = static_cast<tap_t>(tap);
          if (indices != nullptr) {
            indices[o0[j] + l] = tap_index<index_t>(tap, hstart[j], wstart[j] + 2 * l, 2, 1, 1, d.W);
          }
        }
      }
      *reinterpret_cast<Lanes<T, 4>*>(y + o0[j]) = out;
      if constexpr (!VALUES) {
        if (taps != nullptr) *reinterpret_cast<Lanes<tap_t, 4>*>(taps + o0[j]) = out_tap;
      }
    }
  }
}

// Items a thread of forward_row4_kernel: 2 (float32: 8 loads of 16 bytes in flight, half types 4).
constexpr int kRow4Items = 2;

// Round 4 (forward_row4_kernel for NCHW 2x2/2, 4-channel items in channels_last) is on unless
// CONVRNN_MAXPOOL_R4=0 (then round 3's kernels run), so that one GPU session can time both.
// Read once.
bool row4_forward_enabled() {
  static const bool on = env_mode("CONVRNN_MAXPOOL_R4", 1) != 0;
  return on;
}

// Round 5: more channels an item in channels_last (the forward_unrolled_kernel of the 2-byte
// types 8, 16-byte loads, half the load instructions and index work of round 4's 4; the backward
// cells 4 where windows reach at most one output back), and the values-only forms of the unrolled,
// pair and row4 kernels (maxima by nan_max where no indices or taps are written).  CONVRNN_MAXPOOL_R5: 1 (default)
// all, 2 the values-only form alone, 0 none (round 4's kernels), so that one GPU session can time
// each.  Read once.
int round5_mode() {
  static const int mode = env_mode("CONVRNN_MAXPOOL_R5", 1);
  return mode;
}
bool round5_lanes_enabled() { return round5_mode() == 1; }
bool values_forward_enabled() { return round5_mode() != 0; }

// Round 3's forward_quad_kernel is on unless CONVRNN_MAXPOOL_R3=0 (then round 2's
// forward_pair_kernel runs), so that one GPU session can time both.  Read once.
bool quad_forward_enabled() {
  static const bool on = env_mode("CONVRNN_MAXPOOL_R3", 1) != 0;
  return on;
}

// One thread per cell of sh x sw input positions (cell_grads); R: the reach of the windows
// in outputs (cell_reach), 0 when windows do not overlap, 1 for 3x3/2.
// L > 1: L adjacent channels a thread (channels_last; cd.cells divides by C / L).
// (R = 1, one channel, 64-bit indices: minimum 3 blocks an SM, up to 85 registers; left to
// itself ptxas picks 64 and spills 12-16 bytes in the NCHW one.)
template <int R, int L, bool CL, typename T, typename index_t, typename tap_t>
__global__ void __launch_bounds__(kThreads, (R == 1 && L == 1 && sizeof(index_t) == 8) ? 3 : 1)
    backward_cells_kernel(const T* __restrict__ go, const tap_t* __restrict__ taps, T* __restrict__ gi,
                          PoolDims<index_t> d, CellDividers<index_t> cd, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    Pos<index_t> c = decompose<CL>(e, cd.cells);
    c.c *= L;
    cell_grads<R, CL, T, index_t, tap_t, L>(go, taps, gi, d, cd, c);
  }
}

// Channels a thread of the forward_unrolled and backward_cells kernels, for 2- and 4-byte
// types in channels_last: the most of `most` (2, 4 or 8; at most 16 bytes), 4 and 2 that
// divides C and whose multi-element accesses the pointers allow (fewer per-element index work
// and load/store instructions, which bound these kernels), else 1.  The forward takes 4 in
// round 4 and 8 for 2-byte types in round 5, the backward cells 2, or 4 in round 5 (reach <= 1).
inline int channel_lanes(const Pool2d& g, size_t elem_size, std::initializer_list<const void*> ptrs, int most = 2) {
  if (!is_channels_last(g) || elem_size > 4) return 1;
  while (most * elem_size > 16) most /= 2;
  for (int L = most; L >= 2; L /= 2) {
    bool ok = g.C % L == 0;
    for (const void* p : ptrs) ok = ok && aligned_to(p, L * elem_size);
    if (ok) return L;
  }
  return 1;
}

// One thread per input element (gather_grad): windows reaching more than 2 outputs back.
template <bool CL, typename T, typename index_t, typename tap_t>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const T* __restrict__ go, const tap_t* __restrict__ taps, T* __restrict__ gi,
                  PoolDims<index_t> d, PosDividers<index_t> in_div, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, i, total) {
    gi[i] = static_cast<T>(gather_grad<CL, T, index_t, tap_t>(go, taps, d, decompose<CL>(i, in_div)));
  }
}

std::tuple<Tensor, Tensor, Tensor> max_pool2d_cuda(const Tensor& input, at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool ceil_mode, bool return_indices,
                                                   bool save_argmax) {
  const Pool2d g = pool2d_geometry("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor x = input.contiguous(kernel_format(g));
  Tensor out = pool2d_empty(g, g.output_sizes(), x.options());
  Tensor indices = return_indices ? pool2d_empty(g, g.output_sizes(), x.options().dtype(at::kLong))
                                  : at::empty({0}, x.options().dtype(at::kLong));
  Tensor argmax = empty_argmax(g, x.options(), save_argmax);
  if (out.numel() == 0) return {out, indices, argmax};
  const int64_t total = out.numel();
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.max_pool2d", [&] {
    with_index_type(std::max(x.numel(), total), [&](auto index_zero) {
      using index_t = decltype(index_zero);
      const PoolDims<index_t> d(g);
      const PosDividers<index_t> out_div(d.C, d.OH, d.OW);
      with_tap_type(g, [&](auto tap_zero) {
        using tap_t = decltype(tap_zero);
        with_layout(is_channels_last(g), [&](auto cl) {
          constexpr bool CL = decltype(cl)::value;
          const scalar_t* xp = x.const_data_ptr<scalar_t>();
          scalar_t* yp = out.mutable_data_ptr<scalar_t>();
          int64_t* ip = return_indices ? indices.mutable_data_ptr<int64_t>() : nullptr;
          tap_t* tp = save_argmax ? static_cast<tap_t*>(argmax.mutable_data_ptr()) : nullptr;
          const index_t n = static_cast<index_t>(total);
          const auto blocks = [&](int64_t items, int per_thread) {
            return blocks_for((items + per_thread - 1) / per_thread);
          };
          bool done = false;
          if constexpr (std::is_same_v<tap_t, uint8_t>) {  // 2x2 and 3x3 have byte taps
            // taps (1-byte elements, L of them a store) need 2-byte alignment for L = 2;
            // argmax is a fresh tensor, so only the input decides.
            const int most_lanes =
                !row4_forward_enabled() ? 2 : (sizeof(scalar_t) == 2 && round5_lanes_enabled() ? 8 : 4);
            const int L = channel_lanes(g, sizeof(scalar_t), {xp, yp}, most_lanes);
            // Round 5: the values-only form where there is nothing else to write.
            const bool values_only = ip == nullptr && tp == nullptr && values_forward_enabled();
            const auto launch = [&](auto kh_c, auto lanes_c) {
              constexpr int K = decltype(kh_c)::value, LL = decltype(lanes_c)::value;
              const index_t items = n / LL;
              const PosDividers<index_t> div(d.C / LL, d.OH, d.OW);
              with_flag(values_only, [&](auto values) {
                forward_unrolled_kernel<K, K, LL, CL, decltype(values)::value, scalar_t, index_t, tap_t>
                    <<<blocks(items, forward_items(K, K, LL, static_cast<int>(sizeof(scalar_t)))), kThreads, 0,
                       stream>>>(xp, yp, ip, tp, d, div, items);
              });
            };
            using two = std::integral_constant<int, 2>;
            using three = std::integral_constant<int, 3>;
            using one_lane = std::integral_constant<int, 1>;
            const bool square23 = (g.kh == 2 && g.kw == 2) || (g.kh == 3 && g.kw == 3);
            // NCHW 3x3/2: pairs of outputs along W share their middle column.  Not for 2x2/2,
            // whose windows share nothing: there the pair kernel measured 0.055 ms against the
            // unrolled kernel's 0.041 ms (VGG, H200, 2026-11-25), while the 3x3/2 stem gained
            // 0.059 -> 0.047 ms.
            // Round 3's quads, only where they measured faster (H200, 2026-11-26, same run,
            // benchmarks/NOTES-maxpool-cuda.md): 2-byte types with 16-byte row pieces (W % 8 == 0)
            // and no argmax or indices to write: the stem's float16 forward 41.2 -> 32.8 us.  They
            // lost elsewhere: AlexNet (W = 55, 2-wide pieces) 23.0 -> 32.4 us float32 and
            // 18.6 -> 23.4 us float16, the stem in float32 46.6 -> 46.2 us (nothing), and with
            // argmax (forward+backward) the stem 130 -> 137 us.
            bool quad = false;
            if constexpr (sizeof(index_t) == 4 && sizeof(scalar_t) == 2) {
              if (!CL && g.kh == 3 && g.kw == 3 && g.sw == 2 && g.dw == 1 && ip == nullptr && tp == nullptr &&
                  g.W % 8 == 0 && quad_forward_enabled()) {
                const index_t items = d.N * d.C * d.OH * ((d.OW + 3) / 4);
                const PosDividers<index_t> div(d.C, d.OH, (d.OW + 3) / 4);
                // vec_store: every item holds 4 outputs at a multiple of 4 from y.
                const bool vec_store = g.OW % 4 == 0 && aligned_to(yp, 4 * sizeof(scalar_t));
                forward_quad_kernel<8, scalar_t, index_t><<<blocks(items, 1), kThreads, 0, stream>>>(
                    xp, yp, d, div, items, vec_store);
                quad = true;
              }
            }
            // Round 4 (2x2/2 NCHW, every window inside, W % 8 == 0: 16-byte row pieces).
            bool row4 = false;
            if constexpr (!CL) {
              if (!quad && g.kh == 2 && g.kw == 2 && g.sh == 2 && g.sw == 2 && g.ph == 0 && g.pw == 0 &&
                  g.dh == 1 && g.dw == 1 && g.W % 8 == 0 && 2 * g.OW == g.W && 2 * g.OH <= g.H &&
                  aligned_to(xp, 16) && aligned_to(yp, 4 * sizeof(scalar_t)) && row4_forward_enabled()) {
                const index_t items = d.N * d.C * d.OH * (d.OW / 4);
                const PosDividers<index_t> div(d.C, d.OH, d.OW / 4);
                with_flag(values_only, [&](auto values) {
                  forward_row4_kernel<kRow4Items, decltype(values)::value, scalar_t, index_t, tap_t>
                      <<<blocks(items, kRow4Items), kThreads, 0, stream>>>(xp, yp, ip, tp, d, div, items);
                });
                row4 = true;
              }
            }
            if (quad || row4) {
              done = true;
            } else if (!CL && g.kh == 3 && g.kw == 3 && g.sw == 2 && g.dw == 1) {
              const index_t items = d.N * d.C * d.OH * ((d.OW + 1) / 2);
              const PosDividers<index_t> div(d.C, d.OH, (d.OW + 1) / 2);
              with_flag(values_only, [&](auto values) {
                forward_pair_kernel<3, 3, decltype(values)::value, scalar_t, index_t, tap_t>
                    <<<blocks(items, forward_pair_items(3)), kThreads, 0, stream>>>(xp, yp, ip, tp, d, div, items);
              });
              done = true;
            } else if (square23) {
              const auto by_window = [&](auto lanes_c) {
                if (g.kh == 2) launch(two(), lanes_c); else launch(three(), lanes_c);
              };
              if constexpr (CL && sizeof(scalar_t) <= 4) {
                // Round 4: 4 channels an item (8-byte loads in half types, 16-byte in float32:
                // half the load instructions of 2; taps: a fresh tensor, aligned).  Round 5: 8
                // channels an item in the 2-byte types (16-byte loads; taps 8-byte stores).
                if (L == 8) {  // 2-byte types only: channel_lanes keeps an item to 16 bytes
                  if constexpr (sizeof(scalar_t) == 2) by_window(std::integral_constant<int, 8>());
                } else if (L == 4) {
                  by_window(std::integral_constant<int, 4>());
                } else if (L == 2) {
                  by_window(two());
                } else {
                  by_window(one_lane());
                }
              } else {
                by_window(one_lane());
              }
              done = true;
            }
          }
          if (!done) {
            forward_kernel<CL, scalar_t, index_t, tap_t><<<blocks(total, 1), kThreads, 0, stream>>>(xp, yp, ip, tp, d,
                                                                                              out_div, n);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }, kMaxItems);
  });
  return {out, indices, argmax};
}

Tensor max_pool2d_backward_cuda(const Tensor& grad_output, const Tensor& input, const Tensor& argmax,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2d g =
      max_pool2d_backward_geometry(grad_output, input, argmax, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto fmt = kernel_format(g);
  const Tensor go = grad_output.contiguous(fmt);
  const Tensor am = argmax.contiguous(fmt);
  Tensor gi = at::empty(input.sizes(), go.options().memory_format(fmt));
  if (gi.numel() == 0) return gi;
  const int64_t n_out = go.numel(), n_in = gi.numel();
  const CellRange rows = cell_range(g.H, g.sh, g.ph), cols = cell_range(g.W, g.sw, g.pw);
  const int64_t n_cells = g.N * g.C * rows.count * cols.count;  // each holds an input position
  const int64_t reach = std::max(cell_reach(g.kh, g.sh, g.dh), cell_reach(g.kw, g.sw, g.dw));
  CONVRNN_DISPATCH_FLOATING(go.scalar_type(), "convrnn.max_pool2d_backward", [&] {
    with_index_type(std::max(n_in, n_out), [&](auto index_zero) {
      using index_t = decltype(index_zero);
      const PoolDims<index_t> d(g);
      with_tap_type(g, [&](auto tap_zero) {
        using tap_t = decltype(tap_zero);
        const tap_t* taps = static_cast<const tap_t*>(am.const_data_ptr());
        const scalar_t* gop = go.const_data_ptr<scalar_t>();
        scalar_t* gip = gi.mutable_data_ptr<scalar_t>();
        with_layout(is_channels_last(g), [&](auto cl) {
          constexpr bool CL = decltype(cl)::value;
          if (reach <= 2) {
            // Round 5: 4 channels a cell where windows reach at most one output back (8-byte
            // accesses in the 2-byte types, 16-byte in float32); wider reaches keep 2 (registers).
            const int L =
                channel_lanes(g, sizeof(scalar_t), {gop, taps, gip}, reach <= 1 && round5_lanes_enabled() ? 4 : 2);
            const auto launch = [&](auto reach_c, auto lanes_c) {
              constexpr int R = decltype(reach_c)::value, LL = decltype(lanes_c)::value;
              const CellDividers<index_t> cd(d.C / LL, rows, cols, d.kw);
              const int64_t items = n_cells / LL;
              backward_cells_kernel<R, LL, CL, scalar_t, index_t, tap_t>
                  <<<blocks_for(items), kThreads, 0, stream>>>(gop, taps, gip, d, cd, static_cast<index_t>(items));
            };
            const auto with_lanes = [&](auto reach_c) {
              if constexpr (CL && sizeof(scalar_t) <= 4) {
                if constexpr (decltype(reach_c)::value <= 1) {
                  if (L == 4) {
                    launch(reach_c, std::integral_constant<int, 4>());
                    return;
                  }
                }
                if (L == 2) {
                  launch(reach_c, std::integral_constant<int, 2>());
                  return;
                }
              }
              launch(reach_c, std::integral_constant<int, 1>());
            };
            if (reach == 0) {
              with_lanes(std::integral_constant<int, 0>());
            } else if (reach == 1) {
              with_lanes(std::integral_constant<int, 1>());
            } else {
              with_lanes(std::integral_constant<int, 2>());
            }
          } else {
            gather_kernel<CL, scalar_t, index_t, tap_t><<<blocks_for(n_in), kThreads, 0, stream>>>(
                gop, taps, gip, d, PosDividers<index_t>(d.C, d.H, d.W), static_cast<index_t>(n_in));
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return gi;
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CUDA, m) {
  m.impl("max_pool2d", &convrnn::max_pool2d_cuda);
  m.impl("max_pool2d_backward", &convrnn::max_pool2d_backward_cuda);
}
