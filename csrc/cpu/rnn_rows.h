// The per-row loops of the CPU recurrent kernels: the fused cell ops and whole-cell ops
// (rnn_cells.cpp) and the CPU layer recurrence (rnn_recurrence.cpp).
//
// Within a row one loop over hidden units j reads the gate blocks at j, H + j, 2H + j, ... as
// contiguous streams, so the compiler vectorises it, float activations included (exp_poly in
// rnn_cells.h).  The formulas are rnn_cells.h's, shared with the CUDA kernels.  Each file that
// includes this gets its own copies (an anonymous namespace): the loops are cloned per
// instruction set (CONVRNN_CPU_CLONES) in the file that calls them.
#pragma once

#include <type_traits>

#include "rnn_cells.h"

namespace convrnn {
namespace {

// Calls f(std::bool_constant<a>, std::bool_constant<b>): the row templates' flags from runtime values.
template <typename F>
void with_flags(bool a, bool b, const F& f) {
  auto inner = [&](auto x) { b ? f(x, std::true_type()) : f(x, std::false_type()); };
  a ? inner(std::true_type()) : inner(std::false_type());
}

// IN_PLACE: the output (ws, or hy for the RNN) holds gates_x + gates_h on entry and gx, gh are
// unused (the whole-cell ops); otherwise pre = gx + gh (the fused ops).  Reading through the
// output pointer keeps the __restrict promises.

// Sum of the products and both biases for gate column k of a row (column kh of gh).
template <typename T, bool BIAS, bool IN_PLACE>
CONVRNN_INLINE acc_t<T> pre(const T* gx, const T* gh, const T* bi, const T* bh, int64_t k, int64_t kh) {
  acc_t<T> v = static_cast<acc_t<T>>(gx[k]);
  if (!IN_PLACE) v += static_cast<acc_t<T>>(gh[kh]);
  if (BIAS) v += static_cast<acc_t<T>>(bi[k]) + static_cast<acc_t<T>>(bh[k]);
  return v;
}

// n units of a row: gate q of unit j at gx[q * ld + j] (likewise bi, bh and ws) and at
// gh[q * ldh + j] (the CPU recurrence reads its products from a task's own block of n-unit
// gates); without WS the activated gates are not stored.
template <typename T, bool BIAS, bool IN_PLACE, bool WS = true>
CONVRNN_CPU_CLONES void lstm_row(const T* __restrict gx, const T* __restrict gh, const T* __restrict bi,
                                 const T* __restrict bh, const T* __restrict cx, T* __restrict hy, T* __restrict cy,
                                 T* __restrict ws, int64_t n, int64_t ld, int64_t ldh) {
  using A = acc_t<T>;
  const T* g = IN_PLACE ? ws : gx;
  for (int64_t j = 0; j < n; ++j) {
    const LstmGates<A> a = lstm_gates(pre<T, BIAS, IN_PLACE>(g, gh, bi, bh, j, j),
                                      pre<T, BIAS, IN_PLACE>(g, gh, bi, bh, ld + j, ldh + j),
                                      pre<T, BIAS, IN_PLACE>(g, gh, bi, bh, 2 * ld + j, 2 * ldh + j),
                                      pre<T, BIAS, IN_PLACE>(g, gh, bi, bh, 3 * ld + j, 3 * ldh + j));
    A h, c;
    lstm_update(a, static_cast<A>(cx[j]), h, c);
    hy[j] = static_cast<T>(h);
    cy[j] = static_cast<T>(c);
    if (WS) {
      ws[j] = static_cast<T>(a.i);
      ws[ld + j] = static_cast<T>(a.f);
      ws[2 * ld + j] = static_cast<T>(a.g);
      ws[3 * ld + j] = static_cast<T>(a.o);
    }
  }
}

// n units of a row, gate blocks `ld` apart (gh's `ldh` apart), as lstm_row; ws: r, z, n and hn.
template <typename T, bool BIAS, bool WS>
CONVRNN_CPU_CLONES void gru_row(const T* __restrict gx, const T* __restrict gh, const T* __restrict bi,
                                const T* __restrict bh, const T* __restrict hx, T* __restrict hy, T* __restrict ws,
                                int64_t n, int64_t ld, int64_t ldh) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < n; ++j) {
    A xb[3], hb[3];
    for (int k = 0; k < 3; ++k) {
      xb[k] = static_cast<A>(gx[k * ld + j]) + (BIAS ? static_cast<A>(bi[k * ld + j]) : A(0));
      hb[k] = static_cast<A>(gh[k * ldh + j]) + (BIAS ? static_cast<A>(bh[k * ld + j]) : A(0));
    }
    A r, z, nn, h;
    gru_forward(xb[0], xb[1], xb[2], hb[0], hb[1], hb[2], static_cast<A>(hx[j]), r, z, nn, h);
    hy[j] = static_cast<T>(h);
    if (WS) {
      ws[j] = static_cast<T>(r);
      ws[ld + j] = static_cast<T>(z);
      ws[2 * ld + j] = static_cast<T>(nn);
      ws[3 * ld + j] = static_cast<T>(hb[2]);
    }
  }
}

template <typename T, bool BIAS, bool IN_PLACE>
CONVRNN_CPU_CLONES void rnn_row(const T* __restrict gx, const T* __restrict gh, const T* __restrict bi,
                                const T* __restrict bh, T* __restrict hy, int64_t H, bool relu) {
  const T* g = IN_PLACE ? hy : gx;
  for (int64_t j = 0; j < H; ++j) {
    hy[j] = static_cast<T>(rnn_activation(pre<T, BIAS, IN_PLACE>(g, gh, bi, bh, j, j), relu));
  }
}

// Backward rows cover n hidden units (a chunk of the row; gate blocks H apart).  With BSUM
// they add each pre-activation gradient to bsum (gate-major, n per gate) in acc_t<T>.  The sums
// of each gate go through their own __restrict pointer (bias_sums): with one pointer and
// runtime offsets k * n the compiler must assume the gates' sums overlap, and left these loops
// scalar.

template <typename A, int G>
struct BiasSums {
  A* p[G];
};

template <typename A, int G>
CONVRNN_INLINE BiasSums<A, G> bias_sums(A* bsum, int64_t n) {
  BiasSums<A, G> s{};
  for (int k = 0; k < G; ++k) s.p[k] = bsum != nullptr ? bsum + k * n : nullptr;
  return s;
}

template <typename T, bool BSUM>
CONVRNN_INLINE void lstm_backward_units(const T* __restrict ghy, const T* __restrict gcy, const T* __restrict cx,
                                        const T* __restrict cy, const T* __restrict ws, T* __restrict gg,
                                        T* __restrict gcx, acc_t<T>* __restrict s0, acc_t<T>* __restrict s1,
                                        acc_t<T>* __restrict s2, acc_t<T>* __restrict s3, int64_t H, int64_t n) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < n; ++j) {
    const LstmGates<A> a{static_cast<A>(ws[j]), static_cast<A>(ws[H + j]), static_cast<A>(ws[2 * H + j]),
                         static_cast<A>(ws[3 * H + j])};
    A d[4], dc;
    lstm_backward(a, static_cast<A>(cx[j]), static_cast<A>(cy[j]), static_cast<A>(ghy[j]), static_cast<A>(gcy[j]), d,
                  dc);
    for (int k = 0; k < 4; ++k) gg[k * H + j] = static_cast<T>(d[k]);
    if (BSUM) {
      s0[j] += d[0];
      s1[j] += d[1];
      s2[j] += d[2];
      s3[j] += d[3];
    }
    gcx[j] = static_cast<T>(dc);
  }
}

template <typename T, bool BSUM>
CONVRNN_CPU_CLONES void lstm_backward_row(const T* __restrict ghy, const T* __restrict gcy, const T* __restrict cx,
                                          const T* __restrict cy, const T* __restrict ws, T* __restrict gg,
                                          T* __restrict gcx, acc_t<T>* __restrict bsum, int64_t H, int64_t n) {
  const auto s = bias_sums<acc_t<T>, 4>(bsum, n);
  lstm_backward_units<T, BSUM>(ghy, gcy, cx, cy, ws, gg, gcx, s.p[0], s.p[1], s.p[2], s.p[3], H, n);
}

// bsum: 3n sums of the input-side gradients, then 3n of the hidden-side ones.
template <typename T, bool BSUM>
CONVRNN_INLINE void gru_backward_units(const T* __restrict ghy, const T* __restrict hx, const T* __restrict ws,
                                       T* __restrict gx, T* __restrict gh, T* __restrict ghx,
                                       acc_t<T>* __restrict x0, acc_t<T>* __restrict x1, acc_t<T>* __restrict x2,
                                       acc_t<T>* __restrict h0, acc_t<T>* __restrict h1, acc_t<T>* __restrict h2,
                                       int64_t H, int64_t n) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < n; ++j) {
    A dx[3], dh[3], d;
    gru_backward(static_cast<A>(ws[j]), static_cast<A>(ws[H + j]), static_cast<A>(ws[2 * H + j]),
                 static_cast<A>(ws[3 * H + j]), static_cast<A>(hx[j]), static_cast<A>(ghy[j]), dx, dh, d);
    for (int k = 0; k < 3; ++k) {
      gx[k * H + j] = static_cast<T>(dx[k]);
      gh[k * H + j] = static_cast<T>(dh[k]);
    }
    if (BSUM) {
      x0[j] += dx[0];
      x1[j] += dx[1];
      x2[j] += dx[2];
      h0[j] += dh[0];
      h1[j] += dh[1];
      h2[j] += dh[2];
    }
    ghx[j] = static_cast<T>(d);
  }
}

template <typename T, bool BSUM>
CONVRNN_CPU_CLONES void gru_backward_row(const T* __restrict ghy, const T* __restrict hx, const T* __restrict ws,
                                         T* __restrict gx, T* __restrict gh, T* __restrict ghx,
                                         acc_t<T>* __restrict bsum, int64_t H, int64_t n) {
  const auto s = bias_sums<acc_t<T>, 6>(bsum, n);
  gru_backward_units<T, BSUM>(ghy, hx, ws, gx, gh, ghx, s.p[0], s.p[1], s.p[2], s.p[3], s.p[4], s.p[5], H, n);
}

template <typename T, bool BSUM>
CONVRNN_CPU_CLONES void rnn_backward_row(const T* __restrict ghy, const T* __restrict hy, T* __restrict gpre,
                                         acc_t<T>* __restrict bsum, int64_t n, bool relu) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < n; ++j) {
    const A d = rnn_activation_grad(static_cast<A>(ghy[j]), static_cast<A>(hy[j]), relu);
    gpre[j] = static_cast<T>(d);
    if (BSUM) bsum[j] += d;
  }
}

// Writes the bias gradients of a chunk of units [j0, j0 + n): `blocks` gate blocks of H, sums
// gate-major n per gate, into each defined output.
template <typename T>
void store_bias_sums(const acc_t<T>* sums, int64_t blocks, int64_t H, int64_t j0, int64_t n,
                     std::initializer_list<const at::Tensor*> outs) {
  for (const at::Tensor* out : outs) {
    if (!out->defined()) continue;
    T* p = out->data_ptr<T>();
    for (int64_t k = 0; k < blocks; ++k) {
      for (int64_t j = 0; j < n; ++j) p[k * H + j0 + j] = static_cast<T>(sums[k * n + j]);
    }
  }
}

}  // namespace
}  // namespace convrnn
