// The C++ autograd nodes' backward (rnn_cells_autograd.cpp, image_ops_autograd.cpp) as
// convrnn_kernels/ops/_common.py's once_differentiable: the backward op runs below the autograd
// keys (it has no derivative; the autograd fallback would only box its arguments), and under
// create_graph (grad mode on inside a backward) the gradients pass through a DelayedError node, so
// that differentiating them raises an error naming the op where torch's fallback would have left
// them constants (second-order gradients silently None or zero).
#pragma once

#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/extension.h>

#include <memory>
#include <string>
#include <utility>

namespace convrnn {

// The message of ops/_common.py's double_backward_message.
inline std::string double_backward_message(const char* op) {
  return std::string("convrnn::") + op +
         ": double backward is not supported (the gradient of its backward, asked for through "
         "create_graph=True, is not implemented)";
}

// gradients() (the node's gradients through its backward op) run below the autograd keys; without
// create_graph they are returned as they are, else as aliases whose grad_fn raises.
template <typename F>
torch::autograd::variable_list once_differentiable(const char* op, const F& gradients) {
  torch::autograd::variable_list grads;
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    grads = gradients();
  }
  if (!at::GradMode::is_enabled()) return grads;
  for (auto& g : grads) {
    if (g.defined()) g = g.detach().requires_grad_(true);
  }
  const auto error = std::make_shared<torch::autograd::DelayedError>(double_backward_message(op),
                                                                     static_cast<int64_t>(grads.size()));
  return (*error)(std::move(grads));
}

}  // namespace convrnn
