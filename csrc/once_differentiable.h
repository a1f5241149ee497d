// The C++ autograd nodes' backward (rnn_cells_autograd.cpp, image_ops_autograd.cpp) as
// convrnn_kernels/ops/_common.py's once_differentiable: the backward op runs below the autograd
// keys (it has no derivative; the autograd fallback would only box its arguments), and under
// create_graph (grad mode on inside a backward) the gradients come out with an error node as their
// grad_fn, so that differentiating them raises an error naming the op where torch's fallback would
// have left them constants (second-order gradients silently None or zero).
//
// The error node's next edges are those of the node being evaluated (the forward's inputs) and of
// the incoming gradients: a second-order gradient asked of a weight or an input
// (torch.autograd.grad(penalty, weight), allow_unused or not) reaches the error node and raises,
// where an error node cut off from them (torch.autograd.function.once_differentiable's
// DelayedError over detached copies) leaves the weight unreached: None under allow_unused=True.
#pragma once

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace convrnn {

// The error a double backward through op raises (both routes: ops/_common.py calls
// with_double_backward_error through convrnn_kernels._C).
inline std::string double_backward_message(const std::string& op) {
  return "convrnn::" + op +
         ": double backward is not supported (the gradient of its backward, asked for through "
         "create_graph=True, is not implemented)";
}

// torch 2.14 holds autograd nodes by c10::intrusive_ptr, torch 2.11 by std::shared_ptr.
using NodePtr = decltype(torch::autograd::get_current_node());

template <typename N, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<N>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  }
}

// outputs (a backward's gradients, computed without recording) as aliases whose grad_fn raises
// double_backward_message(op); the error node's next edges: the evaluating node's and those of
// the incoming gradients that require grad.
inline torch::autograd::variable_list with_double_backward_error(const std::string& op,
                                                                 torch::autograd::variable_list outputs,
                                                                 const torch::autograd::variable_list& grads_in) {
  torch::autograd::edge_list edges;
  if (const auto node = torch::autograd::get_current_node()) edges = node->next_edges();
  for (const auto& g : grads_in) {
    if (g.defined() && g.requires_grad()) edges.push_back(torch::autograd::impl::gradient_edge(g));
  }
  const auto error = make_node<torch::autograd::Error>(double_backward_message(op), std::move(edges));
  for (auto& o : outputs) {  // floating gradients, or undefined ones (set_history numbers them too)
    if (o.defined()) o = o.detach();
    torch::autograd::set_history(o, error);
  }
  return outputs;
}

// gradients() (the node's gradients through its backward op) run below the autograd keys; without
// create_graph they are returned as they are, else through with_double_backward_error.
template <typename F>
torch::autograd::variable_list once_differentiable(const char* op, const torch::autograd::variable_list& grads_in,
                                                   const F& gradients) {
  torch::autograd::variable_list grads;
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    grads = gradients();
  }
  if (!at::GradMode::is_enabled()) return grads;
  return with_double_backward_error(op, std::move(grads), grads_in);
}

}  // namespace convrnn
