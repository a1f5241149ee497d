// CUDA fused recurrent cells: the pointwise part of LSTM, GRU and vanilla RNN steps.
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

// Pre-activation of gate column k of row b: both products, and both biases when given.
template <typename T, typename index_t>
__device__ __forceinline__ acc_t<T> pre_at(const T* gx, const T* gh, const T* bi, const T* bh, index_t row,
                                           index_t k) {
  acc_t<T> v = static_cast<acc_t<T>>(gx[row + k]) + static_cast<acc_t<T>>(gh[row + k]);
  if (bi != nullptr) v += static_cast<acc_t<T>>(bi[k]) + static_cast<acc_t<T>>(bh[k]);
  return v;
}

template <typename T, typename index_t>
__global__ void lstm_kernel(const T* __restrict__ gx, const T* __restrict__ gh, const T* __restrict__ bi,
                            const T* __restrict__ bh, const T* __restrict__ cx, T* __restrict__ hy,
                            T* __restrict__ cy, T* __restrict__ ws, index_t H, index_t total) {
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
    ws[wrow + j] = static_cast<T>(r);
    ws[wrow + H + j] = static_cast<T>(z);
    ws[wrow + 2 * H + j] = static_cast<T>(n);
    ws[wrow + 3 * H + j] = static_cast<T>(hb[2]);
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

template <typename T, typename index_t>
__global__ void rnn_kernel(const T* __restrict__ gx, const T* __restrict__ gh, const T* __restrict__ bi,
                           const T* __restrict__ bh, T* __restrict__ hy, bool relu, index_t H, index_t total) {
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

std::tuple<Tensor, Tensor, Tensor> lstm_cell_cuda(const Tensor& gates_x, const Tensor& gates_h, const Tensor& cx,
                                                  const OptTensor& b_ih, const OptTensor& b_hh) {
  const char* op = "lstm_cell_fused";
  const CellDims d = check_cell_gates(op, 4, gates_x, gates_h, b_ih, b_hh, {{"cx", &cx}});
  const OptTensor bi_c = contiguous_opt(b_ih), bh_c = contiguous_opt(b_hh);
  const c10::cuda::CUDAGuard guard(gates_x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor gx = gates_x.contiguous(), gh = gates_h.contiguous(), c = cx.contiguous();
  Tensor hy = at::empty({d.B, d.H}, gx.options()), cy = at::empty({d.B, d.H}, gx.options());
  Tensor ws = at::empty({d.B, 4 * d.H}, gx.options());
  const int64_t total = hy.numel();
  if (total == 0) return {hy, cy, ws};
  CONVRNN_DISPATCH_FLOATING(gx.scalar_type(), "convrnn.lstm_cell_fused", [&] {
    CONVRNN_LAUNCH_CELL(ws.numel(), total, stream, lstm_kernel, gx.const_data_ptr<scalar_t>(),
                        gh.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bi_c), ptr_or_null<scalar_t>(bh_c),
                        c.const_data_ptr<scalar_t>(), hy.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(),
                        ws.mutable_data_ptr<scalar_t>(), static_cast<index_t>(d.H), static_cast<index_t>(total));
  });
  return {hy, cy, ws};
}

std::tuple<Tensor, Tensor> lstm_cell_backward_cuda(const OptTensor& grad_hy, const OptTensor& grad_cy,
                                                   const Tensor& cx, const Tensor& cy, const Tensor& workspace) {
  const char* op = "lstm_cell_fused_backward";
  const Tensor ghy = zeros_if_absent(grad_hy, cy), gcy = zeros_if_absent(grad_cy, cy);
  const CellDims d =
      check_cell_backward(op, workspace, {{"cx", &cx}, {"cy", &cy}, {"grad_hy", &ghy}, {"grad_cy", &gcy}});
  const c10::cuda::CUDAGuard guard(workspace.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor c = cx.contiguous(), c2 = cy.contiguous(), ws = workspace.contiguous();
  Tensor gg = at::empty({d.B, 4 * d.H}, ws.options()), gcx = at::empty({d.B, d.H}, ws.options());
  const int64_t total = gcx.numel();
  if (total == 0) return {gg, gcx};
  CONVRNN_DISPATCH_FLOATING(ws.scalar_type(), "convrnn.lstm_cell_fused_backward", [&] {
    CONVRNN_LAUNCH_CELL(ws.numel(), total, stream, lstm_backward_kernel, ghy.const_data_ptr<scalar_t>(),
                        gcy.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(), c2.const_data_ptr<scalar_t>(),
                        ws.const_data_ptr<scalar_t>(), gg.mutable_data_ptr<scalar_t>(),
                        gcx.mutable_data_ptr<scalar_t>(), static_cast<index_t>(d.H), static_cast<index_t>(total));
  });
  return {gg, gcx};
}

std::tuple<Tensor, Tensor> gru_cell_cuda(const Tensor& gates_x, const Tensor& gates_h, const Tensor& hx,
                                         const OptTensor& b_ih, const OptTensor& b_hh) {
  const char* op = "gru_cell_fused";
  const CellDims d = check_cell_gates(op, 3, gates_x, gates_h, b_ih, b_hh, {{"hx", &hx}});
  const OptTensor bi_c = contiguous_opt(b_ih), bh_c = contiguous_opt(b_hh);
  const c10::cuda::CUDAGuard guard(gates_x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor gx = gates_x.contiguous(), gh = gates_h.contiguous(), h = hx.contiguous();
  Tensor hy = at::empty({d.B, d.H}, gx.options()), ws = at::empty({d.B, 4 * d.H}, gx.options());
  const int64_t total = hy.numel();
  if (total == 0) return {hy, ws};
  CONVRNN_DISPATCH_FLOATING(gx.scalar_type(), "convrnn.gru_cell_fused", [&] {
    CONVRNN_LAUNCH_CELL(ws.numel(), total, stream, gru_kernel, gx.const_data_ptr<scalar_t>(),
                        gh.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bi_c), ptr_or_null<scalar_t>(bh_c),
                        h.const_data_ptr<scalar_t>(), hy.mutable_data_ptr<scalar_t>(), ws.mutable_data_ptr<scalar_t>(),
                        static_cast<index_t>(d.H), static_cast<index_t>(total));
  });
  return {hy, ws};
}

std::tuple<Tensor, Tensor, Tensor> gru_cell_backward_cuda(const Tensor& grad_hy, const Tensor& hx,
                                                          const Tensor& workspace) {
  const char* op = "gru_cell_fused_backward";
  const CellDims d = check_cell_backward(op, workspace, {{"hx", &hx}, {"grad_hy", &grad_hy}});
  const c10::cuda::CUDAGuard guard(workspace.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor ghy = grad_hy.contiguous(), h = hx.contiguous(), ws = workspace.contiguous();
  Tensor gx = at::empty({d.B, 3 * d.H}, ws.options()), gh = at::empty({d.B, 3 * d.H}, ws.options());
  Tensor ghx = at::empty({d.B, d.H}, ws.options());
  const int64_t total = ghx.numel();
  if (total == 0) return {gx, gh, ghx};
  CONVRNN_DISPATCH_FLOATING(ws.scalar_type(), "convrnn.gru_cell_fused_backward", [&] {
    CONVRNN_LAUNCH_CELL(ws.numel(), total, stream, gru_backward_kernel, ghy.const_data_ptr<scalar_t>(),
                        h.const_data_ptr<scalar_t>(), ws.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
                        gh.mutable_data_ptr<scalar_t>(), ghx.mutable_data_ptr<scalar_t>(), static_cast<index_t>(d.H),
                        static_cast<index_t>(total));
  });
  return {gx, gh, ghx};
}

Tensor rnn_cell_cuda(const Tensor& gates_x, const Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
                     bool relu) {
  const char* op = "rnn_cell_fused";
  const CellDims d = check_cell_gates(op, 1, gates_x, gates_h, b_ih, b_hh);
  const OptTensor bi_c = contiguous_opt(b_ih), bh_c = contiguous_opt(b_hh);
  const c10::cuda::CUDAGuard guard(gates_x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor gx = gates_x.contiguous(), gh = gates_h.contiguous();
  Tensor hy = at::empty({d.B, d.H}, gx.options());
  const int64_t total = hy.numel();
  if (total == 0) return hy;
  CONVRNN_DISPATCH_FLOATING(gx.scalar_type(), "convrnn.rnn_cell_fused", [&] {
    CONVRNN_LAUNCH_CELL(total, total, stream, rnn_kernel, gx.const_data_ptr<scalar_t>(), gh.const_data_ptr<scalar_t>(),
                        ptr_or_null<scalar_t>(bi_c), ptr_or_null<scalar_t>(bh_c), hy.mutable_data_ptr<scalar_t>(), relu,
                        static_cast<index_t>(d.H), static_cast<index_t>(total));
  });
  return hy;
}

Tensor rnn_cell_backward_cuda(const Tensor& grad_hy, const Tensor& hy, bool relu) {
  const char* op = "rnn_cell_fused_backward";
  check_rnn_backward(op, grad_hy, hy);
  const c10::cuda::CUDAGuard guard(hy.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor g = grad_hy.contiguous(), h = hy.contiguous();
  Tensor gpre = at::empty(h.sizes(), h.options());
  const int64_t total = gpre.numel();
  if (total == 0) return gpre;
  CONVRNN_DISPATCH_FLOATING(h.scalar_type(), "convrnn.rnn_cell_fused_backward", [&] {
    CONVRNN_LAUNCH_CELL(total, total, stream, rnn_backward_kernel, g.const_data_ptr<scalar_t>(),
                        h.const_data_ptr<scalar_t>(), gpre.mutable_data_ptr<scalar_t>(), relu,
                        static_cast<index_t>(total));
  });
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
}
