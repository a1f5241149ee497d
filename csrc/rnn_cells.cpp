// Schemas of the fused recurrent-cell ops and the checks their CPU and CUDA wrappers share.
// Only the pointwise part of a cell is an op of ours: the Python wrappers compute the gate
// matrix products with torch (x W_ih^T, h W_hh^T) and autograd differentiates those.
#include "rnn_cells.h"

#include <torch/library.h>

namespace convrnn {

namespace {

void check_states(const char* op, const CellDims& d, const at::Tensor& ref, const char* ref_name,
                  std::initializer_list<NamedTensor> states) {
  for (const auto& [name, t] : states) {
    check_same(op, name, *t, ref_name, ref);
    check_shape(op, name, *t, {d.B, d.H});
  }
}

}  // namespace

CellDims check_cell_gates(const char* op, int64_t gates, const at::Tensor& gates_x, const at::Tensor& gates_h,
                          const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                          std::initializer_list<NamedTensor> states) {
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
  check_states(op, d, gates_x, "gates_x", states);
  return d;
}

CellDims check_cell_backward(const char* op, const at::Tensor& workspace, std::initializer_list<NamedTensor> states) {
  check_floating(op, "workspace", workspace);
  TORCH_CHECK(workspace.dim() == 2 && workspace.size(1) % 4 == 0, "convrnn.", op,
              ": workspace must be the forward's (batch, 4 * hidden_size) workspace, but got shape ", workspace.sizes());
  const CellDims d{workspace.size(0), workspace.size(1) / 4};
  check_states(op, d, workspace, "workspace", states);
  return d;
}

void check_rnn_backward(const char* op, const at::Tensor& grad_hy, const at::Tensor& hy) {
  check_floating(op, "hy", hy);
  TORCH_CHECK(hy.dim() == 2, "convrnn.", op, ": hy must be (batch, hidden_size), but got shape ", hy.sizes());
  check_same(op, "grad_hy", grad_hy, "hy", hy);
  check_shape(op, "grad_hy", grad_hy, hy.sizes());
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
