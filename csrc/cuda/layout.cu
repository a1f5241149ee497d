// channels_last_cuda: an NCHW-contiguous tensor copied to channels_last by the kernels of
// layout.cuh (the conv2d GEMM paths' input and grad_output).
#include <ATen/ATen.h>

#include <cstdint>

#include "cuda/conv2d_cuda.h"
#include "cuda/launch.cuh"
#include "cuda/layout.cuh"

namespace convrnn {
namespace {

template <typename U>
void launch_nchw_to_nhwc(const at::Tensor& t, at::Tensor& out, cudaStream_t stream) {
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  const U* src = static_cast<const U*>(t.const_data_ptr());
  U* dst = static_cast<U*>(out.mutable_data_ptr());
  with_index_type(t.numel(), [&](auto zero) {
    using I = decltype(zero);
    if (C < layout::kSmallC) {
      layout::nchw_to_nhwc_small_kernel<U, I><<<blocks_for(N * HW), kThreads, 0, stream>>>(src, dst, C, HW, N * HW);
    } else {
      const int64_t tiles = N * div_ceil<int64_t>(C, layout::kTile) * div_ceil<int64_t>(HW, layout::kTile);
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tiles, kMaxBlocks));
      layout::nchw_to_nhwc_tile_kernel<U, I>
          <<<blocks, layout::kTile * layout::kTileRows, 0, stream>>>(src, dst, C, HW, tiles);
    }
  });  // grid-stride overshoot: at most kMaxBlocks * kThreads past numel, which it allows for
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor channels_last_cuda(const at::Tensor& t, cudaStream_t stream) {
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  if (t.dim() != 4 || !t.is_contiguous() || t.numel() == 0) return t.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty_like(t, at::MemoryFormat::ChannelsLast);
  switch (t.element_size()) {
    case 2:
      launch_nchw_to_nhwc<uint16_t>(t, out, stream);
      break;
    case 4:
      launch_nchw_to_nhwc<uint32_t>(t, out, stream);
      break;
    case 8:
      launch_nchw_to_nhwc<uint64_t>(t, out, stream);
      break;
    default:
      return t.contiguous(at::MemoryFormat::ChannelsLast);
  }
  return out;
}

}  // namespace convrnn
