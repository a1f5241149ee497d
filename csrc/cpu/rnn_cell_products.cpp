// CPU gate products of the whole-cell ops (CellKernels::products and product_grads).
//
// float and double call BLAS (cpu/blas.h) on the tensors' memory directly, float above batch 1
// our panel kernel instead where it runs (cpu/panel_gemm.h: MKL's generic path on AMD CPUs
// was the slower; B=64 LSTM forward+backward 1.21x -> 1.44x torch).  At a batch-1 step
// at::mm's own work (dispatch, transposed views, output checks and allocation) took ~4 of its
// ~6 us a call; six calls a step.
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
#include <type_traits>
#include <utility>
#include <vector>

#include "avx512.h"
#include "blas.h"
#include "panel_gemm.h"
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
  bool panel = true;  // the whole product may go to cpu_gemm::gemm (cpu_gemm::serves_size)
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
  if constexpr (std::is_same_v<T, float>) {
    if (g.panel && cpu_gemm::gemm(g.ta, g.tb, g.m, g.n, g.k, g.a, g.lda, g.b, g.ldb, g.accumulate, g.c, g.ldc)) return;
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
void run_all(std::vector<Gemm<T>> gemms, bool independent) {
  int64_t macs = 0;
  for (auto& g : gemms) {
    macs += g.m * g.n * g.k;
    g.panel = cpu_gemm::serves_size(g.m, g.n, g.k);  // asked of the whole product, before any slice
  }
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

// Batch 1 (one row of x and h, the character model's step): the products read each weight
// matrix once and are bound by its bytes.  They run here, not in BLAS, in chunks of
// kBatch1Rows weight rows; the chunks go to the threads when the weights have at least
// kBatch1ParallelElems elements (both matrices), else run on the calling thread.  A chunk
// always covers the same rows, and every sum over rows adds the chunks' partial sums in chunk
// order, so the bits depend on the shapes only, not on the thread count.  The forward's and
// the backward's chunks go to the same threads, so that each core reads its weight rows from
// its own L2 in both (benchmarks/NOTES-rnn-cells.md, v8).
constexpr int64_t kBatch1Rows = 64;
constexpr int64_t kBatch1ParallelElems = int64_t(1) << 16;

int64_t batch1_chunk_count(int64_t N) {
  return (N + kBatch1Rows - 1) / kBatch1Rows;
}

// Runs f(r0, r1, chunk) for every chunk of N rows (K weights a row in all).
template <typename F>
void batch1_chunks(int64_t N, int64_t K, const F& f) {
  const int64_t chunks = batch1_chunk_count(N);
  auto run = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c * kBatch1Rows, std::min(N, (c + 1) * kBatch1Rows), c);
  };
  if (N * K >= kBatch1ParallelElems && chunks > 1 && at::get_num_threads() > 1) {
    at::parallel_for(0, chunks, 1, run);
  } else {
    run(0, chunks);
  }
}

// The two backward products that read one weight matrix, in one pass over N of its rows:
// grad_in (K) += g (N) w (N x K), and grad_w (N x K) = g^T x, an outer product (either may be
// absent).  Both are bound by the bytes of w and grad_w (each touched once; ~80 GB/s from L2
// on the project machine).  BLAS runs them as a gemv and a ger, two passes with their own
// setup: 16.7 us against 10.5 us for the LSTM's 512 x (65 + 128) weights, one thread, warm.
template <typename T, bool IN, bool GW>
CONVRNN_CPU_CLONES void batch1_rows(int64_t N, int64_t K, const T* __restrict g, const T* __restrict w, int64_t ldw,
                                    const T* __restrict x, T* __restrict gin, T* __restrict gw) {
  for (int64_t r = 0; r < N; ++r) {
    const T a = g[r];
    const T* __restrict wr = w + r * ldw;
    T* __restrict gwr = gw + r * K;
    for (int64_t k = 0; k < K; ++k) {
      if (IN) gin[k] += a * wr[k];
      if (GW) gwr[k] = a * x[k];
    }
  }
}

// One weight's pair of products over rows [r0, r1) of w (gin: this chunk's own sums, or
// null; grad_w: contiguous, or undefined).
template <typename T>
void batch1_part(const T* g, const Tensor& w, const T* x, T* gin, const Tensor& grad_w, int64_t r0, int64_t r1) {
  const int64_t K = w.size(1);
  T* gw = grad_w.defined() ? grad_w.data_ptr<T>() + r0 * K : nullptr;
  const T* wp = cptr<T>(w) + r0 * ld(w);
  if (gin != nullptr && gw != nullptr) {
    batch1_rows<T, true, true>(r1 - r0, K, g + r0, wp, ld(w), x, gin, gw);
  } else if (gin != nullptr) {
    batch1_rows<T, true, false>(r1 - r0, K, g + r0, wp, ld(w), x, gin, gw);
  } else if (gw != nullptr) {
    batch1_rows<T, false, true>(r1 - r0, K, g + r0, wp, ld(w), x, gin, gw);
  }
}

// Batch 1 forward: out[r] = dot(w[r], x) (+ out[r] with accumulate) for rows [0, N), four rows
// a pass so that each x vector serves four rows (float on AVX-512 takes batch1_dots16 instead).
// The dot products are reductions the compiler may reorder only under `omp simd`; the order is
// fixed by the clone's vector width.
template <typename T>
CONVRNN_CPU_CLONES void batch1_dots(int64_t N, int64_t K, const T* __restrict w, int64_t ldw, const T* __restrict x,
                                    T* __restrict out, bool accumulate) {
  int64_t r = 0;
  for (; r + 4 <= N; r += 4) {
    const T* __restrict w0 = w + r * ldw;
    const T* __restrict w1 = w0 + ldw;
    const T* __restrict w2 = w1 + ldw;
    const T* __restrict w3 = w2 + ldw;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < K; ++k) {
      s0 += w0[k] * x[k];
      s1 += w1[k] * x[k];
      s2 += w2[k] * x[k];
      s3 += w3[k] * x[k];
    }
    out[r] = accumulate ? out[r] + s0 : s0;
    out[r + 1] = accumulate ? out[r + 1] + s1 : s1;
    out[r + 2] = accumulate ? out[r + 2] + s2 : s2;
    out[r + 3] = accumulate ? out[r + 3] + s3 : s3;
  }
  for (; r < N; ++r) {
    const T* __restrict wr = w + r * ldw;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += wr[k] * x[k];
    out[r] = accumulate ? out[r] + s : s;
  }
}

#if CONVRNN_HAVE_AVX512
// batch1_dots for float on AVX-512, 16 rows a pass: each row's 16 lane sums (k in order, the
// tail of K masked into the low lanes) in its own accumulator, then the 16 rows' lane sums at once
// (sum16).  batch1_dots ends each row with its lanes added one by one (`omp simd` keeps the
// order): 16 dependent scalar adds a row, about half of its time at K = 65 or 128 (perf
// annotate, the character model's step).  A last pass of fewer rows repeats its last row in the
// spare accumulators and stores only its own.
CONVRNN_AVX512 void batch1_dots16(int64_t N, int64_t K, const float* __restrict w, int64_t ldw,
                                  const float* __restrict x, float* __restrict out, bool accumulate) {
  const int64_t full = K / 16 * 16;
  const __mmask16 tail = lane_mask(K - full);
  for (int64_t r = 0; r < N; r += 16) {
    const int64_t nr = std::min<int64_t>(16, N - r);
    const float* rows[16];
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      rows[i] = w + (r + std::min<int64_t>(i, nr - 1)) * ldw;
      acc[i] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < full; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[i] + k), xv, acc[i]);
    }
    if (tail != 0) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + full);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, rows[i] + full), xv, acc[i]);
    }
    const __mmask16 m = lane_mask(nr);
    __m512 s = sum16(acc);
    if (accumulate) s = _mm512_add_ps(_mm512_maskz_loadu_ps(m, out + r), s);
    _mm512_mask_storeu_ps(out + r, m, s);
  }
}

// batch1_dots16's form in AVX2 + FMA, 8 rows a pass (CPUs without AVX-512): each row's 8 lane
// sums (k in order, K's tail masked into the low lanes) in its own register, then the 8 rows'
// sums from one tree of horizontal adds and a 128-bit-lane add, in place of batch1_dots' 8
// dependent scalar adds per row.
CONVRNN_AVX2 void batch1_dots8(int64_t N, int64_t K, const float* __restrict w, int64_t ldw, const float* __restrict x,
                               float* __restrict out, bool accumulate) {
  const int64_t full = K / 8 * 8;
  const __m256i tail = lane_mask8(K - full);
  for (int64_t r = 0; r < N; r += 8) {
    const int64_t nr = std::min<int64_t>(8, N - r);
    const float* rows[8];
    __m256 acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      rows[i] = w + (r + std::min<int64_t>(i, nr - 1)) * ldw;
      acc[i] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < full; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[i] + k), xv, acc[i]);
    }
    if (K > full) {
      const __m256 xv = _mm256_maskload_ps(x + full, tail);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(_mm256_maskload_ps(rows[i] + full, tail), xv, acc[i]);
    }
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    const __m256i m = lane_mask8(nr);
    if (accumulate) sums = _mm256_add_ps(_mm256_maskload_ps(out + r, m), sums);
    _mm256_maskstore_ps(out + r, m, sums);
  }
}
#endif

// out (N) = w (N x K) x, + out with accumulate: batch1_dots16 (AVX-512) or batch1_dots8 (AVX2)
// where they run, else batch1_dots.
template <typename T>
void dots(int64_t N, int64_t K, const T* w, int64_t ldw, const T* x, T* out, bool accumulate) {
#if CONVRNN_HAVE_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx512f()) {
      batch1_dots16(N, K, w, ldw, x, out, accumulate);
      return;
    }
    if (cpu_has_avx2_fma()) {
      batch1_dots8(N, K, w, ldw, x, out, accumulate);
      return;
    }
  }
#endif
  batch1_dots<T>(N, K, w, ldw, x, out, accumulate);
}

// gates (N) = w_ih x, then + w_hh h (or gates_h = w_hh h).
template <typename T>
void batch1_forward(const Tensor& w_ih, const T* x, const Tensor& w_hh, const T* h, T* gates, T* gates_h) {
  const int64_t N = w_ih.size(0), I = w_ih.size(1), H = w_hh.size(1);
  batch1_chunks(N, I + H, [&](int64_t r0, int64_t r1, int64_t) {
    dots<T>(r1 - r0, I, cptr<T>(w_ih) + r0 * ld(w_ih), ld(w_ih), x, gates + r0, false);
    T* oh = gates_h != nullptr ? gates_h : gates;
    dots<T>(r1 - r0, H, cptr<T>(w_hh) + r0 * ld(w_hh), ld(w_hh), h, oh + r0, gates_h == nullptr);
  });
}

// The backward's products: grad_input = gx w_ih, grad_hx (+)= gh w_hh, grad_w_ih = gx^T x,
// grad_w_hh = gh^T h (each may be undefined; all contiguous).
template <typename T>
void batch1_products(const T* gx, const Tensor& w_ih, const T* x, const Tensor& grad_input, const T* gh,
                     const Tensor& w_hh, const T* h, const Tensor& grad_hx, bool accumulate_hx,
                     const Tensor& grad_w_ih, const Tensor& grad_w_hh) {
  const int64_t N = w_ih.size(0), I = w_ih.size(1), H = w_hh.size(1);
  T* gin = grad_input.defined() ? grad_input.data_ptr<T>() : nullptr;
  T* ghx = grad_hx.defined() ? grad_hx.data_ptr<T>() : nullptr;
  // sums[c]: chunk c's partial sums, I of grad_input then H of grad_hx.
  const int64_t chunks = batch1_chunk_count(N), L = I + H;
  std::vector<T> sums(gin != nullptr || ghx != nullptr ? chunks * L : 0, T(0));
  batch1_chunks(N, L, [&](int64_t r0, int64_t r1, int64_t c) {
    T* own = sums.empty() ? nullptr : sums.data() + c * L;
    batch1_part<T>(gx, w_ih, x, gin != nullptr ? own : nullptr, grad_w_ih, r0, r1);
    batch1_part<T>(gh, w_hh, h, ghx != nullptr ? own + I : nullptr, grad_w_hh, r0, r1);
  });
  if (gin != nullptr) std::fill(gin, gin + I, T(0));
  if (ghx != nullptr && !accumulate_hx) std::fill(ghx, ghx + H, T(0));
  for (int64_t c = 0; c < chunks && !sums.empty(); ++c) {
    const T* own = sums.data() + c * L;
    if (gin != nullptr) for (int64_t k = 0; k < I; ++k) gin[k] += own[k];
    if (ghx != nullptr) for (int64_t k = 0; k < H; ++k) ghx[k] += own[I + k];
  }
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
    if (B == 1) {
      batch1_forward<T>(w_ih, cptr<T>(x), w_hh, cptr<T>(h), gates.data_ptr<T>(),
                        gates_h.defined() ? gates_h.data_ptr<T>() : nullptr);
      return;
    }
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
    if (B == 1) {
      batch1_products<T>(cptr<T>(grad_x), w_ih, cptr<T>(x), grad_input, cptr<T>(grad_h), w_hh, cptr<T>(h), grad_hx,
                         accumulate_hx, grad_w_ih, grad_w_hh);
      return;
    }
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
    run_all<T>(std::move(gemms), true);
  });
}

}  // namespace convrnn
