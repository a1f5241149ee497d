// Recurrent-cell ops: their schemas, the argument checks the CPU and CUDA wrappers share, and
// the whole-cell ops' C++ (the same for every device).
//
// Two families of ops:
// - the fused pointwise ops (lstm_cell_fused, gru_cell_fused, rnn_cell_fused and backward):
//   everything of a step after its gate products; the sequence layers (rnn_layers.cpp) call
//   them per step.
// - the whole-cell ops (lstm_cell, gru_cell, rnn_cell and backward): one step, gate products
//   included, so that a cell step is one autograd node and one C++ call.  Forward: the gate
//   products accumulate into one buffer (bias added by the kernel), then the device's fused
//   kernel (CellKernels, rnn_cells.h) turns that buffer into the saved workspace in place.
//   Backward: the fused backward kernel (bias gradients summed in it), then the matrix
//   products of the gradients output_mask asks for.
//   The products are the device's too (CellKernels::products): at::mm on CUDA (cuBLAS), BLAS
//   called directly and split over the threads on the CPU (cpu/rnn_cell_products.cpp); half
//   types accumulate in float either way.  The eager route's autograd node for these ops is
//   C++ (rnn_cells_autograd.cpp).
#include "rnn_cells.h"

#include <array>
#include <string>

namespace convrnn {

using at::Tensor;

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

namespace {

// ---- whole-cell ops: argument checks ----

// A shape as Python prints a tuple: the messages are those of torch.nn's cells' Python checks.
std::string py_shape(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// The geometry of a cell step: batch (1 for unbatched input), input and hidden size.
struct Cell {
  int64_t B, I, H;
  bool batched;
};

// Checks a whole-cell op's arguments as torch.nn's cells would, with messages that name the op
// and the argument: one dtype and device, a (batch, input_size) or unbatched input, weights of
// `gates` blocks of hidden_size rows, biases both or neither, states (batch, hidden_size).
Cell check_cell(const char* op, int64_t gates, const Tensor& input, std::initializer_list<NamedTensor> states,
                const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  std::initializer_list<NamedTensor> weights = {{"w_ih", &w_ih}, {"w_hh", &w_hh}};
  for (const auto* group : {&weights, &states}) {
    for (const auto& [name, t] : *group) check_same(op, name, *t, "input", input);
  }
  for (const auto& [name, b] : {std::pair<const char*, const OptTensor&>{"b_ih", b_ih}, {"b_hh", b_hh}}) {
    if (b.has_value()) check_same(op, name, *b, "input", input);
  }
  check_floating(op, "input", input);
  TORCH_CHECK(input.dim() == 1 || input.dim() == 2, "convrnn.", op,
              ": input must be 1-D (input_size) or 2-D (batch, input_size), but got shape ", py_shape(input.sizes()));
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2, "convrnn.", op, ": w_ih and w_hh must be 2-D, but got shapes ",
              py_shape(w_ih.sizes()), " and ", py_shape(w_hh.sizes()));
  const int64_t H = w_hh.size(1);
  for (const auto& [name, w] : {NamedTensor{"w_hh", &w_hh}, NamedTensor{"w_ih", &w_ih}}) {
    TORCH_CHECK(w->size(0) == gates * H, "convrnn.", op, ": ", name, " must have ", gates,
                " * hidden_size = ", gates * H, " rows, but got shape ", py_shape(w->sizes()));
  }
  TORCH_CHECK(input.size(-1) == w_ih.size(1), "convrnn.", op, ": input has ", input.size(-1),
              " features but w_ih expects input_size = ", w_ih.size(1));
  for (const auto& [name, b] : {std::pair<const char*, const OptTensor&>{"b_ih", b_ih}, {"b_hh", b_hh}}) {
    TORCH_CHECK(!b.has_value() || (b->dim() == 1 && b->size(0) == gates * H), "convrnn.", op, ": ", name,
                " must have shape (", gates * H, ",), but got ", py_shape(b->sizes()));
  }
  const Cell c{input.dim() == 2 ? input.size(0) : 1, input.size(-1), H, input.dim() == 2};
  const std::vector<int64_t> expected = c.batched ? std::vector<int64_t>{c.B, H} : std::vector<int64_t>{H};
  for (const auto& [name, t] : states) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(expected), "convrnn.", op, ": ", name, " must have shape ",
                py_shape(expected), " (batch and hidden_size of the input and weights), but got ",
                py_shape(t->sizes()));
  }
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "convrnn.", op, ": b_ih and b_hh must be given together");
  return c;
}

// The backward ops get the forward's tensors back: only their geometry is checked again.
Cell check_cell_backward_args(const char* op, int64_t gates, const Tensor& input, const Tensor& hx,
                              const Tensor& w_ih, const Tensor& w_hh, std::initializer_list<NamedTensor> states) {
  const Cell c = check_cell(op, gates, input, {{"hx", &hx}}, w_ih, w_hh, std::nullopt, std::nullopt);
  for (const auto& [name, t] : states) {
    check_same(op, name, *t, "input", input);
    check_shape(op, name, *t, hx.sizes());
  }
  return c;
}

void check_workspace(const char* op, const Tensor& ws, const Cell& c, int64_t cols) {
  check_shape(op, "workspace", ws, {c.B, cols * c.H});
}

// ---- whole-cell ops: shapes ----

// A (batch, n) matrix, or an unbatched vector as one row.
Tensor rows(const Tensor& t) {
  return t.dim() == 1 ? t.unsqueeze(0) : t;
}

Tensor state_out(const Cell& c, const Tensor& t) {
  return c.batched ? t : t.view({c.H});
}

// An output the mask did not ask for.
Tensor placeholder(const Tensor& like) {
  return at::empty({0}, like.options());
}

Tensor defined_or_empty(const Tensor& t, const Tensor& like) {
  return t.defined() ? t : placeholder(like);
}

Tensor empty_if(bool wanted, at::IntArrayRef size, const Tensor& like) {
  return wanted ? at::empty(size, like.options()) : Tensor();
}

// The gradients of a step's arguments, in the shapes of the arguments; placeholders where the
// mask asks for none.
struct Grads {
  Tensor input, hx, w_ih, w_hh;
};

// The backward's matrix products: grad_x (B, G*H) is the gradient of the input-side
// pre-activations, grad_h of the hidden-side ones (the same tensor but for the GRU).
// grad_hx, when given, already holds the direct part of h's gradient and is added to.
Grads product_grads(const CellKernels& k, const Cell& c, const Tensor& grad_x, const Tensor& grad_h,
                    const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, Tensor grad_hx,
                    bool want_input, bool want_hx, bool want_w_ih, bool want_w_hh) {
  const bool accumulate = grad_hx.defined();
  if (!want_hx) grad_hx = Tensor();
  if (want_hx && !accumulate) grad_hx = at::empty({c.B, c.H}, input.options());
  Grads g{empty_if(want_input, {c.B, c.I}, input), grad_hx, empty_if(want_w_ih, w_ih.sizes(), input),
          empty_if(want_w_hh, w_hh.sizes(), input)};
  k.product_grads(grad_x, grad_h, rows(input), rows(hx), w_ih, w_hh, g.input, g.hx, accumulate, g.w_ih, g.w_hh);
  g.input = !want_input ? placeholder(input) : c.batched ? g.input : g.input.view(input.sizes());
  g.hx = !want_hx ? placeholder(input) : c.batched ? g.hx : g.hx.view(hx.sizes());
  g.w_ih = defined_or_empty(g.w_ih, input);
  g.w_hh = defined_or_empty(g.w_hh, input);
  return g;
}

// ---- LSTM ----

std::tuple<Tensor, Tensor, Tensor> lstm_cell(const CellKernels& k, const Tensor& input, const Tensor& hx,
                                             const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
                                             const OptTensor& b_ih, const OptTensor& b_hh) {
  const Cell c = check_cell("lstm_cell", 4, input, {{"hx", &hx}, {"cx", &cx}}, w_ih, w_hh, b_ih, b_hh);
  Tensor ws = at::empty({c.B, 4 * c.H}, input.options());
  k.products(rows(input), rows(hx), w_ih, w_hh, ws, Tensor());
  Tensor hy = at::empty({c.B, c.H}, input.options()), cy = at::empty({c.B, c.H}, input.options());
  k.lstm(Tensor(), Tensor(), contiguous_opt(b_ih), contiguous_opt(b_hh), rows(cx).contiguous(), hy, cy, ws);
  return {state_out(c, hy), state_out(c, cy), ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward(
    const CellKernels& k, const OptTensor& grad_hy, const OptTensor& grad_cy, const Tensor& input, const Tensor& hx,
    const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh, const Tensor& cy, const Tensor& workspace,
    std::array<bool, 7> mask) {
  const char* op = "lstm_cell_backward";
  const Tensor ghy = zeros_if_absent(grad_hy, cy), gcy = zeros_if_absent(grad_cy, cy);
  const Cell c = check_cell_backward_args(op, 4, input, hx, w_ih, w_hh,
                                          {{"cx", &cx}, {"cy", &cy}, {"grad_hy", &ghy}, {"grad_cy", &gcy}});
  check_workspace(op, workspace, c, 4);
  Tensor gg = at::empty({c.B, 4 * c.H}, workspace.options()), gcx = at::empty({c.B, c.H}, workspace.options());
  Tensor gbi = empty_if(mask[5], {4 * c.H}, workspace), gbh = empty_if(mask[6], {4 * c.H}, workspace);
  k.lstm_backward(rows(ghy), rows(gcy), rows(cx).contiguous(), rows(cy).contiguous(),
                  workspace.contiguous(), gg, gcx, gbi, gbh);
  const Grads g =
      product_grads(k, c, gg, gg, input, hx, w_ih, w_hh, Tensor(), mask[0], mask[1], mask[3], mask[4]);
  return {g.input, g.hx, mask[2] ? gcx.view(cx.sizes()) : placeholder(input), g.w_ih, g.w_hh,
          defined_or_empty(gbi, input), defined_or_empty(gbh, input)};
}

// ---- GRU ----

std::tuple<Tensor, Tensor> gru_cell(const CellKernels& k, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                                    const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                    bool need_backward) {
  const Cell c = check_cell("gru_cell", 3, input, {{"hx", &hx}}, w_ih, w_hh, b_ih, b_hh);
  const Tensor h = rows(hx);
  Tensor gx = at::empty({c.B, 3 * c.H}, input.options()), gh = at::empty({c.B, 3 * c.H}, input.options());
  k.products(rows(input), h, w_ih, w_hh, gx, gh);
  Tensor hy = at::empty({c.B, c.H}, input.options());
  Tensor ws = need_backward ? at::empty({c.B, 4 * c.H}, input.options()) : at::empty({0}, input.options());
  k.gru(gx, gh, contiguous_opt(b_ih), contiguous_opt(b_hh), h.contiguous(), hy, need_backward ? ws : Tensor());
  return {state_out(c, hy), ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_cell_backward(
    const CellKernels& k, const Tensor& grad_hy, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& workspace, std::array<bool, 6> mask) {
  const char* op = "gru_cell_backward";
  const Cell c = check_cell_backward_args(op, 3, input, hx, w_ih, w_hh, {{"grad_hy", &grad_hy}});
  check_workspace(op, workspace, c, 4);
  const Tensor h = rows(hx);
  Tensor gx = at::empty({c.B, 3 * c.H}, workspace.options()), gh = at::empty({c.B, 3 * c.H}, workspace.options());
  Tensor ghx = at::empty({c.B, c.H}, workspace.options());
  Tensor gbi = empty_if(mask[4], {3 * c.H}, workspace), gbh = empty_if(mask[5], {3 * c.H}, workspace);
  k.gru_backward(rows(grad_hy).contiguous(), h.contiguous(), workspace.contiguous(), gx, gh, ghx, gbi, gbh);
  const Grads g = product_grads(k, c, gx, gh, input, hx, w_ih, w_hh, ghx, mask[0], mask[1], mask[2], mask[3]);
  return {g.input, g.hx, g.w_ih, g.w_hh, defined_or_empty(gbi, input), defined_or_empty(gbh, input)};
}

// ---- vanilla RNN ----

const char* rnn_op(bool relu) {
  return relu ? "rnn_relu_cell" : "rnn_tanh_cell";
}

Tensor rnn_cell(const CellKernels& k, const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                const OptTensor& b_ih, const OptTensor& b_hh, bool relu) {
  const Cell c = check_cell(rnn_op(relu), 1, input, {{"hx", &hx}}, w_ih, w_hh, b_ih, b_hh);
  Tensor hy = at::empty({c.B, c.H}, input.options());
  k.products(rows(input), rows(hx), w_ih, w_hh, hy, Tensor());
  k.rnn(Tensor(), Tensor(), contiguous_opt(b_ih), contiguous_opt(b_hh), hy, relu);
  return state_out(c, hy);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rnn_cell_backward(
    const CellKernels& k, const Tensor& grad_hy, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& hy, bool relu, std::array<bool, 6> mask) {
  const char* op = relu ? "rnn_relu_cell_backward" : "rnn_tanh_cell_backward";
  const Cell c = check_cell_backward_args(op, 1, input, hx, w_ih, w_hh, {{"grad_hy", &grad_hy}, {"hy", &hy}});
  Tensor gpre = at::empty({c.B, c.H}, input.options());
  Tensor gbi = empty_if(mask[4], {c.H}, input), gbh = empty_if(mask[5], {c.H}, input);
  k.rnn_backward(rows(grad_hy).contiguous(), rows(hy).contiguous(), gpre, gbi, gbh, relu);
  const Grads g =
      product_grads(k, c, gpre, gpre, input, hx, w_ih, w_hh, Tensor(), mask[0], mask[1], mask[2], mask[3]);
  return {g.input, g.hx, g.w_ih, g.w_hh, defined_or_empty(gbi, input), defined_or_empty(gbh, input)};
}

}  // namespace

void mm_gate_products(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates,
                      const Tensor& gates_h) {
  Tensor out = gates;
  at::mm_out(out, x, w_ih.t());
  if (gates_h.defined()) {
    Tensor out_h = gates_h;
    at::mm_out(out_h, h, w_hh.t());
  } else {
    out.addmm_(h, w_hh.t());
  }
}

void mm_gate_product_grads(const Tensor& grad_x, const Tensor& grad_h, const Tensor& x, const Tensor& h,
                           const Tensor& w_ih, const Tensor& w_hh, const Tensor& grad_input, const Tensor& grad_hx,
                           bool accumulate_hx, const Tensor& grad_w_ih, const Tensor& grad_w_hh) {
  for (const auto& [out, a, b] : {std::tuple<const Tensor&, Tensor, const Tensor&>{grad_input, grad_x, w_ih},
                                  {grad_w_ih, grad_x.t(), x}, {grad_w_hh, grad_h.t(), h}}) {
    if (out.defined()) {
      Tensor o = out;
      at::mm_out(o, a, b);
    }
  }
  if (grad_hx.defined()) {
    Tensor o = grad_hx;
    accumulate_hx ? o.addmm_(grad_h, w_hh) : at::mm_out(o, grad_h, w_hh);
  }
}

void register_cell_ops(torch::Library& m, const CellKernels& kernels) {
  const CellKernels* k = &kernels;
  m.impl("lstm_cell", [k](const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
                          const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
    return lstm_cell(*k, input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  });
  m.impl("lstm_cell_backward",
         [k](const OptTensor& grad_hy, const OptTensor& grad_cy, const Tensor& input, const Tensor& hx,
             const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh, const Tensor& cy, const Tensor& workspace,
             std::array<bool, 7> mask) {
           return lstm_cell_backward(*k, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, workspace, mask);
         });
  m.impl("gru_cell", [k](const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                         const OptTensor& b_ih, const OptTensor& b_hh, bool need_backward) {
    return gru_cell(*k, input, hx, w_ih, w_hh, b_ih, b_hh, need_backward);
  });
  m.impl("gru_cell_backward", [k](const Tensor& grad_hy, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                                  const Tensor& w_hh, const Tensor& workspace, std::array<bool, 6> mask) {
    return gru_cell_backward(*k, grad_hy, input, hx, w_ih, w_hh, workspace, mask);
  });
  m.impl("rnn_cell", [k](const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                         const OptTensor& b_ih, const OptTensor& b_hh, bool relu) {
    return rnn_cell(*k, input, hx, w_ih, w_hh, b_ih, b_hh, relu);
  });
  m.impl("rnn_cell_backward", [k](const Tensor& grad_hy, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                                  const Tensor& w_hh, const Tensor& hy, bool relu, std::array<bool, 6> mask) {
    return rnn_cell_backward(*k, grad_hy, input, hx, w_ih, w_hh, hy, relu, mask);
  });
}

}  // namespace convrnn

TORCH_LIBRARY_FRAGMENT(convrnn, m) {
  // Fused pointwise ops.  workspace = the activated gates i, f, g, o: all the backward needs
  // besides c and c'.
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

  // Whole-cell ops: input (batch, input_size) or unbatched (input_size), states to match.  The
  // workspaces are the fused ops' ((batch, 4 * hidden_size); the GRU's only with need_backward,
  // else empty).  The backward ops return the gradients output_mask asks for (in argument
  // order: input, hx, [cx,] w_ih, w_hh, b_ih, b_hh) and empty tensors for the others.
  m.def("lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
        "-> (Tensor hy, Tensor cy, Tensor workspace)");
  m.def("lstm_cell_backward(Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor hx, Tensor cx, Tensor w_ih, "
        "Tensor w_hh, Tensor cy, Tensor workspace, bool[7] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "bool need_backward) -> (Tensor hy, Tensor workspace)");
  m.def("gru_cell_backward(Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor workspace, "
        "bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("rnn_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool relu) "
        "-> Tensor");
  m.def("rnn_cell_backward(Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor hy, "
        "bool relu, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
