// NCHW -> NHWC (channels_last) copy of a dense tensor, the layout the conv2d GEMM kernels
// read.  torch's contiguous(ChannelsLast) is an elementwise copy with strided reads: 36 us for
// VGG conv3-64's 25.7 MB input on the H200 (1.4 TB/s), three such copies a forward+backward
// step of an NCHW layer (input in the forward, grad_output and input in the backward).  Here
// the bits move as 2-, 4- or 8-byte words (U), so one kernel serves every dtype:
//  * tile kernel (C >= 16): a 32-channel x 32-pixel tile through shared memory, read along
//    pixels and written along channels, both coalesced (padded row: no bank conflicts);
//  * small kernel (C < 16, the 3-channel images of the first layers): a thread per pixel,
//    reading its C values from C coalesced plane reads and writing them contiguously.
// No ATen here, so the kernels also run under the CPU emulation (tests/native/layout_check.cpp).
#pragma once

#include <cstdint>

#include "cuda/grid_stride.cuh"

namespace convrnn {
namespace layout {

constexpr int kTile = 32, kTileRows = 8;  // 256 threads: 32 x 8, 4 tile rows each
constexpr int kSmallC = 16;               // C below this: the small kernel

// Index arithmetic in I: int32_t where every element index fits (launch.cuh's
// with_index_type picks it; 32-bit divisions are several times cheaper), else int64_t.

// src [N][C][HW] -> dst [N][HW][C]; tiles = N * ceil(C/32) * ceil(HW/32), walked grid-stride.
template <typename U, typename I>
__global__ void __launch_bounds__(kTile* kTileRows) nchw_to_nhwc_tile_kernel(const U* __restrict__ src,
                                                                             U* __restrict__ dst, I C, I HW, I tiles) {
  __shared__ U tile[kTile][kTile + 1];
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const I tiles_p = (HW + kTile - 1) / kTile, tiles_c = (C + kTile - 1) / kTile;
  for (I t = blockIdx.x; t < tiles; t += gridDim.x) {
    const I q = t / tiles_p, n = q / tiles_c;
    const I p0 = (t - q * tiles_p) * kTile, c0 = (q - n * tiles_c) * kTile;
    const U* __restrict__ s = src + n * C * HW;
    U* __restrict__ d = dst + n * C * HW;
    for (int r = ty; r < kTile; r += kTileRows) {
      const I c = c0 + r, p = p0 + tx;
      if (c < C && p < HW) tile[r][tx] = s[c * HW + p];
    }
    __syncthreads();
    for (int r = ty; r < kTile; r += kTileRows) {
      const I p = p0 + r, c = c0 + tx;
      if (c < C && p < HW) d[p * C + c] = tile[tx][r];
    }
    __syncthreads();  // the tile is rewritten by the next iteration
  }
}

// src [N][C][HW] -> dst [N][HW][C], a thread per pixel (N * HW of them).
template <typename U, typename I>
__global__ void nchw_to_nhwc_small_kernel(const U* __restrict__ src, U* __restrict__ dst, I C, I HW, I pixels) {
  CONVRNN_GRID_STRIDE(I, i, pixels) {
    const I n = i / HW, p = i - n * HW;
    const U* __restrict__ s = src + n * C * HW + p;
    U* __restrict__ d = dst + i * C;
    for (I c = 0; c < C; ++c) d[c] = s[c * HW];
  }
}

}  // namespace layout
}  // namespace convrnn
