// CUDA max_pool2d forward and backward.
//
// Forward: one thread per output element, in the output's memory order (NCHW: ow fastest;
// channels_last: c fastest) so neighbouring threads load neighbouring inputs; each scans its
// window with max_window, the CPU kernels' function.
// Backward, deterministic and without atomics; nothing is saved by the forward but the input:
//  - windows that tile the input exactly (stride == kernel, no padding or dilation, sizes
//    divisible): one thread per output writes its whole window, the gradient at the argmax
//    and zeros elsewhere; one pass, no memset.
//  - otherwise: an argmax kernel writes each output's argmax (-1 for a window with no
//    in-image tap) to a scratch buffer, then a
//    gather kernel gives each input element the sum of grad_output over the outputs whose
//    argmax it is, visiting them in a fixed order (torch's CUDA scheme).
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "cuda/pool_dims.cuh"
#include "max_pool2d.h"

namespace convrnn {
namespace {

using at::Tensor;

// Max and argmax of the window of output element e; p receives its position.
template <bool CL, typename T, typename index_t>
__device__ __forceinline__ void window_of(const T* x, const PoolDims<index_t>& d, index_t e, acc_t<T>& best,
                                          index_t& arg, Pos<index_t>& p) {
  p = decompose<CL>(e, d.C, d.OH, d.OW);
  const index_t hstart = p.row * d.sh - d.ph, wstart = p.col * d.sw - d.pw;
  max_window<T, index_t>(x + plane_offset<CL>(p.n, p.c, d.C, d.H, d.W), d.W, plane_stride<CL>(d.C), hstart, wstart,
                         window_taps<index_t>(hstart, d.H, d.kh, d.dh), window_taps<index_t>(wstart, d.W, d.kw, d.dw),
                         d.dh, d.dw, best, arg);
}

template <bool CL, typename T, typename index_t>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t* __restrict__ indices,
                               PoolDims<index_t> d, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    acc_t<T> best;
    index_t arg;
    Pos<index_t> p;
    window_of<CL>(x, d, e, best, arg, p);
    y[e] = static_cast<T>(best);
    if (indices != nullptr) indices[e] = arg;
  }
}

template <bool CL, typename T, typename index_t>
__global__ void backward_tiled_kernel(const T* __restrict__ go, const T* __restrict__ x, T* __restrict__ gi,
                                      PoolDims<index_t> d, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    acc_t<T> best;
    index_t arg;
    Pos<index_t> p;
    window_of<CL>(x, d, e, best, arg, p);
    const T g = go[e];
    for (index_t t = 0; t < d.kh; ++t) {
      for (index_t u = 0; u < d.kw; ++u) {
        const index_t idx = (p.row * d.kh + t) * d.W + p.col * d.kw + u;
        gi[plane_offset<CL>(p.n, p.c, d.C, d.H, d.W) + idx * plane_stride<CL>(d.C)] = idx == arg ? g : static_cast<T>(0);
      }
    }
  }
}

template <bool CL, typename T, typename index_t>
__global__ void argmax_kernel(const T* __restrict__ x, index_t* __restrict__ argmax, PoolDims<index_t> d,
                              index_t total) {
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    acc_t<T> best;
    index_t arg;
    Pos<index_t> p;
    window_of<CL>(x, d, e, best, arg, p);
    const index_t hstart = p.row * d.sh - d.ph, wstart = p.col * d.sw - d.pw;
    const bool taps = has_taps(window_taps<index_t>(hstart, d.H, d.kh, d.dh), window_taps<index_t>(wstart, d.W, d.kw, d.dw));
    argmax[e] = taps ? arg : index_t(-1);  // -1 matches no input element: no gradient
  }
}

template <bool CL, typename T, typename index_t>
__global__ void gather_kernel(const T* __restrict__ go, const index_t* __restrict__ argmax, T* __restrict__ gi,
                              PoolDims<index_t> d, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, i, total) {
    const Pos<index_t> p = decompose<CL>(i, d.C, d.H, d.W);
    const index_t target = p.row * d.W + p.col;
    const Taps oh = covering_outputs<index_t>(p.row, d.ph, d.dh * (d.kh - 1) + 1, d.sh, d.OH);
    const Taps ow = covering_outputs<index_t>(p.col, d.pw, d.dw * (d.kw - 1) + 1, d.sw, d.OW);
    acc_t<T> sum = 0;
    for (index_t a = oh.lo; a < oh.hi; ++a) {
      for (index_t b = ow.lo; b < ow.hi; ++b) {
        const index_t o = output_index<CL>(p, d.OH, d.OW, d.C, a, b);
        if (argmax[o] == target) sum += static_cast<acc_t<T>>(go[o]);
      }
    }
    gi[i] = static_cast<T>(sum);
  }
}

std::tuple<Tensor, Tensor> max_pool2d_cuda(const Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode,
                                           bool return_indices) {
  const Pool2d g = pool2d_geometry("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto fmt = kernel_format(g);
  const Tensor x = input.contiguous(fmt);
  Tensor out = pool2d_empty(g, g.output_sizes(), x.options());
  Tensor indices = return_indices ? pool2d_empty(g, g.output_sizes(), x.options().dtype(at::kLong))
                                  : at::empty({0}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, indices};
  const int64_t total = out.numel();
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.max_pool2d", [&] {
    with_index_type(x.numel(), [&](auto index_zero) {
      using index_t = decltype(index_zero);
      with_layout(is_channels_last(g), [&](auto cl) {
        forward_kernel<decltype(cl)::value, scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
            return_indices ? indices.mutable_data_ptr<int64_t>() : nullptr, PoolDims<index_t>(g),
            static_cast<index_t>(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {out, indices};
}

Tensor max_pool2d_backward_cuda(const Tensor& grad_output, const Tensor& input, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                bool ceil_mode) {
  const Pool2d g = pool2d_backward_geometry("max_pool2d_backward", grad_output, input, kernel_size, stride, padding,
                                            dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto fmt = kernel_format(g);
  const Tensor x = input.contiguous(fmt);
  const Tensor go = grad_output.contiguous(fmt);
  Tensor gi = at::empty(input.sizes(), x.options().memory_format(fmt));
  if (gi.numel() == 0) return gi;
  const int64_t n_out = go.numel(), n_in = x.numel();
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.max_pool2d_backward", [&] {
    with_index_type(n_in, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      with_layout(is_channels_last(g), [&](auto cl) {
        constexpr bool CL = decltype(cl)::value;
        const PoolDims<index_t> d(g);
        if (tiles_exactly(g)) {
          backward_tiled_kernel<CL, scalar_t, index_t><<<blocks_for(n_out), kThreads, 0, stream>>>(
              go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(), d,
              static_cast<index_t>(n_out));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        const auto index_dtype = sizeof(index_t) == 4 ? at::kInt : at::kLong;
        Tensor argmax = at::empty({n_out}, x.options().dtype(index_dtype));
        index_t* am = reinterpret_cast<index_t*>(argmax.mutable_data_ptr());
        argmax_kernel<CL, scalar_t, index_t><<<blocks_for(n_out), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), am, d, static_cast<index_t>(n_out));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        gather_kernel<CL, scalar_t, index_t><<<blocks_for(n_in), kThreads, 0, stream>>>(
            go.const_data_ptr<scalar_t>(), am, gi.mutable_data_ptr<scalar_t>(), d, static_cast<index_t>(n_in));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
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
