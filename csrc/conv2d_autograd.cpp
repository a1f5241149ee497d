// The eager route's autograd of conv2d: a C++ twin of Conv2dFunction
// (convrnn_kernels/ops/conv2d.py), bound to Python as _C.conv2d_autograd.
//
// A small layer's forward+backward on a GPU is timed as host work: on the lent H200 the
// depthwise 3x3 layer's kernels take 107 us a step (cuDNN's: 148) but the step cost 0.32 ms
// against torch's 0.21, the difference being our Python autograd node (Function.apply, the
// Python backward, saved-tensor unpacking) against torch's C++ ConvolutionBackward0.  Same
// saved tensors, same conv2d_backward call with the same output_mask as the Python node, so
// both routes give the same bits (tests/test_conv2d.py); tracing, transforms and subclasses
// keep the registered Python autograd (ops/_common.py: call).
#include <torch/extension.h>

#include <array>
#include <vector>

#include "typed_op.h"

namespace convrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Conv2dFn = Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::IntArrayRef, c10::IntArrayRef,
                        c10::IntArrayRef, int64_t);
using Conv2dBackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                            c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                                            int64_t, std::array<bool, 3>);

const c10::TypedOperatorHandle<Conv2dFn>& conv2d_op() {
  static const c10::TypedOperatorHandle<Conv2dFn> h = typed_op<Conv2dFn>("convrnn::conv2d");
  return h;
}
const c10::TypedOperatorHandle<Conv2dBackwardFn>& conv2d_backward_op() {
  static const c10::TypedOperatorHandle<Conv2dBackwardFn> h = typed_op<Conv2dBackwardFn>("convrnn::conv2d_backward");
  return h;
}

struct Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, const OptTensor& bias,
                        std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                        int64_t groups) {
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = conv2d_op().call(input, weight, bias, stride, padding, dilation, groups);
    }
    ctx->save_for_backward({input, weight});
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["stride"] = std::move(stride);
    ctx->saved_data["padding"] = std::move(padding);
    ctx->saved_data["dilation"] = std::move(dilation);
    ctx->saved_data["groups"] = groups;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // needs_input_grad counts the tensors given: index 2 exists only with a bias
    const bool bias = ctx->saved_data["bias"].toBool();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   bias && ctx->needs_input_grad(2)};
    const variable_list s = ctx->get_saved_variables();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector(),
                               padding = ctx->saved_data["padding"].toIntVector(),
                               dilation = ctx->saved_data["dilation"].toIntVector();
    auto [gi, gw, gb] = conv2d_backward_op().call(grads[0], s[0], s[1], stride, padding, dilation,
                                                  ctx->saved_data["groups"].toInt(), mask);
    return {mask[0] ? gi : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

}  // namespace

void bind_conv2d_autograd(pybind11::module& m) {
  m.def(
      "conv2d_autograd",
      [](const Tensor& input, const Tensor& weight, const OptTensor& bias, std::vector<int64_t> stride,
         std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
        return Conv2dFunction::apply(input, weight, bias, std::move(stride), std::move(padding), std::move(dilation),
                                     groups);
      },
      "convrnn::conv2d with its C++ autograd node (the eager route)");
}

}  // namespace convrnn
