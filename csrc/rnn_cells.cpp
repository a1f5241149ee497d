// Schemas of the fused recurrent-cell ops and the checks their CPU and CUDA wrappers share.
// Only the pointwise part of a cell is an op of ours: the Python wrappers compute the gate
// matrix products with torch (x W_ih^T, h W_hh^T) and autograd differentiates those.
#include "rnn_cells.h"

#include <torch/library.h>

namespace convrnn {

CellDims check_cell_gates(const char* op, int64_t gates, const at::Tensor& gates_x, const at::Tensor& gates_h,
                          const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  check_floating(op, "gates_x", gates_x);
  TORCH_CHECK(gates_x.dim() == 2 && gates_x.size(1) % gates == 0, "convrnn.", op,
              ": gates_x must be a (batch, ", gates, " * hidden_size) matrix, but got shape ", gates_x.sizes());
  check_same(op, "gates_h", gates_h, "gates_x", gates_x);
  check_shape(op, "gates_h", gates_h, gates_x.sizes());
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "convrnn.", op, ": b_ih and b_hh must be given together");
  const CellDims d{gates_x.size(0), gates_x.size(1) / gates};
  for (const auto& [name, b] : {std::pair<const char*, const std::optional<at::Tensor>&>{"b_ih", b_ih}, {"b_hh", b_hh}}) {
    if (b.has_value()) {
      check_same(op, name, *b, "gates_x", gates_x);
      check_shape(op, name, *b, {gates * d.H});
    }
  }
  return d;
}

CellDims check_workspace(const char* op, const at::Tensor& workspace) {
  check_floating(op, "workspace", workspace);
  TORCH_CHECK(workspace.dim() == 2 && workspace.size(1) % 4 == 0, "convrnn.", op,
              ": workspace must be the forward's (batch, 4 * hidden_size) workspace, but got shape ", workspace.sizes());
  return {workspace.size(0), workspace.size(1) / 4};
}

void check_state(const char* op, const char* arg, const at::Tensor& t, const CellDims& d, const at::Tensor& ref) {
  check_same(op, arg, t, "gates_x", ref);
  check_shape(op, arg, t, {d.B, d.H});
}

}  // namespace convrnn

TORCH_LIBRARY_FRAGMENT(convrnn, m) {
  // workspace = the activated gates i, f, g, o: all the backward needs besides c and c'.
  m.def("lstm_cell_fused(Tensor gates_x, Tensor gates_h, Tensor cx, Tensor? b_ih, Tensor? b_hh) "
        "-> (Tensor hy, Tensor cy, Tensor workspace)");
  m.def("lstm_cell_fused_backward(Tensor? grad_hy, Tensor? grad_cy, Tensor cx, Tensor cy, Tensor workspace) "
        "-> (Tensor grad_gates, Tensor grad_cx)");
  // workspace = r, z, n and the hidden-side n pre-activation (with its bias).
  m.def("gru_cell_fused(Tensor gates_x, Tensor gates_h, Tensor hx, Tensor? b_ih, Tensor? b_hh) "
        "-> (Tensor hy, Tensor workspace)");
  m.def("gru_cell_fused_backward(Tensor grad_hy, Tensor hx, Tensor workspace) "
        "-> (Tensor grad_gates_x, Tensor grad_gates_h, Tensor grad_hx)");
  m.def("rnn_cell_fused(Tensor gates_x, Tensor gates_h, Tensor? b_ih, Tensor? b_hh, bool relu) -> Tensor");
  m.def("rnn_cell_fused_backward(Tensor grad_hy, Tensor hy, bool relu) -> Tensor");
}
