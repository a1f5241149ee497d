// Gate arithmetic of the fused LSTM, GRU and vanilla RNN cells, shared by the CPU and CUDA
// kernels.  The matrix products (x W_ih^T, h W_hh^T) are torch's; everything after them
// is one of these per element.  Gate order and layout are torch's: LSTM i, f, g, o and GRU
// r, z, n, each a block of H columns of the (B, 4H) or (B, 3H) gate matrices.
#pragma once

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <utility>

#include <torch/library.h>

#include "common.h"

namespace convrnn {

// ---- activations ----
// float on the CPU uses its own exp, branch-free so the compiler vectorises the gate loops
// (libm's expf is a call per element); everything else uses the math library.

#if !defined(__CUDA_ARCH__)
// exp(x) for float: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite), exp(r) by its degree-6
// Taylor polynomial (relative error < 2e-7 on that range), 2^n through the exponent bits.
CONVRNN_HD float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // not fmin/fmax: their NaN rules block vectorising
  const float n = std::rint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.0f / 720.0f;
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
#endif

CONVRNN_HD float sigmoid_of(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + expf(-x));
#else
  return 1.0f / (1.0f + exp_poly(-x));
#endif
}

CONVRNN_HD double sigmoid_of(double x) {
  return 1.0 / (1.0 + exp(-x));
}

CONVRNN_HD float tanh_of(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  // x P(x^2) / Q(x^2), degrees 13 / 6, on x clamped to +-7.905, and +-1 from |x| = 9 (where
  // float tanh is 1): within 5 ulp of tanh over the float range, odd and exact at 0, one
  // division and no exponential (the pointwise LSTM step took 26% less time than with the
  // exponential form, measured at B=64, H=512).
  const bool one = std::fabs(x) >= 9.0f;
  x = x < -7.90531110763549805f ? -7.90531110763549805f : x;
  x = x > 7.90531110763549805f ? 7.90531110763549805f : x;
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = std::fma(p, x2, 2.00018790482477e-13f);
  p = std::fma(p, x2, -8.60467152213735e-11f);
  p = std::fma(p, x2, 5.12229709037114e-08f);
  p = std::fma(p, x2, 1.48572235717979e-05f);
  p = std::fma(p, x2, 6.37261928875436e-04f);
  p = std::fma(p, x2, 4.89352455891786e-03f);
  float q = 1.19825839466702e-06f;
  q = std::fma(q, x2, 1.18534705686654e-04f);
  q = std::fma(q, x2, 2.26843463243900e-03f);
  q = std::fma(q, x2, 4.89352518554385e-03f);
  const float t = x * p / q;
  return one ? std::copysign(1.0f, x) : t;
#endif
}

CONVRNN_HD double tanh_of(double x) {
  return tanh(x);
}

// ---- LSTM ----

template <typename A>
struct LstmGates {
  A i, f, g, o;
};

// Activated gates from the pre-activations (both products and both biases summed).
template <typename A>
CONVRNN_HD LstmGates<A> lstm_gates(A pi, A pf, A pg, A po) {
  return {sigmoid_of(pi), sigmoid_of(pf), tanh_of(pg), sigmoid_of(po)};
}

// c' = f c + i g; h' = o tanh(c').
template <typename A>
CONVRNN_HD void lstm_update(const LstmGates<A>& a, A cx, A& hy, A& cy) {
  cy = a.f * cx + a.i * a.g;
  hy = a.o * tanh_of(cy);
}

// Gradients of the pre-activations (d_pre, in gate order) and of c, from the gradients of
// h' and c' and the saved activated gates.
template <typename A>
CONVRNN_HD void lstm_backward(const LstmGates<A>& a, A cx, A cy, A ghy, A gcy, A d_pre[4], A& gcx) {
  const A tc = tanh_of(cy);
  const A gc = ghy * a.o * (A(1) - tc * tc) + gcy;
  d_pre[0] = gc * a.g * a.i * (A(1) - a.i);
  d_pre[1] = gc * cx * a.f * (A(1) - a.f);
  d_pre[2] = gc * a.i * (A(1) - a.g * a.g);
  d_pre[3] = ghy * tc * a.o * (A(1) - a.o);
  gcx = gc * a.f;
}

// ---- GRU ----
// r = s(xr + hr), z = s(xz + hz), n = tanh(xn + r hn), h' = (1 - z) n + z h, where x* and
// h* include their biases; the forward saves r, z, n and hn for the backward.

template <typename A>
CONVRNN_HD void gru_forward(A xr, A xz, A xn, A hr, A hz, A hn, A hx, A& r, A& z, A& n, A& hy) {
  r = sigmoid_of(xr + hr);
  z = sigmoid_of(xz + hz);
  n = tanh_of(xn + r * hn);
  hy = (A(1) - z) * n + z * hx;
}

// Gradients of the input-side pre-activations dx[3], the hidden-side ones dh[3] (they differ
// only in n: dh_n = dx_n r) and of h through the cell's own update (z ghy).
template <typename A>
CONVRNN_HD void gru_backward(A r, A z, A n, A hn, A hx, A ghy, A dx[3], A dh[3], A& ghx) {
  const A dn = ghy * (A(1) - z) * (A(1) - n * n);
  const A dz = ghy * (hx - n) * z * (A(1) - z);
  const A dr = dn * hn * r * (A(1) - r);
  dx[0] = dr;
  dx[1] = dz;
  dx[2] = dn;
  dh[0] = dr;
  dh[1] = dz;
  dh[2] = dn * r;
  ghx = ghy * z;
}

// ---- vanilla RNN: h' = tanh(pre) or relu(pre) ----

template <typename A>
CONVRNN_HD A rnn_activation(A pre, bool relu) {
  return relu ? (pre > A(0) ? pre : A(0)) : tanh_of(pre);
}

// d pre from d h' and h' itself: tanh' = 1 - h'^2, relu' = [h' > 0].
template <typename A>
CONVRNN_HD A rnn_activation_grad(A ghy, A hy, bool relu) {
  return relu ? (hy > A(0) ? ghy : A(0)) : ghy * (A(1) - hy * hy);
}

// ---- the device-specific part of the cell ops ----
//
// Two kinds of ops use these kernels.  The fused pointwise ops (lstm_cell_fused, ...: what the
// sequence layers call per step) get the two gate products and return the new state.  The
// whole-cell ops (lstm_cell, gru_cell, rnn_cell: one autograd node per step; rnn_cells.cpp, the
// same C++ for every device) call the device's gate products and pointwise kernels below.
// Every tensor here is checked and allocated by the caller; the pointwise kernels get
// contiguous tensors and return at once when there is nothing to compute.

using OptTensor = std::optional<at::Tensor>;

struct CellKernels {
  // gates = x w_ih^T + h w_hh^T, (B, G*H); with gates_h defined, gates = x w_ih^T and
  // gates_h = h w_hh^T (the GRU keeps them apart).  x (B, I) and h (B, H) may be strided.
  void (*products)(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const at::Tensor& gates, const at::Tensor& gates_h);
  // The backward's products, each only where its output is defined: grad_input = grad_x w_ih,
  // grad_hx = grad_h w_hh (added to grad_hx's values with accumulate_hx), grad_w_ih =
  // grad_x^T x, grad_w_hh = grad_h^T h.  grad_x / grad_h: the pre-activation gradients (B, G*H).
  void (*product_grads)(const at::Tensor& grad_x, const at::Tensor& grad_h, const at::Tensor& x,
                        const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const at::Tensor& grad_input, const at::Tensor& grad_hx, bool accumulate_hx,
                        const at::Tensor& grad_w_ih, const at::Tensor& grad_w_hh);
  // pre = gates_x + gates_h (+ b_ih + b_hh) -> hy, cy and the activated gates in ws (B, 4H).
  // With gates_h undefined, ws holds gates_x + gates_h on entry (in place; gates_x unused).
  void (*lstm)(const at::Tensor& gates_x, const at::Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
               const at::Tensor& cx, const at::Tensor& hy, const at::Tensor& cy, const at::Tensor& ws);
  // -> grad_gates (B, 4H), grad_cx; grad_b_ih / grad_b_hh, where defined, get the batch sum of
  // grad_gates (the biases' gradient).
  void (*lstm_backward)(const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& cx,
                        const at::Tensor& cy, const at::Tensor& ws, const at::Tensor& grad_gates,
                        const at::Tensor& grad_cx, const at::Tensor& grad_b_ih, const at::Tensor& grad_b_hh);
  // -> hy and, when ws is defined, the workspace r, z, n, hn (B, 4H).
  void (*gru)(const at::Tensor& gates_x, const at::Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
              const at::Tensor& hx, const at::Tensor& hy, const at::Tensor& ws);
  // -> grad_gates_x, grad_gates_h (B, 3H), the direct part of grad_hx (grad_hy z), and the bias
  // gradients (batch sums of grad_gates_x and grad_gates_h) where defined.
  void (*gru_backward)(const at::Tensor& grad_hy, const at::Tensor& hx, const at::Tensor& ws,
                       const at::Tensor& grad_gates_x, const at::Tensor& grad_gates_h, const at::Tensor& grad_hx,
                       const at::Tensor& grad_b_ih, const at::Tensor& grad_b_hh);
  // hy = act(gates_x + gates_h (+ b_ih + b_hh)); with gates_h undefined, hy holds the sum on entry.
  void (*rnn)(const at::Tensor& gates_x, const at::Tensor& gates_h, const OptTensor& b_ih, const OptTensor& b_hh,
              const at::Tensor& hy, bool relu);
  // -> grad_pre, and its batch sum into grad_b_ih / grad_b_hh where defined.
  void (*rnn_backward)(const at::Tensor& grad_hy, const at::Tensor& hy, const at::Tensor& grad_pre,
                       const at::Tensor& grad_b_ih, const at::Tensor& grad_b_hh, bool relu);
};

// CellKernels::products and product_grads with at::mm (MKL or cuBLAS through the dispatcher).
void mm_gate_products(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const at::Tensor& gates, const at::Tensor& gates_h);
void mm_gate_product_grads(const at::Tensor& grad_x, const at::Tensor& grad_h, const at::Tensor& x,
                           const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const at::Tensor& grad_input, const at::Tensor& grad_hx, bool accumulate_hx,
                           const at::Tensor& grad_w_ih, const at::Tensor& grad_w_hh);

// The CPU's (cpu/rnn_cell_products.cpp): BLAS called directly, work split over threads.
void cpu_gate_products(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                       const at::Tensor& gates, const at::Tensor& gates_h);
void cpu_gate_product_grads(const at::Tensor& grad_x, const at::Tensor& grad_h, const at::Tensor& x,
                            const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                            const at::Tensor& grad_input, const at::Tensor& grad_hx, bool accumulate_hx,
                            const at::Tensor& grad_w_ih, const at::Tensor& grad_w_hh);

// Registers the whole-cell ops (lstm_cell, gru_cell, rnn_cell and their backward ops) for one
// dispatch key, running `kernels` between the gate products (rnn_cells.cpp).
void register_cell_ops(torch::Library& m, const CellKernels& kernels);

// ---- host-side checks (rnn_cells.cpp) ----

struct CellDims {
  int64_t B, H;
};

// A state tensor and the argument name its errors use.
using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Forward checks: gates_x and gates_h are (B, gates*H) of one dtype and device; biases, both
// or neither, (gates*H); every state (B, H).
CellDims check_cell_gates(const char* op, int64_t gates, const at::Tensor& gates_x, const at::Tensor& gates_h,
                          const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                          std::initializer_list<NamedTensor> states = {});

// Backward checks of the LSTM and GRU: the forward's (B, 4H) workspace, every state (B, H).
CellDims check_cell_backward(const char* op, const at::Tensor& workspace, std::initializer_list<NamedTensor> states);

// Backward checks of the vanilla RNN: grad_hy matches hy, a (B, H) matrix.
void check_rnn_backward(const char* op, const at::Tensor& grad_hy, const at::Tensor& hy);

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// An optional incoming gradient (undefined when autograd had none for that output).
inline at::Tensor zeros_if_absent(const std::optional<at::Tensor>& t, const at::Tensor& like) {
  return t.has_value() && t->defined() ? t->contiguous() : at::zeros_like(like);
}

// Kernels index biases as contiguous vectors.
inline std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// t is (B, H) like the cell's state.
void check_state(const char* op, const char* arg, const at::Tensor& t, const CellDims& d, const at::Tensor& ref);

}  // namespace convrnn
