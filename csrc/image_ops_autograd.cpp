// The eager route's autograd of the image ops: C++ twins of Conv2dFunction,
// MaxPool2dFunction, AvgPool2dFunction and LocalResponseNormFunction (convrnn_kernels/ops/),
// bound to Python as _C.conv2d_autograd, max_pool2d_autograd, avg_pool2d_autograd and
// local_response_norm_autograd.
//
// A small layer's forward+backward on a GPU is timed as host work: on the lent H200 the
// depthwise 3x3 layer's kernels take 107 us a step (cuDNN's: 148) but the step cost 0.32 ms
// against torch's 0.21, the difference being our Python autograd node (Function.apply, the
// Python backward, saved-tensor unpacking) against torch's C++ nodes.  Each twin saves the same
// tensors and calls the same backward op with the same arguments as its Python node, so both
// routes give the same bits (tests); tracing, transforms and subclasses keep the registered
// Python autograd (ops/_common.py: call).  Integer lists travel as std::vector<int64_t>.
#include <torch/extension.h>

#include <array>
#include <optional>
#include <vector>

#include "once_differentiable.h"
#include "typed_op.h"

namespace convrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Ints = std::vector<int64_t>;
using c10::IntArrayRef;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Conv2dFn = Tensor(const Tensor&, const Tensor&, const OptTensor&, IntArrayRef, IntArrayRef, IntArrayRef, int64_t);
using Conv2dBackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, IntArrayRef,
                                                            IntArrayRef, IntArrayRef, int64_t, std::array<bool, 3>);
using MaxPoolFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef,
                                                     bool, bool, bool);
using MaxPoolBackwardFn = Tensor(const Tensor&, const Tensor&, const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef,
                                 IntArrayRef, bool);
using AvgPoolFn = Tensor(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool, bool, std::optional<int64_t>);
using AvgPoolBackwardFn = Tensor(const Tensor&, const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool, bool,
                                 std::optional<int64_t>);
using LrnFn = Tensor(const Tensor&, int64_t, double, double, double);
using LrnBackwardFn = Tensor(const Tensor&, const Tensor&, int64_t, double, double, double);

CONVRNN_OP_HANDLE(conv2d_op, Conv2dFn, "convrnn::conv2d")
CONVRNN_OP_HANDLE(conv2d_backward_op, Conv2dBackwardFn, "convrnn::conv2d_backward")
CONVRNN_OP_HANDLE(max_pool_op, MaxPoolFn, "convrnn::max_pool2d")
CONVRNN_OP_HANDLE(max_pool_backward_op, MaxPoolBackwardFn, "convrnn::max_pool2d_backward")
CONVRNN_OP_HANDLE(avg_pool_op, AvgPoolFn, "convrnn::avg_pool2d")
CONVRNN_OP_HANDLE(avg_pool_backward_op, AvgPoolBackwardFn, "convrnn::avg_pool2d_backward")
CONVRNN_OP_HANDLE(lrn_op, LrnFn, "convrnn::local_response_norm")
CONVRNN_OP_HANDLE(lrn_backward_op, LrnBackwardFn, "convrnn::local_response_norm_backward")

Ints ints(AutogradContext* ctx, const char* key) { return ctx->saved_data[key].toIntVector(); }

// The pools' window arguments, saved under their names for ints().
void save_window(AutogradContext* ctx, Ints kernel, Ints stride, Ints padding, bool ceil_mode) {
  ctx->saved_data["kernel"] = std::move(kernel);
  ctx->saved_data["stride"] = std::move(stride);
  ctx->saved_data["padding"] = std::move(padding);
  ctx->saved_data["ceil_mode"] = ceil_mode;
}

// The forward's gradients: the input's, then `rest` undefined ones (non-tensor arguments).
variable_list input_grad(Tensor g, size_t rest) {
  variable_list out(1 + rest);
  out[0] = std::move(g);
  return out;
}

struct Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, const OptTensor& bias,
                        Ints stride, Ints padding, Ints dilation, int64_t groups) {
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
    return once_differentiable("conv2d", grads, [&] { return gradients(ctx, grads); });
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    // needs_input_grad counts the tensors given: index 2 exists only with a bias
    const bool bias = ctx->saved_data["bias"].toBool();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   bias && ctx->needs_input_grad(2)};
    const variable_list s = ctx->get_saved_variables();
    auto [gi, gw, gb] = conv2d_backward_op().call(grads[0], s[0], s[1], ints(ctx, "stride"), ints(ctx, "padding"),
                                                  ints(ctx, "dilation"), ctx->saved_data["groups"].toInt(), mask);
    return {mask[0] ? gi : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

struct MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, Ints kernel, Ints stride, Ints padding,
                               Ints dilation, bool ceil_mode, bool return_indices, bool save_argmax) {
    std::tuple<Tensor, Tensor, Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = max_pool_op().call(input, kernel, stride, padding, dilation, ceil_mode, return_indices, save_argmax);
    }
    const auto& [y, indices, argmax] = out;
    ctx->save_for_backward({input, argmax});
    ctx->mark_non_differentiable({indices, argmax});
    save_window(ctx, std::move(kernel), std::move(stride), std::move(padding), ceil_mode);
    ctx->saved_data["dilation"] = std::move(dilation);
    return {y, indices, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return once_differentiable("max_pool2d", grads, [&] { return gradients(ctx, grads); });
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    const variable_list s = ctx->get_saved_variables();
    return input_grad(max_pool_backward_op().call(grads[0], s[0], s[1], ints(ctx, "kernel"), ints(ctx, "stride"),
                                                  ints(ctx, "padding"), ints(ctx, "dilation"),
                                                  ctx->saved_data["ceil_mode"].toBool()),
                      7);
  }
};

struct AvgPool2dFunction : public torch::autograd::Function<AvgPool2dFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, Ints kernel, Ints stride, Ints padding,
                        bool ceil_mode, bool count_include_pad, std::optional<int64_t> divisor_override) {
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = avg_pool_op().call(input, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override);
    }
    ctx->save_for_backward({input});
    save_window(ctx, std::move(kernel), std::move(stride), std::move(padding), ceil_mode);
    ctx->saved_data["count_include_pad"] = count_include_pad;
    ctx->saved_data["divisor_override"] = divisor_override;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return once_differentiable("avg_pool2d", grads, [&] { return gradients(ctx, grads); });
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    const variable_list s = ctx->get_saved_variables();
    const c10::IValue& div = ctx->saved_data["divisor_override"];
    return input_grad(avg_pool_backward_op().call(grads[0], s[0], ints(ctx, "kernel"), ints(ctx, "stride"),
                                                  ints(ctx, "padding"), ctx->saved_data["ceil_mode"].toBool(),
                                                  ctx->saved_data["count_include_pad"].toBool(),
                                                  div.isNone() ? std::nullopt : std::optional<int64_t>(div.toInt())),
                      6);
  }
};

struct LrnFunction : public torch::autograd::Function<LrnFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, int64_t size, double alpha, double beta, double k) {
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = lrn_op().call(input, size, alpha, beta, k);
    }
    ctx->save_for_backward({input});
    ctx->saved_data["size"] = size;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["k"] = k;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return once_differentiable("local_response_norm", grads, [&] { return gradients(ctx, grads); });
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    const variable_list s = ctx->get_saved_variables();
    return input_grad(lrn_backward_op().call(grads[0], s[0], ctx->saved_data["size"].toInt(),
                                             ctx->saved_data["alpha"].toDouble(), ctx->saved_data["beta"].toDouble(),
                                             ctx->saved_data["k"].toDouble()),
                      4);
  }
};

}  // namespace

void bind_image_autograd(pybind11::module& m) {
  m.def(
      "conv2d_autograd",
      [](const Tensor& input, const Tensor& weight, const OptTensor& bias, Ints stride, Ints padding, Ints dilation,
         int64_t groups) {
        return Conv2dFunction::apply(input, weight, bias, std::move(stride), std::move(padding), std::move(dilation),
                                     groups);
      },
      "convrnn::conv2d with its C++ autograd node (the eager route)");
  m.def(
      "max_pool2d_autograd",
      [](const Tensor& input, Ints kernel, Ints stride, Ints padding, Ints dilation, bool ceil_mode,
         bool return_indices, bool save_argmax) {
        const variable_list out = MaxPool2dFunction::apply(input, std::move(kernel), std::move(stride),
                                                           std::move(padding), std::move(dilation), ceil_mode,
                                                           return_indices, save_argmax);
        return std::make_tuple(out[0], out[1], out[2]);
      },
      "convrnn::max_pool2d with its C++ autograd node (the eager route)");
  m.def(
      "avg_pool2d_autograd",
      [](const Tensor& input, Ints kernel, Ints stride, Ints padding, bool ceil_mode, bool count_include_pad,
         std::optional<int64_t> divisor_override) {
        return AvgPool2dFunction::apply(input, std::move(kernel), std::move(stride), std::move(padding), ceil_mode,
                                        count_include_pad, divisor_override);
      },
      "convrnn::avg_pool2d with its C++ autograd node (the eager route)");
  m.def(
      "local_response_norm_autograd",
      [](const Tensor& input, int64_t size, double alpha, double beta, double k) {
        return LrnFunction::apply(input, size, alpha, beta, k);
      },
      "convrnn::local_response_norm with its C++ autograd node (the eager route)");
}

}  // namespace convrnn
