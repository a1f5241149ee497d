// CUDA local_response_norm forward and backward.
//
// One thread per element, in the tensor's memory order; its channel neighbours are cstride
// elements away (S for (N, C, S) contiguous input, 1 for channels_last), so each thread's
// window reads hit the lines its neighbours in the warp also read.
// Forward: y = x * s^-beta with s summed over the channel window.
// Backward, two passes and no atomics: t = g x s^(-beta-1) into a float scratch buffer,
// then dx_j = g_j s_j^-beta - (2 alpha beta / size) x_j sum of t over j's users.
// The formulas are local_response_norm.h's, shared with the CPU kernels.
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "local_response_norm.h"

namespace convrnn {
namespace {

using at::Tensor;

template <typename index_t>
struct LrnDims {
  index_t C, S;
  bool channels_last;
};

// Element e's channel, the offset of its channel 0, and the distance between channels.
template <typename index_t>
__device__ __forceinline__ void locate(const LrnDims<index_t>& d, index_t e, index_t& c, index_t& base,
                                       index_t& cstride) {
  if (d.channels_last) {
    c = e % d.C;
    base = e - c;
    cstride = 1;
  } else {
    c = (e / d.S) % d.C;
    base = e - c * d.S;
    cstride = d.S;
  }
}

// s = k + alpha/size * (sum of squares over c's window), reading from x.
template <typename T, typename A, typename index_t>
__device__ __forceinline__ A scale_at(const T* x, index_t base, index_t cstride, index_t c, index_t C, int64_t size,
                                      A alpha_over_size, A k) {
  const index_t lo = max(index_t(0), static_cast<index_t>(lrn_window_first(c, size)));
  const index_t hi = min(C - 1, static_cast<index_t>(lrn_window_last(c, size)));
  A sum = 0;
  for (index_t j = lo; j <= hi; ++j) {
    const A v = static_cast<A>(x[base + j * cstride]);
    sum += v * v;
  }
  return lrn_scale(sum, alpha_over_size, k);
}

template <int MODE, typename T, typename index_t>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y, LrnDims<index_t> d, LrnConst p,
                               index_t total) {
  using A = acc_t<T>;
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    index_t c, base, cs;
    locate(d, e, c, base, cs);
    const A s = scale_at<T, A>(x, base, cs, c, d.C, p.size, A(p.alpha_over_size), A(p.k));
    y[e] = static_cast<T>(static_cast<A>(x[e]) * lrn_inv_pow<MODE>(s, A(p.beta)));
  }
}

template <int MODE, typename T, typename index_t>
__global__ void backward_t_kernel(const T* __restrict__ go, const T* __restrict__ x, acc_t<T>* __restrict__ t,
                                  LrnDims<index_t> d, LrnConst p, index_t total) {
  using A = acc_t<T>;
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    index_t c, base, cs;
    locate(d, e, c, base, cs);
    const A s = scale_at<T, A>(x, base, cs, c, d.C, p.size, A(p.alpha_over_size), A(p.k));
    t[e] = static_cast<A>(go[e]) * static_cast<A>(x[e]) * lrn_inv_pow<MODE>(s, A(p.beta)) / s;
  }
}

template <int MODE, typename T, typename index_t>
__global__ void backward_dx_kernel(const T* __restrict__ go, const T* __restrict__ x, const acc_t<T>* __restrict__ t,
                                   T* __restrict__ gi, LrnDims<index_t> d, LrnConst p, index_t total) {
  using A = acc_t<T>;
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    index_t j, base, cs;
    locate(d, e, j, base, cs);
    const A s = scale_at<T, A>(x, base, cs, j, d.C, p.size, A(p.alpha_over_size), A(p.k));
    const index_t lo = max(index_t(0), static_cast<index_t>(lrn_users_first(j, p.size)));
    const index_t hi = min(d.C - 1, static_cast<index_t>(lrn_users_last(j, p.size)));
    A sum = 0;
    for (index_t c = lo; c <= hi; ++c) sum += t[base + c * cs];
    gi[e] = static_cast<T>(static_cast<A>(go[e]) * lrn_inv_pow<MODE>(s, A(p.beta)) -
                           A(p.grad_coef) * static_cast<A>(x[e]) * sum);
  }
}

Tensor lrn_cuda(const Tensor& input, int64_t size, double alpha, double beta, double k) {
  const Lrn g = lrn_geometry("local_response_norm", input, size);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor x = input.contiguous(lrn_format(g));
  Tensor out = at::empty(x.sizes(), x.options().memory_format(lrn_format(g)));
  if (out.numel() == 0) return out;
  const int64_t total = out.numel();
  const LrnConst p = lrn_const(size, alpha, beta, k);
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.local_response_norm", [&] {
    with_index_type(total, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      with_lrn_pow(p.pow_mode, [&](auto mode) {
        forward_kernel<decltype(mode)::value, scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
            LrnDims<index_t>{static_cast<index_t>(g.C), static_cast<index_t>(g.S), g.channels_last}, p,
            static_cast<index_t>(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

Tensor lrn_backward_cuda(const Tensor& grad_output, const Tensor& input, int64_t size, double alpha, double beta,
                         double k) {
  const Lrn g = lrn_backward_geometry("local_response_norm_backward", grad_output, input, size);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor x = input.contiguous(lrn_format(g));
  const Tensor go = grad_output.contiguous(lrn_format(g));
  Tensor gi = at::empty(x.sizes(), x.options().memory_format(lrn_format(g)));
  if (gi.numel() == 0) return gi;
  const int64_t total = gi.numel();
  const LrnConst p = lrn_const(size, alpha, beta, k);
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.local_response_norm_backward", [&] {
    using A = acc_t<scalar_t>;
    Tensor t = at::empty({total}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
    with_index_type(total, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      const LrnDims<index_t> d{static_cast<index_t>(g.C), static_cast<index_t>(g.S), g.channels_last};
      with_lrn_pow(p.pow_mode, [&](auto mode) {
        constexpr int MODE = decltype(mode)::value;
        backward_t_kernel<MODE, scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), t.mutable_data_ptr<A>(), d, p,
            static_cast<index_t>(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        backward_dx_kernel<MODE, scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), t.const_data_ptr<A>(),
            gi.mutable_data_ptr<scalar_t>(), d, p, static_cast<index_t>(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return gi;
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CUDA, m) {
  m.impl("local_response_norm", &convrnn::lrn_cuda);
  m.impl("local_response_norm_backward", &convrnn::lrn_backward_cuda);
}
