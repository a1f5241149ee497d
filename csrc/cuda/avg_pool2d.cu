// CUDA avg_pool2d forward and backward.
//
// Forward: one thread per output element in the output's memory order, summing its window
// with avg_window_sum and dividing by avg_divisor (both shared with the CPU kernels).
// Backward: one thread per input element gathers grad_output / divisor over the outputs
// whose windows cover it (covering_outputs), in a fixed order: deterministic, no atomics.
#include <torch/library.h>

#include "avg_pool2d.h"
#include "cuda/launch.cuh"
#include "cuda/pool_dims.cuh"

namespace convrnn {
namespace {

using at::Tensor;

template <typename index_t>
__device__ __forceinline__ int64_t divisor_of(const PoolDims<index_t>& d, const AvgOpts& o, index_t oh, index_t ow) {
  return avg_divisor(oh * d.sh - d.ph, ow * d.sw - d.pw, d.H, d.W, d.kh, d.kw, d.ph, d.pw, o.count_include_pad,
                     o.divisor_override);
}

template <bool CL, typename T, typename index_t>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y, PoolDims<index_t> d, AvgOpts o,
                               index_t total) {
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    const Pos<index_t> p = decompose<CL>(e, d.C, d.OH, d.OW);
    const index_t hstart = p.row * d.sh - d.ph, wstart = p.col * d.sw - d.pw;
    const acc_t<T> sum = avg_window_sum<T, index_t>(x + plane_offset<CL>(p.n, p.c, d.C, d.H, d.W), d.W,
                                                    plane_stride<CL>(d.C), hstart, wstart,
                                                    window_taps<index_t>(hstart, d.H, d.kh, 1),
                                                    window_taps<index_t>(wstart, d.W, d.kw, 1));
    y[e] = static_cast<T>(sum / static_cast<acc_t<T>>(divisor_of(d, o, p.row, p.col)));
  }
}

template <bool CL, typename T, typename index_t>
__global__ void backward_kernel(const T* __restrict__ go, T* __restrict__ gi, PoolDims<index_t> d, AvgOpts o,
                                index_t total) {
  CONVRNN_GRID_STRIDE(index_t, i, total) {
    const Pos<index_t> p = decompose<CL>(i, d.C, d.H, d.W);
    const Taps oh = covering_outputs<index_t>(p.row, d.ph, d.kh, d.sh, d.OH);
    const Taps ow = covering_outputs<index_t>(p.col, d.pw, d.kw, d.sw, d.OW);
    acc_t<T> sum = 0;
    for (index_t a = oh.lo; a < oh.hi; ++a) {
      for (index_t b = ow.lo; b < ow.hi; ++b) {
        const acc_t<T> g = static_cast<acc_t<T>>(go[output_index<CL>(p, d.OH, d.OW, d.C, a, b)]);
        sum += avg_grad_share(g, divisor_of(d, o, a, b));
      }
    }
    gi[i] = static_cast<T>(sum);
  }
}

Tensor avg_pool2d_cuda(const Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                       std::optional<int64_t> divisor_override) {
  const Pool2d g = pool2d_geometry("avg_pool2d", input, kernel_size, stride, padding, {1, 1}, ceil_mode);
  const AvgOpts o = avg_opts("avg_pool2d", count_include_pad, divisor_override);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor x = input.contiguous(kernel_format(g));
  Tensor out = pool2d_empty(g, g.output_sizes(), x.options());
  if (out.numel() == 0) return out;
  const int64_t total = out.numel();
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.avg_pool2d", [&] {
    with_index_type(x.numel(), [&](auto index_zero) {
      using index_t = decltype(index_zero);
      with_layout(is_channels_last(g), [&](auto cl) {
        forward_kernel<decltype(cl)::value, scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), PoolDims<index_t>(g), o,
            static_cast<index_t>(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

Tensor avg_pool2d_backward_cuda(const Tensor& grad_output, const Tensor& input, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                bool count_include_pad, std::optional<int64_t> divisor_override) {
  const Pool2d g = pool2d_backward_geometry("avg_pool2d_backward", grad_output, input, kernel_size, stride, padding,
                                            {1, 1}, ceil_mode);
  const AvgOpts o = avg_opts("avg_pool2d_backward", count_include_pad, divisor_override);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor go = grad_output.contiguous(kernel_format(g));
  Tensor gi = at::empty(input.sizes(), go.options().memory_format(kernel_format(g)));
  if (gi.numel() == 0) return gi;
  const int64_t total = gi.numel();
  CONVRNN_DISPATCH_FLOATING(go.scalar_type(), "convrnn.avg_pool2d_backward", [&] {
    with_index_type(total, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      with_layout(is_channels_last(g), [&](auto cl) {
        backward_kernel<decltype(cl)::value, scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            go.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(), PoolDims<index_t>(g), o,
            static_cast<index_t>(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return gi;
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CUDA, m) {
  m.impl("avg_pool2d", &convrnn::avg_pool2d_cuda);
  m.impl("avg_pool2d_backward", &convrnn::avg_pool2d_backward_cuda);
}
