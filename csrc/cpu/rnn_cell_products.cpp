// CPU gate products of the whole-cell ops (CellKernels::products and product_grads).
//
// float and double call BLAS (cpu/blas.h) on the tensors' memory directly.  At a batch-1
// step at::mm's own work (dispatch, transposed views, output checks and allocation) took ~4
// of its ~6 us a call; six calls a step.
// Half types, and anything BLAS cannot take, go through at::mm (mm_gate_products).
//
// A step with enough work splits its products over the intra-op threads itself, calling BLAS
// single-threaded inside the parallel region: the backward's four independent products go to
// the threads whole when they balance (at 2 threads they do: grad_input + grad_w_hh and
// grad_hx + grad_w_ih cost the same), otherwise thread t of T computes the t-th slice (a block
// of output columns, or of weight-gradient rows) of every product.  Either way every output
// element is computed by one BLAS call in an order fixed by the shapes and T.
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <vector>

#include "blas.h"
#include "rnn_cells.h"

namespace convrnn {
namespace {

using at::Tensor;

// One product, row-major: c (m x n) = op(a) op(b), added to c's values with accumulate.
template <typename T>
struct Gemm {
  bool ta, tb;
  int64_t m, n, k;
  const T* a;
  int64_t lda;
  const T* b;
  int64_t ldb;
  bool accumulate;
  T* c;
  int64_t ldc;
  bool split_rows;  // slices are blocks of c's rows (else of its columns)
};

template <typename T>
void run(const Gemm<T>& g) {
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {
    if (!g.accumulate) {
      for (int64_t i = 0; i < g.m; ++i) std::fill(g.c + i * g.ldc, g.c + i * g.ldc + g.n, T(0));
    }
    return;
  }
  cpu_blas::gemm(g.ta, g.tb, int(g.m), int(g.n), int(g.k), g.a, int(g.lda), g.b, int(g.ldb),
                 g.accumulate ? T(1) : T(0), g.c, int(g.ldc));
}

// Slice p of P of a product: a block of rows or columns of c (multiples of 16 where possible).
template <typename T>
Gemm<T> slice(Gemm<T> g, int64_t p, int64_t P) {
  const int64_t extent = g.split_rows ? g.m : g.n;
  const int64_t step = P == 1 ? extent : std::max<int64_t>(16, (extent + P - 1) / P + 15) / 16 * 16;
  const int64_t lo = std::min(extent, p * step), hi = std::min(extent, lo + step);
  if (g.split_rows) {
    g.a += g.ta ? lo : lo * g.lda;  // rows of op(a)
    g.c += lo * g.ldc;
    g.m = hi - lo;
  } else {
    g.b += g.tb ? lo * g.ldb : lo;  // columns of op(b)
    g.c += lo;
    g.n = hi - lo;
  }
  return g;
}

// Independent products (distinct outputs) that balance over the P threads as they are: which
// thread runs each (longest first onto the least loaded), or an empty vector when the best
// split leaves a thread more than 10% above the mean.
template <typename T>
std::vector<int64_t> whole_assignment(const std::vector<Gemm<T>>& gemms, int64_t P, int64_t macs) {
  if (int64_t(gemms.size()) < P) return {};
  std::vector<int64_t> order(gemms.size()), owner(gemms.size()), load(P, 0);
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  auto cost = [&](int64_t i) { return gemms[i].m * gemms[i].n * gemms[i].k; };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  for (int64_t i : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    owner[i] = t;
    load[t] += cost(i);
  }
  const int64_t most = *std::max_element(load.begin(), load.end());
  return most * 10 * P <= macs * 11 ? owner : std::vector<int64_t>{};
}

// Runs the products, over the threads when they carry enough work: whole products per thread
// when `independent` ones balance (bigger BLAS calls: ~8% faster than halves, measured at B=64),
// else a slice of every product per thread.  Products that write the same output slice it alike
// (then each thread keeps their order).
template <typename T>
void run_all(const std::vector<Gemm<T>>& gemms, bool independent) {
  int64_t macs = 0;
  for (const auto& g : gemms) macs += g.m * g.n * g.k;
  const int64_t P = at::get_num_threads();
  if (P == 1 || macs < cpu_blas::kParallelMacs) {  // MKL's own threads, or none below kSequentialMacs
    std::optional<cpu_blas::Sequential> sequential;
    if (macs < cpu_blas::kSequentialMacs) sequential.emplace();
    for (const auto& g : gemms) run(g);
    return;
  }
  const std::vector<int64_t> owner = independent ? whole_assignment(gemms, P, macs) : std::vector<int64_t>{};
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    const cpu_blas::Sequential sequential;
    for (int64_t p = p0; p < p1; ++p) {
      for (size_t i = 0; i < gemms.size(); ++i) {
        if (owner.empty()) {
          run(slice(gemms[i], p, P));
        } else if (owner[i] == p) {
          run(gemms[i]);
        }
      }
    }
  });
}

// A 2-D tensor BLAS can read in place: rows of unit stride, a leading dimension of at least a
// row (the leading dimension of a single row is free).
bool blas_layout(const Tensor& t) {
  return (t.stride(1) == 1 || t.size(1) <= 1) && (t.size(0) <= 1 || t.stride(0) >= std::max<int64_t>(1, t.size(1))) &&
         t.size(0) < INT_MAX && t.size(1) < INT_MAX && t.stride(0) < INT_MAX;
}

Tensor blas_ready(const Tensor& t) {
  return blas_layout(t) ? t : t.contiguous();
}

int64_t ld(const Tensor& t) {
  return t.size(0) <= 1 ? std::max<int64_t>(1, t.size(1)) : t.stride(0);
}

template <typename T>
const T* cptr(const Tensor& t) {
  return t.const_data_ptr<T>();
}

}  // namespace

void cpu_gate_products(const Tensor& x_, const Tensor& h_, const Tensor& w_ih_, const Tensor& w_hh_,
                       const Tensor& gates, const Tensor& gates_h) {
  if (!cpu_blas::available(gates.scalar_type()) || w_ih_.size(0) >= INT_MAX || w_ih_.size(1) >= INT_MAX) {
    mm_gate_products(x_, h_, w_ih_, w_hh_, gates, gates_h);
    return;
  }
  const Tensor x = blas_ready(x_), h = blas_ready(h_), w_ih = blas_ready(w_ih_), w_hh = blas_ready(w_hh_);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "convrnn.cell_products", [&] {
    using T = scalar_t;
    const int64_t B = gates.size(0), N = gates.size(1);
    // gates = x w_ih^T, then + h w_hh^T (or gates_h = h w_hh^T): both sliced by columns.
    const Gemm<T> gx{false, true, B, N, x.size(1), cptr<T>(x), ld(x), cptr<T>(w_ih), ld(w_ih), false,
                     gates.data_ptr<T>(), N, false};
    const bool split = gates_h.defined();
    const Gemm<T> gh{false, true, B, N, h.size(1), cptr<T>(h), ld(h), cptr<T>(w_hh), ld(w_hh), !split,
                     split ? gates_h.data_ptr<T>() : gates.data_ptr<T>(), N, false};
    run_all<T>({gx, gh}, false);
  });
}

void cpu_gate_product_grads(const Tensor& grad_x, const Tensor& grad_h, const Tensor& x_, const Tensor& h_,
                            const Tensor& w_ih_, const Tensor& w_hh_, const Tensor& grad_input, const Tensor& grad_hx,
                            bool accumulate_hx, const Tensor& grad_w_ih, const Tensor& grad_w_hh) {
  if (!cpu_blas::available(grad_x.scalar_type()) || w_ih_.size(0) >= INT_MAX || w_ih_.size(1) >= INT_MAX) {
    mm_gate_product_grads(grad_x, grad_h, x_, h_, w_ih_, w_hh_, grad_input, grad_hx, accumulate_hx, grad_w_ih,
                          grad_w_hh);
    return;
  }
  const Tensor x = blas_ready(x_), h = blas_ready(h_), w_ih = blas_ready(w_ih_), w_hh = blas_ready(w_hh_);
  AT_DISPATCH_FLOATING_TYPES(grad_x.scalar_type(), "convrnn.cell_product_grads", [&] {
    using T = scalar_t;
    const int64_t B = grad_x.size(0), N = grad_x.size(1), I = x.size(1), H = h.size(1);
    std::vector<Gemm<T>> gemms;
    // grad_input (B x I) = grad_x w_ih, grad_hx (B x H) = grad_h w_hh: sliced by columns.
    if (grad_input.defined()) {
      gemms.push_back({false, false, B, I, N, cptr<T>(grad_x), N, cptr<T>(w_ih), ld(w_ih), false,
                       grad_input.data_ptr<T>(), I, false});
    }
    if (grad_hx.defined()) {
      gemms.push_back({false, false, B, H, N, cptr<T>(grad_h), N, cptr<T>(w_hh), ld(w_hh), accumulate_hx,
                       grad_hx.data_ptr<T>(), H, false});
    }
    // grad_w_ih (N x I) = grad_x^T x, grad_w_hh (N x H) = grad_h^T h: sliced by rows.
    if (grad_w_ih.defined()) {
      gemms.push_back({true, false, N, I, B, cptr<T>(grad_x), N, cptr<T>(x), ld(x), false, grad_w_ih.data_ptr<T>(),
                       I, true});
    }
    if (grad_w_hh.defined()) {
      gemms.push_back({true, false, N, H, B, cptr<T>(grad_h), N, cptr<T>(h), ld(h), false, grad_w_hh.data_ptr<T>(),
                       H, true});
    }
    run_all<T>(gemms, true);
  });
}

}  // namespace convrnn
