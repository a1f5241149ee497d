// Schema of conv2d and the argument checks its CPU and CUDA wrappers share.
#include "conv2d.h"
#include "switches.h"

#include <torch/library.h>

namespace convrnn {

Conv2d conv2d_geometry(const char* op, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input.dim() == 4, "convrnn.", op, ": input must be a 4-D (N, C, H, W) tensor, but got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4, "convrnn.", op,
              ": weight must be a 4-D (out_channels, in_channels/groups, kH, kW) tensor, but got shape ",
              weight.sizes());
  check_floating(op, "input", input);
  check_same(op, "weight", weight, "input", input);
  check_window_args(op, stride, padding, dilation);
  TORCH_CHECK(groups > 0, "convrnn.", op, ": groups must be greater than zero, but got ", groups);

  Conv2d g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.K = weight.size(0);
  g.R = weight.size(2);
  g.S = weight.size(3);
  g.groups = groups;
  TORCH_CHECK(g.C > 0 && g.H > 0 && g.W > 0, "convrnn.", op,
              ": input must have non-zero channels, height and width (only the batch may be empty), but got shape ",
              input.sizes());
  TORCH_CHECK(g.K > 0 && g.R > 0 && g.S > 0, "convrnn.", op,
              ": weight must have non-zero out_channels, kH and kW, but got shape ", weight.sizes());
  TORCH_CHECK(g.C % groups == 0, "convrnn.", op, ": input channels (", g.C, ") must be divisible by groups (",
              groups, ")");
  TORCH_CHECK(g.K % groups == 0, "convrnn.", op, ": weight out_channels (", g.K,
              ") must be divisible by groups (", groups, ")");
  g.Cg = g.C / groups;
  g.Kg = g.K / groups;
  TORCH_CHECK(weight.size(1) == g.Cg, "convrnn.", op, ": weight of shape ", weight.sizes(), " expects ",
              weight.size(1) * groups, " input channels (weight.size(1) * groups), but input has ", g.C,
              " channels (shape ", input.sizes(), ")");
  if (bias.has_value() && bias->defined()) {
    check_same(op, "bias", *bias, "input", input);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.K, "convrnn.", op, ": bias must have shape (", g.K,
                ",) (one per output channel), but got shape ", bias->sizes());
  }
  set_window_args(g, stride, padding, dilation);
  const int64_t eh = g.dh * (g.R - 1) + 1, ew = g.dw * (g.S - 1) + 1;
  TORCH_CHECK(eh <= g.H + 2 * g.ph && ew <= g.W + 2 * g.pw, "convrnn.", op, ": kernel size (", eh, ", ", ew,
              ") (dilated) is larger than the padded input (", g.H + 2 * g.ph, ", ", g.W + 2 * g.pw, ")");
  g.P = conv_output_size(g.H, g.R, g.sh, g.ph, g.dh);
  g.Q = conv_output_size(g.W, g.S, g.sw, g.pw, g.dw);
  // A dimension with one output does not depend on its stride: 1 stands in for it, so that no
  // buffer or table the kernels size by the stride (the CPU kernels' row slack, the backward's
  // phases) grows with a stride far past the input, which torch accepts.
  if (g.P == 1) g.sh = 1;
  if (g.Q == 1) g.sw = 1;
  const bool cl = image_format(input) == at::MemoryFormat::ChannelsLast ||
                  weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  g.format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return g;
}

Conv2d conv2d_backward_geometry(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups) {
  const Conv2d g = conv2d_geometry(op, input, weight, std::nullopt, stride, padding, dilation, groups);
  check_same(op, "grad_output", grad_output, "input", input);
  check_shape(op, "grad_output", grad_output, g.output_sizes());
  return g;
}

at::Tensor conv2d_empty(const Conv2d& g, const std::vector<int64_t>& sizes, const at::TensorOptions& opts) {
  return at::empty(sizes, opts.memory_format(g.format));
}

at::Tensor conv2d_not_needed(const at::TensorOptions& opts) {
  return at::empty({0}, opts);
}

std::atomic<int>& conv_r3_mode() {
  static std::atomic<int> mode(env_mode("CONVRNN_CONV_R3", 1));
  return mode;
}

std::atomic<int64_t>& conv_r3_launches() {
  static std::atomic<int64_t> n{0};
  return n;
}

std::atomic<int>& conv_dw_vec_mode() {
  static std::atomic<int> mode(env_mode("CONVRNN_DW_VEC", 2));
  return mode;
}

std::atomic<int64_t>& conv_dw_vec_launches() {
  static std::atomic<int64_t> n{0};
  return n;
}

}  // namespace convrnn

TORCH_LIBRARY_FRAGMENT(convrnn, m) {
  m.def("_conv2d_r3(int mode=-1) -> (int, int)", [](int64_t mode) {
    return convrnn::switch_op("_conv2d_r3", convrnn::conv_r3_mode(), convrnn::conv_r3_launches(), mode, 1);
  });
  m.def("_conv2d_dw_vec(int mode=-1) -> (int, int)", [](int64_t mode) {
    return convrnn::switch_op("_conv2d_dw_vec", convrnn::conv_dw_vec_mode(), convrnn::conv_dw_vec_launches(), mode, 2,
                              "2 (on, 8 outputs a thread)");
  });
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups) -> Tensor");
  m.def("conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
