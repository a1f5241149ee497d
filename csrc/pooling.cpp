// Schemas of the pooling ops and the argument checks their CPU and CUDA wrappers share.
#include "max_pool2d.h"
#include "pooling.h"

#include <torch/library.h>

namespace convrnn {

Pool2d pool2d_geometry(const char* op, const at::Tensor& input, at::IntArrayRef kernel_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       bool ceil_mode) {
  TORCH_CHECK(input.dim() == 3 || input.dim() == 4, "convrnn.", op,
              ": input must be a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, but got shape ", input.sizes());
  const bool batched = input.dim() == 4;
  const int64_t off = batched ? 1 : 0;
  TORCH_CHECK(input.size(off) > 0 && input.size(off + 1) > 0 && input.size(off + 2) > 0, "convrnn.", op,
              ": input must have non-zero channels, height and width (only the batch may be empty), but got shape ",
              input.sizes());
  check_floating(op, "input", input);
  check_pair(op, "kernel_size", kernel_size);
  TORCH_CHECK(kernel_size[0] > 0 && kernel_size[1] > 0, "convrnn.", op,
              ": kernel_size must be greater than zero, but got ", pair_str(kernel_size));
  check_window_args(op, stride, padding, dilation);
  TORCH_CHECK(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, "convrnn.", op,
              ": padding must be at most half of kernel_size, but got padding ", pair_str(padding), " for kernel_size ",
              pair_str(kernel_size));

  Pool2d g;
  g.batched = batched;
  g.N = batched ? input.size(0) : 1;
  g.C = input.size(off);
  g.H = input.size(off + 1);
  g.W = input.size(off + 2);
  g.kh = kernel_size[0];
  g.kw = kernel_size[1];
  set_window_args(g, stride, padding, dilation);
  g.OH = pool_output_size(g.H, g.kh, g.sh, g.ph, g.dh, ceil_mode);
  g.OW = pool_output_size(g.W, g.kw, g.sw, g.pw, g.dw, ceil_mode);
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "convrnn.", op, ": input of size ", g.H, "x", g.W,
              " is too small for kernel_size ", pair_str(kernel_size), " with padding ", pair_str(padding),
              " and dilation ", pair_str(dilation), ": the output would be ", g.OH, "x", g.OW);
  g.format = image_format(input);
  return g;
}

Pool2d pool2d_backward_geometry(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, bool ceil_mode) {
  Pool2d g = pool2d_geometry(op, input, kernel_size, stride, padding, dilation, ceil_mode);
  check_same(op, "grad_output", grad_output, "input", input);
  check_shape(op, "grad_output", grad_output, g.output_sizes());
  return g;
}

Pool2d max_pool2d_backward_geometry(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& argmax,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "max_pool2d_backward";
  const Pool2d g =
      pool2d_backward_geometry(op, grad_output, input, kernel_size, stride, padding, dilation, ceil_mode);
  TORCH_CHECK(argmax.sizes() == grad_output.sizes(), "convrnn.", op,
              ": argmax must be the forward's saved argmax (max_pool2d with save_argmax=True), of shape ",
              grad_output.sizes(), ", but got shape ", argmax.sizes());
  TORCH_CHECK_TYPE(argmax.scalar_type() == argmax_dtype(g), "convrnn.", op, ": argmax must have dtype ",
                   argmax_dtype(g), ", but got ", argmax.scalar_type());
  TORCH_CHECK(argmax.device() == grad_output.device(), "convrnn.", op, ": argmax is on ", argmax.device(),
              " but grad_output is on ", grad_output.device(), "; expected all tensors on one device");
  return g;
}

at::Tensor empty_argmax(const Pool2d& g, const at::TensorOptions& opts, bool wanted) {
  return wanted ? pool2d_empty(g, g.output_sizes(), opts.dtype(argmax_dtype(g))) : at::empty({0}, opts.dtype(argmax_dtype(g)));
}

at::Tensor pool2d_empty(const Pool2d& g, std::vector<int64_t> sizes, const at::TensorOptions& opts) {
  return at::empty(sizes, opts.memory_format(kernel_format(g)));
}

}  // namespace convrnn

TORCH_LIBRARY_FRAGMENT(convrnn, m) {
  // Returns (output, indices, argmax): indices (int64, torch's) only when return_indices,
  // argmax (the window-local tap numbers the backward reads) only when save_argmax; each is
  // an empty tensor otherwise.
  m.def(
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode, bool return_indices, bool save_argmax) -> (Tensor, Tensor, Tensor)");
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor input, Tensor argmax, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
  m.def(
      "avg_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
      "bool count_include_pad, int? divisor_override) -> Tensor");
  m.def(
      "avg_pool2d_backward(Tensor grad_output, Tensor input, int[2] kernel_size, int[2] stride, "
      "int[2] padding, bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
}
