// conv2d CUDA: the depthwise kernels (groups == C, Cg == 1; K = C * Kg), direct; launched
// by conv2d_depthwise.cu.  See there for the scheme.
#pragma once

#include "conv2d.h"
#include "cuda/launch.cuh"

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
