// CUDA max_pool2d forward and backward.
//
// Forward: one thread per output element, in the output's memory order (NCHW: ow fastest;
// channels_last: c fastest) so neighbouring threads load neighbouring inputs; each scans its
// window with max_window, the CPU kernels' function, and writes the value, torch's int64
// index when asked, and the tap-number argmax the backward reads when autograd needs it.
// Backward, deterministic and without atomics, from the saved argmax (1 byte per output):
//  - windows that tile the input exactly: one thread per output writes its whole window,
//    the gradient at the argmax and zeros elsewhere; one pass, no memset;
//  - otherwise one thread per input element gathers grad_output over the outputs whose
//    windows cover it and whose argmax is this element, in a fixed order (torch's scheme).
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "cuda/pool_dims.cuh"
#include "max_pool2d.h"

namespace convrnn {
namespace {

using at::Tensor;

template <bool CL, typename T, typename index_t, typename tap_t>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t* __restrict__ indices,
                               tap_t* __restrict__ taps, PoolDims<index_t> d, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    const Pos<index_t> p = decompose<CL>(e, d.C, d.OH, d.OW);
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

template <bool CL, typename T, typename index_t, typename tap_t>
__global__ void backward_tiled_kernel(const T* __restrict__ go, const tap_t* __restrict__ taps, T* __restrict__ gi,
                                      PoolDims<index_t> d, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    const Pos<index_t> p = decompose<CL>(e, d.C, d.OH, d.OW);
    const tap_t tap = taps[e];
    const T g = go[e];
    T* plane = gi + plane_offset<CL>(p.n, p.c, d.C, d.H, d.W);
    for (index_t t = 0; t < d.kh; ++t) {
      for (index_t u = 0; u < d.kw; ++u) {
        const index_t idx = (p.row * d.kh + t) * d.W + p.col * d.kw + u;
        plane[idx * plane_stride<CL>(d.C)] = tap == static_cast<tap_t>(t * d.kw + u) ? g : static_cast<T>(0);
      }
    }
  }
}

// Tap number at which the window of output (oh, ow) sees input (ih, iw), or -1 if it
// falls between dilated taps.
template <typename index_t>
__device__ __forceinline__ index_t tap_of(const PoolDims<index_t>& d, index_t ih, index_t iw, index_t oh, index_t ow) {
  const index_t dy = ih - (oh * d.sh - d.ph), dx = iw - (ow * d.sw - d.pw);
  if (dy % d.dh != 0 || dx % d.dw != 0) return -1;
  return (dy / d.dh) * d.kw + dx / d.dw;
}

template <bool CL, typename T, typename index_t, typename tap_t>
__global__ void gather_kernel(const T* __restrict__ go, const tap_t* __restrict__ taps, T* __restrict__ gi,
                              PoolDims<index_t> d, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, i, total) {
    const Pos<index_t> p = decompose<CL>(i, d.C, d.H, d.W);
    const Taps oh = covering_outputs<index_t>(p.row, d.ph, d.dh * (d.kh - 1) + 1, d.sh, d.OH);
    const Taps ow = covering_outputs<index_t>(p.col, d.pw, d.dw * (d.kw - 1) + 1, d.sw, d.OW);
    acc_t<T> sum = 0;
    for (index_t a = oh.lo; a < oh.hi; ++a) {
      for (index_t b = ow.lo; b < ow.hi; ++b) {
        const index_t o = output_index<CL>(p, d.OH, d.OW, d.C, a, b);
        const tap_t saved = taps[o];
        if (saved != no_tap<tap_t>() && static_cast<index_t>(saved) == tap_of(d, p.row, p.col, a, b)) {
          sum += static_cast<acc_t<T>>(go[o]);
        }
      }
    }
    gi[i] = static_cast<T>(sum);
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
    with_index_type(x.numel(), [&](auto index_zero) {
      using index_t = decltype(index_zero);
      with_tap_type(g, [&](auto tap_zero) {
        using tap_t = decltype(tap_zero);
        with_layout(is_channels_last(g), [&](auto cl) {
          forward_kernel<decltype(cl)::value, scalar_t, index_t, tap_t><<<blocks_for(total), kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
              return_indices ? indices.mutable_data_ptr<int64_t>() : nullptr,
              save_argmax ? static_cast<tap_t*>(argmax.mutable_data_ptr()) : nullptr, PoolDims<index_t>(g),
              static_cast<index_t>(total));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
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
  CONVRNN_DISPATCH_FLOATING(go.scalar_type(), "convrnn.max_pool2d_backward", [&] {
    with_index_type(n_in, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      with_tap_type(g, [&](auto tap_zero) {
        using tap_t = decltype(tap_zero);
        const tap_t* taps = static_cast<const tap_t*>(am.const_data_ptr());
        with_layout(is_channels_last(g), [&](auto cl) {
          constexpr bool CL = decltype(cl)::value;
          if (tiles_exactly(g)) {
            backward_tiled_kernel<CL, scalar_t, index_t, tap_t><<<blocks_for(n_out), kThreads, 0, stream>>>(
                go.const_data_ptr<scalar_t>(), taps, gi.mutable_data_ptr<scalar_t>(), PoolDims<index_t>(g),
                static_cast<index_t>(n_out));
          } else {
            gather_kernel<CL, scalar_t, index_t, tap_t><<<blocks_for(n_in), kThreads, 0, stream>>>(
                go.const_data_ptr<scalar_t>(), taps, gi.mutable_data_ptr<scalar_t>(), PoolDims<index_t>(g),
                static_cast<index_t>(n_in));
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
