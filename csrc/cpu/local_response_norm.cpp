// CPU local_response_norm forward and backward.
//
// Contiguous (N, C, S) input: one task per (image, block of kBlock spatial positions).  The
// task squares its C x kBlock panel once into a float buffer, then for each channel sums the
// window rows with loops over the contiguous positions (vectorised).  The backward keeps
// two more panels, s^-beta and t = g x s^(-beta-1), and sums t over each channel's users.
// channels_last (N, S, C): one task per spatial position; the loops run over the
// contiguous channels, with the squares (and t) zero-padded so every window is a plain
// shifted sum.  All arithmetic is in float (double for float64 input).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/fresh_memory.h"
#include "local_response_norm.h"

namespace convrnn {
namespace {

using at::Tensor;
constexpr int64_t kBlock = 128;

template <typename A>
struct LrnConstA {
  int64_t size;
  A alpha_over_size, beta, k, grad_coef;
  explicit LrnConstA(const LrnConst& c)
      : size(c.size), alpha_over_size(A(c.alpha_over_size)), beta(A(c.beta)), k(A(c.k)), grad_coef(A(c.grad_coef)) {}
};

// ---- contiguous: panels of C rows x nb positions, row stride S in the tensor ----

// sq[c][b] = x_c^2 over the panel.
template <typename T>
CONVRNN_INLINE void square_panel(const T* __restrict x, int64_t C, int64_t S, int64_t nb, acc_t<T>* __restrict sq) {
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t b = 0; b < nb; ++b) {
      const acc_t<T> v = static_cast<acc_t<T>>(x[c * S + b]);
      sq[c * nb + b] = v * v;
    }
  }
}

// sum[b] = sum of rows [max(0, lo), min(C-1, hi)] of panel v.
template <typename A>
CONVRNN_INLINE void sum_rows(const A* __restrict v, int64_t C, int64_t nb, int64_t lo, int64_t hi, A* __restrict sum) {
  lo = std::max<int64_t>(0, lo);
  hi = std::min<int64_t>(C - 1, hi);
  for (int64_t b = 0; b < nb; ++b) sum[b] = 0;
  for (int64_t j = lo; j <= hi; ++j) {
    for (int64_t b = 0; b < nb; ++b) sum[b] += v[j * nb + b];
  }
}

template <int MODE, typename T>
CONVRNN_CPU_CLONES void forward_panel(const T* __restrict x, T* __restrict y, int64_t C, int64_t S, int64_t nb,
                                      const LrnConstA<acc_t<T>>& p, acc_t<T>* __restrict sq, acc_t<T>* __restrict sum) {
  using A = acc_t<T>;
  square_panel(x, C, S, nb, sq);
  for (int64_t c = 0; c < C; ++c) {
    sum_rows(sq, C, nb, lrn_window_first(c, p.size), lrn_window_last(c, p.size), sum);
    for (int64_t b = 0; b < nb; ++b) {
      const A s = lrn_scale(sum[b], p.alpha_over_size, p.k);
      y[c * S + b] = static_cast<T>(static_cast<A>(x[c * S + b]) * lrn_inv_pow<MODE>(s, p.beta));
    }
  }
}

template <int MODE, typename T>
CONVRNN_CPU_CLONES void backward_panel(const T* __restrict go, const T* __restrict x, T* __restrict gi, int64_t C,
                                       int64_t S, int64_t nb, const LrnConstA<acc_t<T>>& p, acc_t<T>* __restrict sq,
                                       acc_t<T>* __restrict ip, acc_t<T>* __restrict t, acc_t<T>* __restrict sum) {
  using A = acc_t<T>;
  square_panel(x, C, S, nb, sq);
  for (int64_t c = 0; c < C; ++c) {  // ip = s^-beta, t = g x s^(-beta-1)
    sum_rows(sq, C, nb, lrn_window_first(c, p.size), lrn_window_last(c, p.size), sum);
    for (int64_t b = 0; b < nb; ++b) {
      const A s = lrn_scale(sum[b], p.alpha_over_size, p.k);
      const A r = lrn_inv_pow<MODE>(s, p.beta);
      ip[c * nb + b] = r;
      t[c * nb + b] = static_cast<A>(go[c * S + b]) * static_cast<A>(x[c * S + b]) * r / s;
    }
  }
  for (int64_t j = 0; j < C; ++j) {
    sum_rows(t, C, nb, lrn_users_first(j, p.size), lrn_users_last(j, p.size), sum);
    for (int64_t b = 0; b < nb; ++b) {
      const A g = static_cast<A>(go[j * S + b]), v = static_cast<A>(x[j * S + b]);
      gi[j * S + b] = static_cast<T>(g * ip[j * nb + b] - p.grad_coef * v * sum[b]);
    }
  }
}

// ---- channels_last: one row of C contiguous channels; padded buffers hold zeros around it ----

// sum[c] = sum over d in [0, size) of padded[c + d]: every window a plain shifted sum.
template <typename A>
CONVRNN_INLINE void shifted_sums(const A* __restrict padded, int64_t C, int64_t size, A* __restrict sum) {
  for (int64_t c = 0; c < C; ++c) sum[c] = 0;
  for (int64_t d = 0; d < size; ++d) {
    for (int64_t c = 0; c < C; ++c) sum[c] += padded[c + d];
  }
}

// sqp[size/2 + c] = x_c^2 (win(c) = padded [c, c + size)).
template <typename T>
CONVRNN_INLINE void square_row(const T* __restrict x, int64_t C, int64_t size, acc_t<T>* __restrict sqp) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t<T> v = static_cast<acc_t<T>>(x[c]);
    sqp[size / 2 + c] = v * v;
  }
}

template <int MODE, typename T>
CONVRNN_CPU_CLONES void forward_row(const T* __restrict x, T* __restrict y, int64_t C, const LrnConstA<acc_t<T>>& p,
                                    acc_t<T>* __restrict sqp, acc_t<T>* __restrict sum) {
  using A = acc_t<T>;
  square_row(x, C, p.size, sqp);
  shifted_sums(sqp, C, p.size, sum);
  for (int64_t c = 0; c < C; ++c) {
    y[c] = static_cast<T>(static_cast<A>(x[c]) * lrn_inv_pow<MODE>(lrn_scale(sum[c], p.alpha_over_size, p.k), p.beta));
  }
}

template <int MODE, typename T>
CONVRNN_CPU_CLONES void backward_row(const T* __restrict go, const T* __restrict x, T* __restrict gi, int64_t C,
                                     const LrnConstA<acc_t<T>>& p, acc_t<T>* __restrict sqp, acc_t<T>* __restrict tp,
                                     acc_t<T>* __restrict ip, acc_t<T>* __restrict sum) {
  using A = acc_t<T>;
  const int64_t t_before = (p.size - 1) / 2;  // tp[t_before + c] = t_c: users(j) = padded [j, j + size)
  square_row(x, C, p.size, sqp);
  shifted_sums(sqp, C, p.size, sum);
  for (int64_t c = 0; c < C; ++c) {
    const A s = lrn_scale(sum[c], p.alpha_over_size, p.k);
    const A r = lrn_inv_pow<MODE>(s, p.beta);
    ip[c] = r;
    tp[t_before + c] = static_cast<A>(go[c]) * static_cast<A>(x[c]) * r / s;
  }
  shifted_sums(tp, C, p.size, sum);
  for (int64_t c = 0; c < C; ++c) {
    gi[c] = static_cast<T>(static_cast<A>(go[c]) * ip[c] - p.grad_coef * static_cast<A>(x[c]) * sum[c]);
  }
}

// Runs the forward (go == nullptr) or backward over the whole tensor.
template <typename T>
void run(const T* go, const T* x, T* out, const Lrn& g, const LrnConst& c) {
  using A = acc_t<T>;
  const LrnConstA<A> p(c);
  with_lrn_pow(c.pow_mode, [&](auto mode_c) {
    constexpr int MODE = decltype(mode_c)::value;
    if (g.channels_last) {
      const int64_t padded = g.C + p.size - 1;
      at::parallel_for(0, g.N * g.S, std::max<int64_t>(1, 2048 / g.C), [&](int64_t begin, int64_t end) {
        std::vector<A> sqp(padded, A(0)), tp(go ? padded : 0, A(0)), ip(go ? g.C : 0), sum(g.C);
        for (int64_t r = begin; r < end; ++r) {
          if (go) {
            backward_row<MODE, T>(go + r * g.C, x + r * g.C, out + r * g.C, g.C, p, sqp.data(), tp.data(), ip.data(),
                                  sum.data());
          } else {
            forward_row<MODE, T>(x + r * g.C, out + r * g.C, g.C, p, sqp.data(), sum.data());
          }
        }
      });
      return;
    }
    const int64_t blocks = (g.S + kBlock - 1) / kBlock;
    at::parallel_for(0, g.N * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> sq(g.C * kBlock), ip(go ? g.C * kBlock : 0), t(go ? g.C * kBlock : 0), sum(kBlock);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, b0 = (task % blocks) * kBlock, nb = std::min(kBlock, g.S - b0);
        const int64_t off = n * g.C * g.S + b0;
        if (go) {
          backward_panel<MODE, T>(go + off, x + off, out + off, g.C, g.S, nb, p, sq.data(), ip.data(), t.data(),
                                  sum.data());
        } else {
          forward_panel<MODE, T>(x + off, out + off, g.C, g.S, nb, p, sq.data(), sum.data());
        }
      }
    });
  });
}

Tensor lrn_cpu(const Tensor& input, int64_t size, double alpha, double beta, double k) {
  const Lrn g = lrn_geometry("local_response_norm", input, size);
  const Tensor x = input.contiguous(lrn_format(g));
  Tensor out = empty_populated(x.sizes(), x.options().memory_format(lrn_format(g)));
  if (out.numel() == 0) return out;
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.local_response_norm", [&] {
    run<scalar_t>(nullptr, x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, lrn_const(size, alpha, beta, k));
  });
  return out;
}

Tensor lrn_backward_cpu(const Tensor& grad_output, const Tensor& input, int64_t size, double alpha, double beta,
                        double k) {
  const Lrn g = lrn_backward_geometry("local_response_norm_backward", grad_output, input, size);
  const Tensor x = input.contiguous(lrn_format(g));
  const Tensor go = grad_output.contiguous(lrn_format(g));
  Tensor gi = empty_populated(x.sizes(), x.options().memory_format(lrn_format(g)));
  if (gi.numel() == 0) return gi;
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.local_response_norm_backward", [&] {
    run<scalar_t>(go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gi.data_ptr<scalar_t>(), g,
                  lrn_const(size, alpha, beta, k));
  });
  return gi;
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CPU, m) {
  m.impl("local_response_norm", &convrnn::lrn_cpu);
  m.impl("local_response_norm_backward", &convrnn::lrn_backward_cpu);
}
