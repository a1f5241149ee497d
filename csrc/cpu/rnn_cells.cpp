// CPU fused recurrent cells: the pointwise part of LSTM, GRU and vanilla RNN steps.
//
// One task per batch row (parallel over rows when there is enough work); within a row one
// loop over the H hidden units reads the gate blocks at j, H + j, 2H + j, ... as contiguous
// streams, so the compiler vectorises it, float activations included (exp_poly in
// rnn_cells.h).  The gate formulas are rnn_cells.h's, shared with the CUDA kernels.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "rnn_cells.h"

namespace convrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Sum of the two products and both biases for gate column k of a row.
template <typename T, bool BIAS>
CONVRNN_INLINE acc_t<T> pre(const T* gx, const T* gh, const T* bi, const T* bh, int64_t k) {
  acc_t<T> v = static_cast<acc_t<T>>(gx[k]) + static_cast<acc_t<T>>(gh[k]);
  if (BIAS) v += static_cast<acc_t<T>>(bi[k]) + static_cast<acc_t<T>>(bh[k]);
  return v;
}

template <typename T, bool BIAS>
CONVRNN_CPU_CLONES void lstm_row(const T* __restrict gx, const T* __restrict gh, const T* __restrict bi,
                                 const T* __restrict bh, const T* __restrict cx, T* __restrict hy, T* __restrict cy,
                                 T* __restrict ws, int64_t H) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < H; ++j) {
    const LstmGates<A> a = lstm_gates(pre<T, BIAS>(gx, gh, bi, bh, j), pre<T, BIAS>(gx, gh, bi, bh, H + j),
                                      pre<T, BIAS>(gx, gh, bi, bh, 2 * H + j), pre<T, BIAS>(gx, gh, bi, bh, 3 * H + j));
    A h, c;
    lstm_update(a, static_cast<A>(cx[j]), h, c);
    hy[j] = static_cast<T>(h);
    cy[j] = static_cast<T>(c);
    ws[j] = static_cast<T>(a.i);
    ws[H + j] = static_cast<T>(a.f);
    ws[2 * H + j] = static_cast<T>(a.g);
    ws[3 * H + j] = static_cast<T>(a.o);
  }
}

template <typename T>
CONVRNN_CPU_CLONES void lstm_backward_row(const T* __restrict ghy, const T* __restrict gcy, const T* __restrict cx,
                                          const T* __restrict cy, const T* __restrict ws, T* __restrict gg,
                                          T* __restrict gcx, int64_t H) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < H; ++j) {
    const LstmGates<A> a{static_cast<A>(ws[j]), static_cast<A>(ws[H + j]), static_cast<A>(ws[2 * H + j]),
                         static_cast<A>(ws[3 * H + j])};
    A d[4], dc;
    lstm_backward(a, static_cast<A>(cx[j]), static_cast<A>(cy[j]), static_cast<A>(ghy[j]), static_cast<A>(gcy[j]), d,
                  dc);
    for (int k = 0; k < 4; ++k) gg[k * H + j] = static_cast<T>(d[k]);
    gcx[j] = static_cast<T>(dc);
  }
}

template <typename T, bool BIAS>
CONVRNN_CPU_CLONES void gru_row(const T* __restrict gx, const T* __restrict gh, const T* __restrict bi,
                                const T* __restrict bh, const T* __restrict hx, T* __restrict hy, T* __restrict ws,
                                int64_t H) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < H; ++j) {
    A xb[3], hb[3];
    for (int k = 0; k < 3; ++k) {
      xb[k] = static_cast<A>(gx[k * H + j]) + (BIAS ? static_cast<A>(bi[k * H + j]) : A(0));
      hb[k] = static_cast<A>(gh[k * H + j]) + (BIAS ? static_cast<A>(bh[k * H + j]) : A(0));
    }
    A r, z, n, h;
    gru_forward(xb[0], xb[1], xb[2], hb[0], hb[1], hb[2], static_cast<A>(hx[j]), r, z, n, h);
    hy[j] = static_cast<T>(h);
    ws[j] = static_cast<T>(r);
    ws[H + j] = static_cast<T>(z);
    ws[2 * H + j] = static_cast<T>(n);
    ws[3 * H + j] = static_cast<T>(hb[2]);
  }
}

template <typename T>
CONVRNN_CPU_CLONES void gru_backward_row(const T* __restrict ghy, const T* __restrict hx, const T* __restrict ws,
                                         T* __restrict gx, T* __restrict gh, T* __restrict ghx, int64_t H) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < H; ++j) {
    A dx[3], dh[3], d;
    gru_backward(static_cast<A>(ws[j]), static_cast<A>(ws[H + j]), static_cast<A>(ws[2 * H + j]),
                 static_cast<A>(ws[3 * H + j]), static_cast<A>(hx[j]), static_cast<A>(ghy[j]), dx, dh, d);
    for (int k = 0; k < 3; ++k) {
      gx[k * H + j] = static_cast<T>(dx[k]);
      gh[k * H + j] = static_cast<T>(dh[k]);
    }
    ghx[j] = static_cast<T>(d);
  }
}

template <typename T, bool BIAS>
CONVRNN_CPU_CLONES void rnn_row(const T* __restrict gx, const T* __restrict gh, const T* __restrict bi,
                                const T* __restrict bh, T* __restrict hy, int64_t H, bool relu) {
  for (int64_t j = 0; j < H; ++j) hy[j] = static_cast<T>(rnn_activation(pre<T, BIAS>(gx, gh, bi, bh, j), relu));
}

template <typename T>
CONVRNN_CPU_CLONES void rnn_backward_row(const T* __restrict ghy, const T* __restrict hy, T* __restrict gpre,
                                         int64_t H, bool relu) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < H; ++j) {
    gpre[j] = static_cast<T>(rnn_activation_grad(static_cast<A>(ghy[j]), static_cast<A>(hy[j]), relu));
  }
}

// Runs f(row) over the batch, in parallel once rows carry enough work to pay for threads.
template <typename F>
void for_rows(int64_t B, int64_t work_per_row, F&& f) {
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_row)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_cpu(const Tensor& gates_x, const Tensor& gates_h, const Tensor& cx,
                                                 const OptTensor& b_ih, const OptTensor& b_hh) {
  const char* op = "lstm_cell_fused";
  const CellDims d = check_cell_gates(op, 4, gates_x, gates_h, b_ih, b_hh, {{"cx", &cx}});
  const OptTensor bi_c = contiguous_opt(b_ih), bh_c = contiguous_opt(b_hh);
  const Tensor gx = gates_x.contiguous(), gh = gates_h.contiguous(), c = cx.contiguous();
  Tensor hy = at::empty({d.B, d.H}, gx.options()), cy = at::empty({d.B, d.H}, gx.options());
  Tensor ws = at::empty({d.B, 4 * d.H}, gx.options());
  if (hy.numel() == 0) return {hy, cy, ws};
  CONVRNN_DISPATCH_FLOATING(gx.scalar_type(), "convrnn.lstm_cell_fused", [&] {
    const scalar_t *bi = ptr_or_null<scalar_t>(bi_c), *bh = ptr_or_null<scalar_t>(bh_c);
    const int64_t H = d.H;
    for_rows(d.B, 4 * H, [&](int64_t b) {
      auto row = [&](auto bias) {
        lstm_row<scalar_t, decltype(bias)::value>(gx.const_data_ptr<scalar_t>() + b * 4 * H,
                                                  gh.const_data_ptr<scalar_t>() + b * 4 * H, bi, bh,
                                                  c.const_data_ptr<scalar_t>() + b * H, hy.data_ptr<scalar_t>() + b * H,
                                                  cy.data_ptr<scalar_t>() + b * H, ws.data_ptr<scalar_t>() + b * 4 * H, H);
      };
      bi != nullptr ? row(std::true_type()) : row(std::false_type());
    });
  });
  return {hy, cy, ws};
}

std::tuple<Tensor, Tensor> lstm_cell_backward_cpu(const OptTensor& grad_hy, const OptTensor& grad_cy, const Tensor& cx,
                                                  const Tensor& cy, const Tensor& workspace) {
  const char* op = "lstm_cell_fused_backward";
  const Tensor ghy = zeros_if_absent(grad_hy, cy), gcy = zeros_if_absent(grad_cy, cy);
  const CellDims d =
      check_cell_backward(op, workspace, {{"cx", &cx}, {"cy", &cy}, {"grad_hy", &ghy}, {"grad_cy", &gcy}});
  const Tensor c = cx.contiguous(), c2 = cy.contiguous(), ws = workspace.contiguous();
  Tensor gg = at::empty({d.B, 4 * d.H}, ws.options()), gcx = at::empty({d.B, d.H}, ws.options());
  if (gcx.numel() == 0) return {gg, gcx};
  CONVRNN_DISPATCH_FLOATING(ws.scalar_type(), "convrnn.lstm_cell_fused_backward", [&] {
    const int64_t H = d.H;
    for_rows(d.B, 4 * H, [&](int64_t b) {
      lstm_backward_row<scalar_t>(ghy.const_data_ptr<scalar_t>() + b * H, gcy.const_data_ptr<scalar_t>() + b * H,
                                  c.const_data_ptr<scalar_t>() + b * H, c2.const_data_ptr<scalar_t>() + b * H,
                                  ws.const_data_ptr<scalar_t>() + b * 4 * H, gg.data_ptr<scalar_t>() + b * 4 * H,
                                  gcx.data_ptr<scalar_t>() + b * H, H);
    });
  });
  return {gg, gcx};
}

std::tuple<Tensor, Tensor> gru_cell_cpu(const Tensor& gates_x, const Tensor& gates_h, const Tensor& hx,
                                        const OptTensor& b_ih, const OptTensor& b_hh) {
  const char* op = "gru_cell_fused";
  const CellDims d = check_cell_gates(op, 3, gates_x, gates_h, b_ih, b_hh, {{"hx", &hx}});
  const OptTensor bi_c = contiguous_opt(b_ih), bh_c = contiguous_opt(b_hh);
  const Tensor gx = gates_x.contiguous(), gh = gates_h.contiguous(), h = hx.contiguous();
  Tensor hy = at::empty({d.B, d.H}, gx.options()), ws = at::empty({d.B, 4 * d.H}, gx.options());
  if (hy.numel() == 0) return {hy, ws};
  CONVRNN_DISPATCH_FLOATING(gx.scalar_type(), "convrnn.gru_cell_fused", [&] {
    const scalar_t *bi = ptr_or_null<scalar_t>(bi_c), *bh = ptr_or_null<scalar_t>(bh_c);
    const int64_t H = d.H;
    for_rows(d.B, 3 * H, [&](int64_t b) {
      auto row = [&](auto bias) {
        gru_row<scalar_t, decltype(bias)::value>(gx.const_data_ptr<scalar_t>() + b * 3 * H,
                                                 gh.const_data_ptr<scalar_t>() + b * 3 * H, bi, bh,
                                                 h.const_data_ptr<scalar_t>() + b * H, hy.data_ptr<scalar_t>() + b * H,
                                                 ws.data_ptr<scalar_t>() + b * 4 * H, H);
      };
      bi != nullptr ? row(std::true_type()) : row(std::false_type());
    });
  });
  return {hy, ws};
}

std::tuple<Tensor, Tensor, Tensor> gru_cell_backward_cpu(const Tensor& grad_hy, const Tensor& hx,
                                                         const Tensor& workspace) {
  const char* op = "gru_cell_fused_backward";
  const CellDims d = check_cell_backward(op, workspace, {{"hx", &hx}, {"grad_hy", &grad_hy}});
  const Tensor ghy = grad_hy.contiguous(), h = hx.contiguous(), ws = workspace.contiguous();
  Tensor gx = at::empty({d.B, 3 * d.H}, ws.options()), gh = at::empty({d.B, 3 * d.H}, ws.options());
  Tensor ghx = at::empty({d.B, d.H}, ws.options());
  if (ghx.numel() == 0) return {gx, gh, ghx};
  CONVRNN_DISPATCH_FLOATING(ws.scalar_type(), "convrnn.gru_cell_fused_backward", [&] {
    const int64_t H = d.H;
    for_rows(d.B, 3 * H, [&](int64_t b) {
      gru_backward_row<scalar_t>(ghy.const_data_ptr<scalar_t>() + b * H, h.const_data_ptr<scalar_t>() + b * H,
                                 ws.const_data_ptr<scalar_t>() + b * 4 * H, gx.data_ptr<scalar_t>() + b * 3 * H,
                                 gh.data_ptr<scalar_t>() + b * 3 * H, ghx.data_ptr<scalar_t>() + b * H, H);
    });
  });
  return {gx, gh, ghx};
}

Tensor rnn_cell_cpu(const Tensor& gates_x, const Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
                    bool relu) {
  const char* op = "rnn_cell_fused";
  const CellDims d = check_cell_gates(op, 1, gates_x, gates_h, b_ih, b_hh);
  const OptTensor bi_c = contiguous_opt(b_ih), bh_c = contiguous_opt(b_hh);
  const Tensor gx = gates_x.contiguous(), gh = gates_h.contiguous();
  Tensor hy = at::empty({d.B, d.H}, gx.options());
  if (hy.numel() == 0) return hy;
  CONVRNN_DISPATCH_FLOATING(gx.scalar_type(), "convrnn.rnn_cell_fused", [&] {
    const scalar_t *bi = ptr_or_null<scalar_t>(bi_c), *bh = ptr_or_null<scalar_t>(bh_c);
    const int64_t H = d.H;
    for_rows(d.B, H, [&](int64_t b) {
      auto row = [&](auto bias) {
        rnn_row<scalar_t, decltype(bias)::value>(gx.const_data_ptr<scalar_t>() + b * H,
                                                 gh.const_data_ptr<scalar_t>() + b * H, bi, bh,
                                                 hy.data_ptr<scalar_t>() + b * H, H, relu);
      };
      bi != nullptr ? row(std::true_type()) : row(std::false_type());
    });
  });
  return hy;
}

Tensor rnn_cell_backward_cpu(const Tensor& grad_hy, const Tensor& hy, bool relu) {
  const char* op = "rnn_cell_fused_backward";
  check_rnn_backward(op, grad_hy, hy);
  const Tensor g = grad_hy.contiguous(), h = hy.contiguous();
  Tensor gpre = at::empty(h.sizes(), h.options());
  if (gpre.numel() == 0) return gpre;
  CONVRNN_DISPATCH_FLOATING(h.scalar_type(), "convrnn.rnn_cell_fused_backward", [&] {
    const int64_t H = h.size(1);
    for_rows(h.size(0), H, [&](int64_t b) {
      rnn_backward_row<scalar_t>(g.const_data_ptr<scalar_t>() + b * H, h.const_data_ptr<scalar_t>() + b * H,
                                 gpre.data_ptr<scalar_t>() + b * H, H, relu);
    });
  });
  return gpre;
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CPU, m) {
  m.impl("lstm_cell_fused", &convrnn::lstm_cell_cpu);
  m.impl("lstm_cell_fused_backward", &convrnn::lstm_cell_backward_cpu);
  m.impl("gru_cell_fused", &convrnn::gru_cell_cpu);
  m.impl("gru_cell_fused_backward", &convrnn::gru_cell_backward_cpu);
  m.impl("rnn_cell_fused", &convrnn::rnn_cell_cpu);
  m.impl("rnn_cell_fused_backward", &convrnn::rnn_cell_backward_cpu);
}
