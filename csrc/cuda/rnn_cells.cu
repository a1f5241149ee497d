// CUDA fused recurrent cells: the pointwise part of LSTM, GRU and vanilla RNN steps, for the
// fused ops (registered here) and the whole-cell ops (rnn_cells.cpp, which this file registers
// for CUDA with these kernels; their bias gradients are torch's batch sums).
//
// One thread per (batch row, hidden unit): it reads its unit's column of each gate block
// (neighbouring threads read neighbouring columns: coalesced), applies rnn_cells.h's
// formulas (shared with the CPU kernels) and writes the new state and the workspace.
// The matrix products before these kernels are torch's (cuBLAS).
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "rnn_cells.h"

namespace convrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Pre-activation of gate column k of row b: the product(s), and both biases when given.  gh is
// null when gx already holds both products (the whole-cell ops).
template <typename T, typename index_t>
__device__ __forceinline__ acc_t<T> pre_at(const T* gx, const T* gh, const T* bi, const T* bh, index_t row,
                                           index_t k) {
  acc_t<T> v = static_cast<acc_t<T>>(gx[row + k]);
  if (gh != nullptr) v += static_cast<acc_t<T>>(gh[row + k]);
  if (bi != nullptr) v += static_cast<acc_t<T>>(bi[k]) + static_cast<acc_t<T>>(bh[k]);
  return v;
}

// gx and ws are not __restrict__: the whole-cell op passes the same buffer (each thread reads
// its four gate columns, then overwrites them with the activated gates).
template <typename T, typename index_t>
__global__ void lstm_kernel(const T* gx, const T* __restrict__ gh, const T* __restrict__ bi,
                            const T* __restrict__ bh, const T* __restrict__ cx, T* __restrict__ hy,
                            T* __restrict__ cy, T* ws, index_t H, index_t total) {
  using A = acc_t<T>;
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    const index_t j = e % H, row = (e / H) * 4 * H;
    const LstmGates<A> a = lstm_gates(pre_at(gx, gh, bi, bh, row, j), pre_at(gx, gh, bi, bh, row, H + j),
                                      pre_at(gx, gh, bi, bh, row, 2 * H + j), pre_at(gx, gh, bi, bh, row, 3 * H + j));
    A h, c;
    lstm_update(a, static_cast<A>(cx[e]), h, c);
    hy[e] = static_cast<T>(h);
    cy[e] = static_cast<T>(c);
    ws[row + j] = static_cast<T>(a.i);
    ws[row + H + j] = static_cast<T>(a.f);
    ws[row + 2 * H + j] = static_cast<T>(a.g);
    ws[row + 3 * H + j] = static_cast<T>(a.o);
  }
}

template <typename T, typename index_t>
__global__ void lstm_backward_kernel(const T* __restrict__ ghy, const T* __restrict__ gcy, const T* __restrict__ cx,
                                     const T* __restrict__ cy, const T* __restrict__ ws, T* __restrict__ gg,
                                     T* __restrict__ gcx, index_t H, index_t total) {
  using A = acc_t<T>;
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    const index_t j = e % H, row = (e / H) * 4 * H;
    const LstmGates<A> a{static_cast<A>(ws[row + j]), static_cast<A>(ws[row + H + j]),
                         static_cast<A>(ws[row + 2 * H + j]), static_cast<A>(ws[row + 3 * H + j])};
    A d[4], dc;
    lstm_backward(a, static_cast<A>(cx[e]), static_cast<A>(cy[e]), static_cast<A>(ghy[e]), static_cast<A>(gcy[e]), d,
                  dc);
    for (int k = 0; k < 4; ++k) gg[row + k * H + j] = static_cast<T>(d[k]);
    gcx[e] = static_cast<T>(dc);
  }
}

// ws may be null (no backward to come).
template <typename T, typename index_t>
__global__ void gru_kernel(const T* __restrict__ gx, const T* __restrict__ gh, const T* __restrict__ bi,
                           const T* __restrict__ bh, const T* __restrict__ hx, T* __restrict__ hy, T* __restrict__ ws,
                           index_t H, index_t total) {
  using A = acc_t<T>;
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    const index_t j = e % H, b = e / H, row = b * 3 * H, wrow = b * 4 * H;
    A xb[3], hb[3];
    for (int k = 0; k < 3; ++k) {
      xb[k] = static_cast<A>(gx[row + k * H + j]) + (bi != nullptr ? static_cast<A>(bi[k * H + j]) : A(0));
      hb[k] = static_cast<A>(gh[row + k * H + j]) + (bh != nullptr ? static_cast<A>(bh[k * H + j]) : A(0));
    }
    A r, z, n, h;
    gru_forward(xb[0], xb[1], xb[2], hb[0], hb[1], hb[2], static_cast<A>(hx[e]), r, z, n, h);
    hy[e] = static_cast<T>(h);
    if (ws != nullptr) {
      ws[wrow + j] = static_cast<T>(r);
      ws[wrow + H + j] = static_cast<T>(z);
      ws[wrow + 2 * H + j] = static_cast<T>(n);
      ws[wrow + 3 * H + j] = static_cast<T>(hb[2]);
    }
  }
}

template <typename T, typename index_t>
__global__ void gru_backward_kernel(const T* __restrict__ ghy, const T* __restrict__ hx, const T* __restrict__ ws,
                                    T* __restrict__ gx, T* __restrict__ gh, T* __restrict__ ghx, index_t H,
                                    index_t total) {
  using A = acc_t<T>;
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    const index_t j = e % H, b = e / H, row = b * 3 * H, wrow = b * 4 * H;
    A dx[3], dh[3], d;
    gru_backward(static_cast<A>(ws[wrow + j]), static_cast<A>(ws[wrow + H + j]), static_cast<A>(ws[wrow + 2 * H + j]),
                 static_cast<A>(ws[wrow + 3 * H + j]), static_cast<A>(hx[e]), static_cast<A>(ghy[e]), dx, dh, d);
    for (int k = 0; k < 3; ++k) {
      gx[row + k * H + j] = static_cast<T>(dx[k]);
      gh[row + k * H + j] = static_cast<T>(dh[k]);
    }
    ghx[e] = static_cast<T>(d);
  }
}

// gx and hy are not __restrict__: the whole-cell op passes the same buffer (in place).
template <typename T, typename index_t>
__global__ void rnn_kernel(const T* gx, const T* __restrict__ gh, const T* __restrict__ bi,
                           const T* __restrict__ bh, T* hy, bool relu, index_t H, index_t total) {
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    const index_t j = e % H;
    hy[e] = static_cast<T>(rnn_activation(pre_at(gx, gh, bi, bh, e - j, j), relu));
  }
}

template <typename T, typename index_t>
__global__ void rnn_backward_kernel(const T* __restrict__ ghy, const T* __restrict__ hy, T* __restrict__ gpre,
                                    bool relu, index_t total) {
  using A = acc_t<T>;
  CONVRNN_GRID_STRIDE(index_t, e, total) {
    gpre[e] = static_cast<T>(rnn_activation_grad(static_cast<A>(ghy[e]), static_cast<A>(hy[e]), relu));
  }
}

// Launches kernel over `total` elements with the index type that fits `extent` elements.
#define CONVRNN_LAUNCH_CELL(extent, total, stream, KERNEL, ...)                               \
  with_index_type(extent, [&](auto index_zero) {                                              \
    using index_t = decltype(index_zero);                                                     \
    KERNEL<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(__VA_ARGS__);       \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                           \
  })

// Bias gradients: batch sums of the pre-activation gradients (torch's reduction: deterministic).
void bias_sums(const Tensor& grad_pre, const Tensor& grad_b) {
  if (grad_b.defined()) at::sum_out(const_cast<Tensor&>(grad_b), grad_pre, {0});
}

// ---- kernels (CellKernels) ----

void lstm_kernel_cuda(const Tensor& gates_x, const Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
                      const Tensor& cx, const Tensor& hy, const Tensor& cy, const Tensor& ws) {
  const int64_t total = hy.numel();
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(ws.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor& gx = gates_h.defined() ? gates_x : ws;  // in place: ws holds the summed products
  CONVRNN_DISPATCH_FLOATING(ws.scalar_type(), "convrnn.lstm_cell", [&] {
    CONVRNN_LAUNCH_CELL(ws.numel(), total, stream, lstm_kernel, gx.const_data_ptr<scalar_t>(),
                        ptr_or_null<scalar_t>(gates_h), ptr_or_null<scalar_t>(b_ih), ptr_or_null<scalar_t>(b_hh),
                        cx.const_data_ptr<scalar_t>(), hy.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(),
                        ws.mutable_data_ptr<scalar_t>(), static_cast<index_t>(hy.size(1)),
                        static_cast<index_t>(total));
  });
}

void lstm_backward_kernel_cuda(const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& cx, const Tensor& cy,
                               const Tensor& ws, const Tensor& grad_gates, const Tensor& grad_cx,
                               const Tensor& grad_b_ih, const Tensor& grad_b_hh) {
  const int64_t total = grad_cx.numel();
  const c10::cuda::CUDAGuard guard(ws.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (total != 0) {
    CONVRNN_DISPATCH_FLOATING(ws.scalar_type(), "convrnn.lstm_cell_backward", [&] {
      CONVRNN_LAUNCH_CELL(ws.numel(), total, stream, lstm_backward_kernel, grad_hy.const_data_ptr<scalar_t>(),
                          grad_cy.const_data_ptr<scalar_t>(), cx.const_data_ptr<scalar_t>(),
                          cy.const_data_ptr<scalar_t>(), ws.const_data_ptr<scalar_t>(),
                          grad_gates.mutable_data_ptr<scalar_t>(), grad_cx.mutable_data_ptr<scalar_t>(),
                          static_cast<index_t>(cx.size(1)), static_cast<index_t>(total));
    });
  }
  bias_sums(grad_gates, grad_b_ih);
  bias_sums(grad_gates, grad_b_hh);
}

void gru_kernel_cuda(const Tensor& gates_x, const Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
                     const Tensor& hx, const Tensor& hy, const Tensor& ws) {
  const int64_t total = hy.numel();
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(hy.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  CONVRNN_DISPATCH_FLOATING(hy.scalar_type(), "convrnn.gru_cell", [&] {
    CONVRNN_LAUNCH_CELL(4 * total, total, stream, gru_kernel, gates_x.const_data_ptr<scalar_t>(),
                        gates_h.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(b_ih), ptr_or_null<scalar_t>(b_hh),
                        hx.const_data_ptr<scalar_t>(), hy.mutable_data_ptr<scalar_t>(),
                        ws.defined() ? ws.mutable_data_ptr<scalar_t>() : nullptr, static_cast<index_t>(hy.size(1)),
                        static_cast<index_t>(total));
  });
}

void gru_backward_kernel_cuda(const Tensor& grad_hy, const Tensor& hx, const Tensor& ws, const Tensor& grad_gates_x,
                              const Tensor& grad_gates_h, const Tensor& grad_hx, const Tensor& grad_b_ih,
                              const Tensor& grad_b_hh) {
  const int64_t total = grad_hx.numel();
  const c10::cuda::CUDAGuard guard(ws.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (total != 0) {
    CONVRNN_DISPATCH_FLOATING(ws.scalar_type(), "convrnn.gru_cell_backward", [&] {
      CONVRNN_LAUNCH_CELL(ws.numel(), total, stream, gru_backward_kernel, grad_hy.const_data_ptr<scalar_t>(),
                          hx.const_data_ptr<scalar_t>(), ws.const_data_ptr<scalar_t>(),
                          grad_gates_x.mutable_data_ptr<scalar_t>(), grad_gates_h.mutable_data_ptr<scalar_t>(),
                          grad_hx.mutable_data_ptr<scalar_t>(), static_cast<index_t>(hx.size(1)),
                          static_cast<index_t>(total));
    });
  }
  bias_sums(grad_gates_x, grad_b_ih);
  bias_sums(grad_gates_h, grad_b_hh);
}

void rnn_kernel_cuda(const Tensor& gates_x, const Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
                     const Tensor& hy, bool relu) {
  const int64_t total = hy.numel();
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(hy.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor& gx = gates_h.defined() ? gates_x : hy;  // in place: hy holds the summed products
  CONVRNN_DISPATCH_FLOATING(hy.scalar_type(), "convrnn.rnn_cell", [&] {
    CONVRNN_LAUNCH_CELL(total, total, stream, rnn_kernel, gx.const_data_ptr<scalar_t>(),
                        ptr_or_null<scalar_t>(gates_h), ptr_or_null<scalar_t>(b_ih), ptr_or_null<scalar_t>(b_hh),
                        hy.mutable_data_ptr<scalar_t>(), relu, static_cast<index_t>(hy.size(1)),
                        static_cast<index_t>(total));
  });
}

void rnn_backward_kernel_cuda(const Tensor& grad_hy, const Tensor& hy, const Tensor& grad_pre,
                              const Tensor& grad_b_ih, const Tensor& grad_b_hh, bool relu) {
  const int64_t total = hy.numel();
  const c10::cuda::CUDAGuard guard(hy.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (total != 0) {
    CONVRNN_DISPATCH_FLOATING(hy.scalar_type(), "convrnn.rnn_cell_backward", [&] {
      CONVRNN_LAUNCH_CELL(total, total, stream, rnn_backward_kernel, grad_hy.const_data_ptr<scalar_t>(),
                          hy.const_data_ptr<scalar_t>(), grad_pre.mutable_data_ptr<scalar_t>(), relu,
                          static_cast<index_t>(total));
    });
  }
  bias_sums(grad_pre, grad_b_ih);
  bias_sums(grad_pre, grad_b_hh);
}

const CellKernels kCudaKernels{mm_gate_products, mm_gate_product_grads,    lstm_kernel_cuda,
                               lstm_backward_kernel_cuda, gru_kernel_cuda, gru_backward_kernel_cuda,
                               rnn_kernel_cuda,           rnn_backward_kernel_cuda};

// ---- the fused ops ----

std::tuple<Tensor, Tensor, Tensor> lstm_cell_cuda(const Tensor& gates_x, const Tensor& gates_h, const Tensor& cx,
                                                  const OptTensor& b_ih, const OptTensor& b_hh) {
  const CellDims d = check_cell_gates("lstm_cell_fused", 4, gates_x, gates_h, b_ih, b_hh, {{"cx", &cx}});
  const c10::cuda::CUDAGuard guard(gates_x.device());
  const auto opts = gates_x.options();
  Tensor hy = at::empty({d.B, d.H}, opts), cy = at::empty({d.B, d.H}, opts), ws = at::empty({d.B, 4 * d.H}, opts);
  lstm_kernel_cuda(gates_x.contiguous(), gates_h.contiguous(), contiguous_opt(b_ih), contiguous_opt(b_hh),
                   cx.contiguous(), hy, cy, ws);
  return {hy, cy, ws};
}

std::tuple<Tensor, Tensor> lstm_cell_backward_cuda(const OptTensor& grad_hy, const OptTensor& grad_cy,
                                                   const Tensor& cx, const Tensor& cy, const Tensor& workspace) {
  const c10::cuda::CUDAGuard guard(workspace.device());
  const Tensor ghy = zeros_if_absent(grad_hy, cy), gcy = zeros_if_absent(grad_cy, cy);
  const CellDims d = check_cell_backward("lstm_cell_fused_backward", workspace,
                                         {{"cx", &cx}, {"cy", &cy}, {"grad_hy", &ghy}, {"grad_cy", &gcy}});
  Tensor gg = at::empty({d.B, 4 * d.H}, workspace.options()), gcx = at::empty({d.B, d.H}, workspace.options());
  lstm_backward_kernel_cuda(ghy, gcy, cx.contiguous(), cy.contiguous(), workspace.contiguous(), gg, gcx, Tensor(),
                            Tensor());
  return {gg, gcx};
}

std::tuple<Tensor, Tensor> gru_cell_cuda(const Tensor& gates_x, const Tensor& gates_h, const Tensor& hx,
                                         const OptTensor& b_ih, const OptTensor& b_hh) {
  const CellDims d = check_cell_gates("gru_cell_fused", 3, gates_x, gates_h, b_ih, b_hh, {{"hx", &hx}});
  const c10::cuda::CUDAGuard guard(gates_x.device());
  Tensor hy = at::empty({d.B, d.H}, gates_x.options()), ws = at::empty({d.B, 4 * d.H}, gates_x.options());
  gru_kernel_cuda(gates_x.contiguous(), gates_h.contiguous(), contiguous_opt(b_ih), contiguous_opt(b_hh),
                  hx.contiguous(), hy, ws);
  return {hy, ws};
}

std::tuple<Tensor, Tensor, Tensor> gru_cell_backward_cuda(const Tensor& grad_hy, const Tensor& hx,
                                                          const Tensor& workspace) {
  const CellDims d = check_cell_backward("gru_cell_fused_backward", workspace, {{"hx", &hx}, {"grad_hy", &grad_hy}});
  const c10::cuda::CUDAGuard guard(workspace.device());
  const auto opts = workspace.options();
  Tensor gx = at::empty({d.B, 3 * d.H}, opts), gh = at::empty({d.B, 3 * d.H}, opts), ghx = at::empty({d.B, d.H}, opts);
  gru_backward_kernel_cuda(grad_hy.contiguous(), hx.contiguous(), workspace.contiguous(), gx, gh, ghx, Tensor(),
                           Tensor());
  return {gx, gh, ghx};
}

Tensor rnn_cell_cuda(const Tensor& gates_x, const Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
                     bool relu) {
  const CellDims d = check_cell_gates("rnn_cell_fused", 1, gates_x, gates_h, b_ih, b_hh);
  const c10::cuda::CUDAGuard guard(gates_x.device());
  Tensor hy = at::empty({d.B, d.H}, gates_x.options());
  rnn_kernel_cuda(gates_x.contiguous(), gates_h.contiguous(), contiguous_opt(b_ih), contiguous_opt(b_hh), hy, relu);
  return hy;
}

Tensor rnn_cell_backward_cuda(const Tensor& grad_hy, const Tensor& hy, bool relu) {
  check_rnn_backward("rnn_cell_fused_backward", grad_hy, hy);
  const c10::cuda::CUDAGuard guard(hy.device());
  Tensor gpre = at::empty(hy.sizes(), hy.options());
  rnn_backward_kernel_cuda(grad_hy.contiguous(), hy.contiguous(), gpre, Tensor(), Tensor(), relu);
  return gpre;
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CUDA, m) {
  m.impl("lstm_cell_fused", &convrnn::lstm_cell_cuda);
  m.impl("lstm_cell_fused_backward", &convrnn::lstm_cell_backward_cuda);
  m.impl("gru_cell_fused", &convrnn::gru_cell_cuda);
  m.impl("gru_cell_fused_backward", &convrnn::gru_cell_backward_cuda);
  m.impl("rnn_cell_fused", &convrnn::rnn_cell_cuda);
  m.impl("rnn_cell_fused_backward", &convrnn::rnn_cell_backward_cuda);
  convrnn::register_cell_ops(m, convrnn::kCudaKernels);
}
