// The eager route's autograd of the whole-cell ops: C++ twins of LstmCellFunction,
// GruCellFunction and RnnCellFunction (convrnn_kernels/ops/rnn_cells.py), bound to Python as
// _C.lstm_cell_autograd, gru_cell_autograd, rnn_cell_autograd.
//
// A cell step is small: at batch 1 the Python autograd node (Function.apply, the Python
// backward, saved-tensor unpacking) cost as much as the rest of the step together (fwd+bwd
// ~125 us against ~62 us with this C++ node, 2-core CPU).  So plain eager calls with a gradient
// (ops/_common.py, call) apply these Functions; tracing, transforms and tensor subclasses keep
// the ops' registered Python autograd.  Both save the same tensors and call the same backward
// op with the same output_mask, so their results are identical (tests/test_rnn_cells.py).
//
// Forward runs the op below the autograd keys (device-agnostic: the dispatcher picks the CPU or
// CUDA kernel).  needs_input_grad counts only the tensors given, so the biases' entries exist
// only when they do (both or neither: the forward checks).
#include <torch/extension.h>

#include <array>

#include "once_differentiable.h"
#include "typed_op.h"

namespace convrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LstmFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, const OptTensor&, const OptTensor&);
using LstmBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, std::array<bool, 7>);
using GruFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                         const OptTensor&, bool);
using Grads6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using GruBackwardFn = Grads6(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             std::array<bool, 6>);
using RnnFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                     bool);
using RnnBackwardFn = Grads6(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             bool, std::array<bool, 6>);

CONVRNN_OP_HANDLE(lstm_op, LstmFn, "convrnn::lstm_cell")
CONVRNN_OP_HANDLE(lstm_backward_op, LstmBackwardFn, "convrnn::lstm_cell_backward")
CONVRNN_OP_HANDLE(gru_op, GruFn, "convrnn::gru_cell")
CONVRNN_OP_HANDLE(gru_backward_op, GruBackwardFn, "convrnn::gru_cell_backward")
CONVRNN_OP_HANDLE(rnn_op, RnnFn, "convrnn::rnn_cell")
CONVRNN_OP_HANDLE(rnn_backward_op, RnnBackwardFn, "convrnn::rnn_cell_backward")

// output_mask of a backward op: `n` leading tensors (input, states, weights), then the biases.
template <size_t N>
std::array<bool, N> grad_mask(const AutogradContext* ctx, bool bias) {
  std::array<bool, N> mask{};
  for (size_t i = 0; i < N; ++i) mask[i] = (i < N - 2 || bias) && ctx->needs_input_grad(i);
  return mask;
}

// The gradients of the forward's arguments (`extra` non-tensor ones after them): the backward
// op's results where the mask asked for them, undefined elsewhere.
template <size_t N, typename Tuple>
variable_list masked(const Tuple& grads, const std::array<bool, N>& mask, size_t extra) {
  variable_list out(N + extra);
  std::apply(
      [&](const auto&... g) {
        size_t i = 0;
        ((out[i] = mask[i] ? g : Tensor(), ++i), ...);
      },
      grads);
  return out;
}

OptTensor given(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

struct LstmCellFunction : public torch::autograd::Function<LstmCellFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx, const Tensor& cx,
                               const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
    std::tuple<Tensor, Tensor, Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = lstm_op().call(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
    }
    const auto& [hy, cy, ws] = out;
    ctx->save_for_backward({input, hx, cx, w_ih, w_hh, cy, ws});
    ctx->mark_non_differentiable({ws});
    ctx->set_materialize_grads(false);  // no zero (B, 4H) gradient for the workspace
    ctx->saved_data["bias"] = b_ih.has_value();
    return {hy, cy, ws};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return once_differentiable("lstm_cell", grads, [&] { return gradients(ctx, grads); });
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(7);
    const auto mask = grad_mask<7>(ctx, ctx->saved_data["bias"].toBool());
    const variable_list s = ctx->get_saved_variables();
    return masked(lstm_backward_op()
                      .call(given(grads[0]), given(grads[1]), s[0], s[1], s[2], s[3], s[4], s[5], s[6], mask),
                  mask, 0);
  }
};

struct GruCellFunction : public torch::autograd::Function<GruCellFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, bool need_backward) {
    std::tuple<Tensor, Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = gru_op().call(input, hx, w_ih, w_hh, b_ih, b_hh, need_backward);
    }
    const auto& [hy, ws] = out;
    ctx->save_for_backward({input, hx, w_ih, w_hh, ws});
    ctx->mark_non_differentiable({ws});
    ctx->set_materialize_grads(false);
    ctx->saved_data["bias"] = b_ih.has_value();
    return {hy, ws};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return once_differentiable("gru_cell", grads, [&] { return gradients(ctx, grads); });
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    if (!grads[0].defined()) return variable_list(7);
    const auto mask = grad_mask<6>(ctx, ctx->saved_data["bias"].toBool());
    const variable_list s = ctx->get_saved_variables();
    return masked(
        gru_backward_op().call(grads[0], s[0], s[1], s[2], s[3], s[4], mask),
        mask, 1);
  }
};

struct RnnCellFunction : public torch::autograd::Function<RnnCellFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                        const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, bool relu) {
    Tensor hy;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      hy = rnn_op().call(input, hx, w_ih, w_hh, b_ih, b_hh, relu);
    }
    ctx->save_for_backward({input, hx, w_ih, w_hh, hy});
    ctx->saved_data["bias"] = b_ih.has_value();
    ctx->saved_data["relu"] = relu;
    return hy;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return once_differentiable("rnn_cell", grads, [&] { return gradients(ctx, grads); });
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    const auto mask = grad_mask<6>(ctx, ctx->saved_data["bias"].toBool());
    const variable_list s = ctx->get_saved_variables();
    return masked(rnn_backward_op()
                      .call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["relu"].toBool(), mask),
                  mask, 1);
  }
};

}  // namespace

void bind_cell_autograd(pybind11::module& m) {
  m.def(
      "lstm_cell_autograd",
      [](const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
         const OptTensor& b_ih, const OptTensor& b_hh) {
        const variable_list out = LstmCellFunction::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
        return std::make_tuple(out[0], out[1], out[2]);
      },
      "convrnn::lstm_cell with its C++ autograd node (the eager route)");
  m.def(
      "gru_cell_autograd",
      [](const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
         const OptTensor& b_hh, bool need_backward) {
        const variable_list out = GruCellFunction::apply(input, hx, w_ih, w_hh, b_ih, b_hh, need_backward);
        return std::make_tuple(out[0], out[1]);
      },
      "convrnn::gru_cell with its C++ autograd node (the eager route)");
  m.def(
      "rnn_cell_autograd",
      [](const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
         const OptTensor& b_hh, bool relu) { return RnnCellFunction::apply(input, hx, w_ih, w_hh, b_ih, b_hh, relu); },
      "convrnn::rnn_cell with its C++ autograd node (the eager route)");
}

}  // namespace convrnn
