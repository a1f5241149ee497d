// conv2d CUDA: depthwise convolution (groups == C, Cg == 1; K = C * Kg), direct.
//
// Forward: one thread per output element in the output's memory order (NCHW: q fastest;
// channels_last: k fastest), so neighbouring threads read neighbouring inputs; the window's
// taps inside the image come from conv_taps (no per-tap bounds test).  Input read through
// its strides: no copy of a non-contiguous or NCHW/NHWC input.
// Backward data: one thread per input element gathers its Kg * R * S contributions
// (conv_source) in a fixed order.
// Backward weight (and bias, as one more "tap" whose input is 1): split-K over the output
// pixels in chunks fixed by the shape; channels_last: one thread per (chunk, tap, k) walks its
// chunk (k fastest: coalesced); NCHW: one warp per (chunk, k, tap), lanes over consecutive
// pixels, then a fixed-order shuffle reduction.  A last kernel sums the chunks in order.
// Deterministic, no atomics.
#include "cuda/conv2d_cuda.h"
#include "cuda/conv2d_depthwise.cuh"
#include "cuda/conv2d_plan.cuh"

namespace convrnn {
namespace {

using at::Tensor;
using namespace dwconv;

DwGeom dw_geom(const Conv2d& g, const Tensor& t) {
  return DwGeom{g.N,  g.K,  g.H,  g.W,  g.P,  g.Q,  g.R,  g.S,  g.Kg, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
                t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

}  // namespace

void depthwise_forward_cuda(const Conv2d& g, const Tensor& input, const Tensor& weight, const Tensor& bias, Tensor& out,
                            cudaStream_t stream) {
  const Tensor w = weight.contiguous();  // [K][1][R][S]
  const int64_t total = out.numel();
  CONVRNN_DISPATCH_FLOATING(input.scalar_type(), "convrnn.conv2d", [&] {
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    with_index_type(total, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      if (g.channels_last()) {
        dw_forward_kernel<scalar_t, true, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b, out.mutable_data_ptr<scalar_t>(),
            dw_geom(g, input), static_cast<index_t>(total));
      } else {
        dw_forward_kernel<scalar_t, false, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b, out.mutable_data_ptr<scalar_t>(),
            dw_geom(g, input), static_cast<index_t>(total));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void depthwise_backward_data_cuda(const Conv2d& g, const Tensor& grad_output, const Tensor& weight, Tensor& grad_input,
                                  cudaStream_t stream) {
  const Tensor w = weight.contiguous();
  const int64_t total = grad_input.numel();
  CONVRNN_DISPATCH_FLOATING(grad_output.scalar_type(), "convrnn.conv2d_backward", [&] {
    with_index_type(total, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      if (g.channels_last()) {
        dw_backward_data_kernel<scalar_t, true, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            grad_input.mutable_data_ptr<scalar_t>(), dw_geom(g, grad_output), static_cast<index_t>(total));
      } else {
        dw_backward_data_kernel<scalar_t, false, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            grad_input.mutable_data_ptr<scalar_t>(), dw_geom(g, grad_output), static_cast<index_t>(total));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void depthwise_backward_weight_cuda(const Conv2d& g, const Tensor& grad_output, const Tensor& input,
                                    Tensor& grad_weight, Tensor& grad_bias, cudaStream_t stream) {
  DwGradGeom gg{dw_geom(g, input), grad_output.stride(0), grad_output.stride(1), grad_output.stride(2),
                grad_output.stride(3), g.N * g.P * g.Q, 0, 0, static_cast<int>(g.R * g.S + 1)};
  const bool cl = g.channels_last();
  const int64_t outputs = gg.taps * g.K;
  // Fixed by the shape: about 2^17 threads (channels_last) or 2^14 warps (NCHW) of work.
  const conv::Chunks ch = conv::split_chunks(gg.pixels, outputs, cl ? (int64_t(1) << 17) : (int64_t(1) << 14),
                                             cl ? 64 : 256, 1, 1024);
  gg.chunk_len = ch.len;
  gg.chunks = ch.count;
  const Tensor part = at::empty({ch.count, gg.taps, g.K},
                                input.options().dtype(at::toOpMathType(input.scalar_type())));
  CONVRNN_DISPATCH_FLOATING(input.scalar_type(), "convrnn.conv2d_backward", [&] {
    using A = acc_t<scalar_t>;
    const int64_t items = ch.count * outputs;
    if (cl) {
      dw_wgrad_thread_kernel<scalar_t><<<blocks_for(items), kThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), part.mutable_data_ptr<A>(), gg,
          items);
    } else {
      dw_wgrad_warp_kernel<scalar_t><<<blocks_for(items * 32), kThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), part.mutable_data_ptr<A>(), gg,
          items);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scalar_t* gw = grad_weight.defined() ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gb = grad_bias.defined() ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t sk = grad_weight.defined() ? grad_weight.stride(0) : 0;
    const int64_t sr = grad_weight.defined() ? grad_weight.stride(2) : 0;
    const int64_t ss = grad_weight.defined() ? grad_weight.stride(3) : 0;
    dw_wgrad_reduce_kernel<scalar_t><<<blocks_for(outputs), kThreads, 0, stream>>>(part.const_data_ptr<A>(), gw, gb,
                                                                                   sk, sr, ss, gg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace convrnn
