// conv2d CUDA: what the host wrappers (conv2d.cu) call in the other translation units.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "conv2d.h"

namespace convrnn {

// Depthwise (groups == C, one input channel per group, K = C * multiplier), any layout and
// strides of input / grad_output; out / grad_input are dense in g.format.
void depthwise_forward_cuda(const Conv2d& g, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, at::Tensor& out, cudaStream_t stream);
void depthwise_backward_data_cuda(const Conv2d& g, const at::Tensor& grad_output, const at::Tensor& weight,
                                  at::Tensor& grad_input, cudaStream_t stream);
// grad_weight and/or grad_bias (undefined when not wanted); N > 0.
void depthwise_backward_weight_cuda(const Conv2d& g, const at::Tensor& grad_output, const at::Tensor& input,
                                    at::Tensor& grad_weight, at::Tensor& grad_bias, cudaStream_t stream);

// t as a channels_last-contiguous tensor: t itself when it already is one, an NCHW-contiguous
// 4-D t copied by layout.cu's kernels, anything else by torch's copy.
at::Tensor channels_last_cuda(const at::Tensor& t, cudaStream_t stream);

}  // namespace convrnn
