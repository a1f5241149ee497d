// CPU fused recurrent cells: the pointwise part of LSTM, GRU and vanilla RNN steps, for the
// fused ops (registered here) and the whole-cell ops (rnn_cells.cpp, which this file registers
// for the CPU with these kernels).
//
// The row loops are rnn_rows.h's.  The forward kernels run one task per batch row (parallel
// over rows when there is enough work).  The backward kernels run one task per chunk of hidden units over every
// row, in row order: the bias gradients (sums over the batch) are summed in the kernel, in an
// order that does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "rnn_cells.h"
#include "rnn_rows.h"

namespace convrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Gate elements of pointwise work below which a step runs on one thread (about 15 us of work:
// a fork-join costs a few); a batch-1 step stays on the calling thread.  At 65536 a B=64 GRU
// backward (98K elements) ran on one thread.
constexpr int64_t kParallelWork = 16384;

// ---- parallel drivers ----

// Runs f(row) over the batch, in parallel once the step has enough work to pay for threads.
template <typename F>
void for_rows(int64_t B, int64_t work_per_row, F&& f) {
  if (B * work_per_row < kParallelWork) {
    for (int64_t b = 0; b < B; ++b) f(b);
    return;
  }
  at::parallel_for(0, B, std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work_per_row)),
                   [&](int64_t b0, int64_t b1) {
                     for (int64_t b = b0; b < b1; ++b) f(b);
                   });
}

// Runs f(j0, j1) over chunks of the H hidden units (multiples of 16, a vector of floats), in
// parallel once the step has enough work; each call covers every row.
template <typename F>
void for_unit_chunks(int64_t B, int64_t H, int64_t work_per_unit, F&& f) {
  const int64_t work = B * H * work_per_unit;
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, work / kParallelWork));
  // (each task gets at least kParallelWork elements)
  const int64_t chunk = (H + tasks - 1) / tasks;
  const int64_t aligned = tasks == 1 ? H : (chunk + 15) / 16 * 16;
  if (tasks == 1) {
    f(int64_t(0), H);
    return;
  }
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * aligned, j1 = std::min(H, j0 + aligned);
      if (j0 < j1) f(j0, j1);
    }
  });
}

// The backward kernels' driver: over chunks of the H hidden units, every row in row order,
// row(with_sum, b, j0, n, sums) with the chunk's bias sums (`blocks` blocks of n for grad_b_ih,
// then, with separate_hh, `blocks` more for grad_b_hh; else both get the first `blocks`), then
// stores them into the bias gradients that are defined.  An empty batch zeroes them.
template <typename T, typename Row>
void backward_chunks(int64_t B, int64_t H, int64_t blocks, bool separate_hh, const Tensor& grad_b_ih,
                     const Tensor& grad_b_hh, const Row& row) {
  const bool bsum = grad_b_ih.defined() || grad_b_hh.defined();
  if (B * H == 0) {
    for (const Tensor* t : {&grad_b_ih, &grad_b_hh}) {
      if (t->defined()) t->zero_();
    }
    return;
  }
  const int64_t hh = separate_hh ? blocks : 0;
  for_unit_chunks(B, H, blocks, [&](int64_t j0, int64_t j1) {
    const int64_t n = j1 - j0;
    std::vector<acc_t<T>> sums(bsum ? (blocks + hh) * n : 0, acc_t<T>(0));
    for (int64_t b = 0; b < B; ++b) {
      bsum ? row(std::true_type(), b, j0, n, sums.data()) : row(std::false_type(), b, j0, n, sums.data());
    }
    if (bsum) {
      store_bias_sums<T>(sums.data(), blocks, H, j0, n, {&grad_b_ih});
      store_bias_sums<T>(sums.data() + hh * n, blocks, H, j0, n, {&grad_b_hh});
    }
  });
}

// ---- kernels (CellKernels) ----

void lstm_kernel(const Tensor& gates_x, const Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
                 const Tensor& cx, const Tensor& hy, const Tensor& cy, const Tensor& ws) {
  if (hy.numel() == 0) return;
  const int64_t B = hy.size(0), H = hy.size(1);
  CONVRNN_DISPATCH_FLOATING(ws.scalar_type(), "convrnn.lstm_cell", [&] {
    using T = scalar_t;
    const T *bi = ptr_or_null<T>(b_ih), *bh = ptr_or_null<T>(b_hh);
    const T* gx = gates_x.defined() ? gates_x.const_data_ptr<T>() : nullptr;
    const T* gh = gates_h.defined() ? gates_h.const_data_ptr<T>() : nullptr;
    for_rows(B, 4 * H, [&](int64_t b) {
      with_flags(bi != nullptr, gh == nullptr, [&](auto bias, auto in_place) {
        lstm_row<T, decltype(bias)::value, decltype(in_place)::value>(
            gx + (gx ? b * 4 * H : 0), gh + (gh ? b * 4 * H : 0), bi, bh, cx.const_data_ptr<T>() + b * H,
            hy.data_ptr<T>() + b * H, cy.data_ptr<T>() + b * H, ws.data_ptr<T>() + b * 4 * H, H, H, H);
      });
    });
  });
}

void lstm_backward_kernel(const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& cx, const Tensor& cy,
                          const Tensor& ws, const Tensor& grad_gates, const Tensor& grad_cx, const Tensor& grad_b_ih,
                          const Tensor& grad_b_hh) {
  const int64_t B = cx.size(0), H = cx.size(1);
  CONVRNN_DISPATCH_FLOATING(ws.scalar_type(), "convrnn.lstm_cell_backward", [&] {
    using T = scalar_t;
    backward_chunks<T>(B, H, 4, false, grad_b_ih, grad_b_hh,
                       [&](auto with_sum, int64_t b, int64_t j0, int64_t n, acc_t<T>* sums) {
                         lstm_backward_row<T, decltype(with_sum)::value>(
                             grad_hy.const_data_ptr<T>() + b * H + j0, grad_cy.const_data_ptr<T>() + b * H + j0,
                             cx.const_data_ptr<T>() + b * H + j0, cy.const_data_ptr<T>() + b * H + j0,
                             ws.const_data_ptr<T>() + b * 4 * H + j0, grad_gates.data_ptr<T>() + b * 4 * H + j0,
                             grad_cx.data_ptr<T>() + b * H + j0, sums, H, n);
                       });
  });
}

void gru_kernel(const Tensor& gates_x, const Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
                const Tensor& hx, const Tensor& hy, const Tensor& ws) {
  if (hy.numel() == 0) return;
  const int64_t B = hy.size(0), H = hy.size(1);
  CONVRNN_DISPATCH_FLOATING(hy.scalar_type(), "convrnn.gru_cell", [&] {
    using T = scalar_t;
    const T *bi = ptr_or_null<T>(b_ih), *bh = ptr_or_null<T>(b_hh);
    T* w = ws.defined() ? ws.data_ptr<T>() : nullptr;
    for_rows(B, 3 * H, [&](int64_t b) {
      with_flags(bi != nullptr, w != nullptr, [&](auto bias, auto save) {
        gru_row<T, decltype(bias)::value, decltype(save)::value>(
            gates_x.const_data_ptr<T>() + b * 3 * H, gates_h.const_data_ptr<T>() + b * 3 * H, bi, bh,
            hx.const_data_ptr<T>() + b * H, hy.data_ptr<T>() + b * H, w + (w ? b * 4 * H : 0), H, H, H);
      });
    });
  });
}

void gru_backward_kernel(const Tensor& grad_hy, const Tensor& hx, const Tensor& ws, const Tensor& grad_gates_x,
                         const Tensor& grad_gates_h, const Tensor& grad_hx, const Tensor& grad_b_ih,
                         const Tensor& grad_b_hh) {
  const int64_t B = hx.size(0), H = hx.size(1);
  CONVRNN_DISPATCH_FLOATING(ws.scalar_type(), "convrnn.gru_cell_backward", [&] {
    using T = scalar_t;
    backward_chunks<T>(B, H, 3, true, grad_b_ih, grad_b_hh,
                       [&](auto with_sum, int64_t b, int64_t j0, int64_t n, acc_t<T>* sums) {
                         gru_backward_row<T, decltype(with_sum)::value>(
                             grad_hy.const_data_ptr<T>() + b * H + j0, hx.const_data_ptr<T>() + b * H + j0,
                             ws.const_data_ptr<T>() + b * 4 * H + j0, grad_gates_x.data_ptr<T>() + b * 3 * H + j0,
                             grad_gates_h.data_ptr<T>() + b * 3 * H + j0, grad_hx.data_ptr<T>() + b * H + j0, sums,
                             H, n);
                       });
  });
}

void rnn_kernel(const Tensor& gates_x, const Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
                const Tensor& hy, bool relu) {
  if (hy.numel() == 0) return;
  const int64_t B = hy.size(0), H = hy.size(1);
  CONVRNN_DISPATCH_FLOATING(hy.scalar_type(), "convrnn.rnn_cell", [&] {
    using T = scalar_t;
    const T *bi = ptr_or_null<T>(b_ih), *bh = ptr_or_null<T>(b_hh);
    const T* gx = gates_x.defined() ? gates_x.const_data_ptr<T>() : nullptr;
    const T* gh = gates_h.defined() ? gates_h.const_data_ptr<T>() : nullptr;
    for_rows(B, H, [&](int64_t b) {
      with_flags(bi != nullptr, gh == nullptr, [&](auto bias, auto in_place) {
        rnn_row<T, decltype(bias)::value, decltype(in_place)::value>(
            gx + (gx ? b * H : 0), gh + (gh ? b * H : 0), bi, bh, hy.data_ptr<T>() + b * H, H, relu);
      });
    });
  });
}

void rnn_backward_kernel(const Tensor& grad_hy, const Tensor& hy, const Tensor& grad_pre, const Tensor& grad_b_ih,
                         const Tensor& grad_b_hh, bool relu) {
  const int64_t B = hy.size(0), H = hy.size(1);
  CONVRNN_DISPATCH_FLOATING(hy.scalar_type(), "convrnn.rnn_cell_backward", [&] {
    using T = scalar_t;
    backward_chunks<T>(B, H, 1, false, grad_b_ih, grad_b_hh,
                       [&](auto with_sum, int64_t b, int64_t j0, int64_t n, acc_t<T>* sums) {
                         rnn_backward_row<T, decltype(with_sum)::value>(grad_hy.const_data_ptr<T>() + b * H + j0,
                                                                        hy.const_data_ptr<T>() + b * H + j0,
                                                                        grad_pre.data_ptr<T>() + b * H + j0, sums, n,
                                                                        relu);
                       });
  });
}

const CellKernels kCpuKernels{cpu_gate_products, cpu_gate_product_grads, lstm_kernel, lstm_backward_kernel,
                              gru_kernel,        gru_backward_kernel,    rnn_kernel,  rnn_backward_kernel};

// ---- the fused ops ----

std::tuple<Tensor, Tensor, Tensor> lstm_cell_fused_cpu(const Tensor& gates_x, const Tensor& gates_h, const Tensor& cx,
                                                       const OptTensor& b_ih, const OptTensor& b_hh) {
  const CellDims d = check_cell_gates("lstm_cell_fused", 4, gates_x, gates_h, b_ih, b_hh, {{"cx", &cx}});
  const auto opts = gates_x.options();
  Tensor hy = at::empty({d.B, d.H}, opts), cy = at::empty({d.B, d.H}, opts), ws = at::empty({d.B, 4 * d.H}, opts);
  lstm_kernel(gates_x.contiguous(), gates_h.contiguous(), contiguous_opt(b_ih), contiguous_opt(b_hh),
              cx.contiguous(), hy, cy, ws);
  return {hy, cy, ws};
}

std::tuple<Tensor, Tensor> lstm_cell_fused_backward_cpu(const OptTensor& grad_hy, const OptTensor& grad_cy,
                                                        const Tensor& cx, const Tensor& cy, const Tensor& workspace) {
  const Tensor ghy = zeros_if_absent(grad_hy, cy), gcy = zeros_if_absent(grad_cy, cy);
  const CellDims d = check_cell_backward("lstm_cell_fused_backward", workspace,
                                         {{"cx", &cx}, {"cy", &cy}, {"grad_hy", &ghy}, {"grad_cy", &gcy}});
  Tensor gg = at::empty({d.B, 4 * d.H}, workspace.options()), gcx = at::empty({d.B, d.H}, workspace.options());
  lstm_backward_kernel(ghy, gcy, cx.contiguous(), cy.contiguous(), workspace.contiguous(), gg, gcx, Tensor(),
                       Tensor());
  return {gg, gcx};
}

std::tuple<Tensor, Tensor> gru_cell_fused_cpu(const Tensor& gates_x, const Tensor& gates_h, const Tensor& hx,
                                              const OptTensor& b_ih, const OptTensor& b_hh) {
  const CellDims d = check_cell_gates("gru_cell_fused", 3, gates_x, gates_h, b_ih, b_hh, {{"hx", &hx}});
  Tensor hy = at::empty({d.B, d.H}, gates_x.options()), ws = at::empty({d.B, 4 * d.H}, gates_x.options());
  gru_kernel(gates_x.contiguous(), gates_h.contiguous(), contiguous_opt(b_ih), contiguous_opt(b_hh), hx.contiguous(),
             hy, ws);
  return {hy, ws};
}

std::tuple<Tensor, Tensor, Tensor> gru_cell_fused_backward_cpu(const Tensor& grad_hy, const Tensor& hx,
                                                               const Tensor& workspace) {
  const CellDims d = check_cell_backward("gru_cell_fused_backward", workspace, {{"hx", &hx}, {"grad_hy", &grad_hy}});
  const auto opts = workspace.options();
  Tensor gx = at::empty({d.B, 3 * d.H}, opts), gh = at::empty({d.B, 3 * d.H}, opts), ghx = at::empty({d.B, d.H}, opts);
  gru_backward_kernel(grad_hy.contiguous(), hx.contiguous(), workspace.contiguous(), gx, gh, ghx, Tensor(), Tensor());
  return {gx, gh, ghx};
}

Tensor rnn_cell_fused_cpu(const Tensor& gates_x, const Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
                          bool relu) {
  const CellDims d = check_cell_gates("rnn_cell_fused", 1, gates_x, gates_h, b_ih, b_hh);
  Tensor hy = at::empty({d.B, d.H}, gates_x.options());
  rnn_kernel(gates_x.contiguous(), gates_h.contiguous(), contiguous_opt(b_ih), contiguous_opt(b_hh), hy, relu);
  return hy;
}

Tensor rnn_cell_fused_backward_cpu(const Tensor& grad_hy, const Tensor& hy, bool relu) {
  check_rnn_backward("rnn_cell_fused_backward", grad_hy, hy);
  Tensor gpre = at::empty(hy.sizes(), hy.options());
  rnn_backward_kernel(grad_hy.contiguous(), hy.contiguous(), gpre, Tensor(), Tensor(), relu);
  return gpre;
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CPU, m) {
  m.impl("lstm_cell_fused", &convrnn::lstm_cell_fused_cpu);
  m.impl("lstm_cell_fused_backward", &convrnn::lstm_cell_fused_backward_cpu);
  m.impl("gru_cell_fused", &convrnn::gru_cell_fused_cpu);
  m.impl("gru_cell_fused_backward", &convrnn::gru_cell_fused_backward_cpu);
  m.impl("rnn_cell_fused", &convrnn::rnn_cell_fused_cpu);
  m.impl("rnn_cell_fused_backward", &convrnn::rnn_cell_fused_backward_cpu);
  convrnn::register_cell_ops(m, convrnn::kCpuKernels);
}
