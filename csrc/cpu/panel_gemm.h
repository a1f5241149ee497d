// float products of the CPU layer recurrence (rnn_recurrence.cpp) with a right operand packed
// once per layer call: our own kernel, in place of MKL where the CPU has AVX-512F or AVX2 + FMA.
//
// Why: a step's product is small (B=32: 32 x 256 by 256 x 1024; B=1: a 1 x 128 by 128 x 512
// gemv) and repeats for every step with the same right operand.  MKL's packed sgemm ran these at
// 60-70% of an AMD EPYC's peak (its "def" code path there: the gemv in mkl_blas_def_xsgemv, the
// product with a copy of the left operand and a beta-scaling pass), below oneDNN's fused LSTM.
//
// Layout: the right operand B (K x N) in panels of kPanel = 64 columns, panel after panel, each
// panel in strips of strip_width() columns, strip after strip (AVX-512: one strip of 64; AVX2:
// four of 16); in a strip row k's columns are contiguous (panel q's column c, row k at
// q * 64 * K + (c / W) * W * K + k * W + c % W, W the strip width), columns past N are zeros.
// A product walks panel by panel; per panel, blocks of up to 6 rows of A.  AVX-512: 6 x 4 vector
// accumulators (24 of the 32 registers), per k four panel loads and six broadcasts for 24 FMAs.
// AVX2 + FMA (16 registers of 8 lanes): strip by strip, 6 x 2 accumulators, per k two loads and
// six broadcasts for 12 FMAs; a strip's K-block (16 KB) stays in L1 while the row blocks pass.
// Every element of C is one sum over k in order: the bits depend on neither the thread count, nor
// the blocking of rows, nor which of the two forms ran.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace convrnn {
namespace cpu_gemm {

constexpr int64_t kPanel = 64;
// The AVX2 form's strip width.
constexpr int64_t kStrip = 16;

// The kernel runs here (an x86-64 CPU with AVX-512F, or AVX2 and FMA) and is switched on
// (convrnn::_cpu_gemm, CONVRNN_CPU_GEMM; rnn_layers.cpp keeps the switch).
bool enabled();
// The switch: mode -1 asks, 0 off (MKL), 1 on; returns the mode before the call and the layer
// calls that used the kernel so far (convrnn::_cpu_gemm).
std::tuple<int64_t, int64_t> switch_op(int64_t mode);
// Counts a layer call that used the kernel.
void note_run();

// The columns of a strip of the packed form where the kernel runs: kPanel (AVX-512) or kStrip (AVX2).
int64_t strip_width();

// Floats of the packed form of a K x N right operand.
inline int64_t packed_floats(int64_t K, int64_t N) {
  return (N + kPanel - 1) / kPanel * kPanel * K;
}

// Packs B (K x N), column j of it contiguous at col(j) (B^T row-major: a weight's rows), into dst
// (packed_floats(K, N)).
template <typename ColumnPtr>
void pack_columns(int64_t K, int64_t N, const ColumnPtr& col, float* dst) {
  const int64_t W = strip_width();
  for (int64_t q = 0; q * kPanel < N; ++q) {
    float* panel = dst + q * kPanel * K;
    for (int64_t c = 0; c < kPanel; ++c) {
      const int64_t j = q * kPanel + c;
      float* d = panel + c / W * W * K + c % W;
      if (j < N) {
        const float* s = col(j);
        for (int64_t k = 0; k < K; ++k) d[k * W] = s[k];
      } else {
        for (int64_t k = 0; k < K; ++k) d[k * W] = 0.0f;
      }
    }
  }
}

// Packs B (K x N) row-major with leading dimension ld into dst (packed_floats(K, N)).
void pack_rows(const float* b, int64_t ld, int64_t K, int64_t N, float* dst);

// c (m x N, leading dimension ldc) = a (m x K, lda) times the packed B, added to c's values with
// accumulate.  Only where enabled().
void multiply(int64_t m, int64_t N, int64_t K, const float* a, int64_t lda, const float* packed, bool accumulate,
              float* c, int64_t ldc);

// Below this many rows of C a product with B transposed (a weight's rows) goes to MKL: the
// transposed form fills m of a panel's 64 lanes (m = 32: 49 against MKL's 91 GF/s), and packing
// B^T would copy the weight every call.
constexpr int64_t kMinTransposedRows = 48;

// Whether gemm() runs a product of m x n with B transposed or not (enabled(), and not a short
// product with B transposed).
bool serves(bool tb, int64_t m, int64_t n);

// Above this many multiply-adds a whole product (before any split over threads) goes to MKL where
// the AVX2 form would run: MKL's cache blocking wins there (2 threads of the Zen 3, ms: 1600 x 128
// by 128 x 1024 3.9 against 3.4, 256 x 1024 by 1024 x 3072 16.5 against 13.4), ours below (64 x
// 512 by 512 x 2048, 67M: 1.4 against 2.1).  The layers' recurrence (multiply) is not capped.
constexpr int64_t kAvx2MaxMacs = int64_t(1) << 27;
// Whether a whole product of m x n x k multiply-adds may go to gemm(): not past kAvx2MaxMacs with
// the AVX2 form.  Callers that split a product ask this once, for the whole of it, so that the
// bits do not depend on the thread count.
bool serves_size(int64_t m, int64_t n, int64_t k);

// c (m x n, ldc) = op(a) op(b) (+ c with accumulate), row-major, single-threaded (callers split
// the work over their threads): op(a) (m x k) is a (k x m) transposed with ta, op(b) (k x n) b
// (n x k) transposed with tb.  B row-major is read in place as the panels' rows; B transposed is
// packed into panels in a per-thread buffer, or, for at most as many rows of C as columns, the
// product runs transposed (C^T = B op(A)^T: B's rows broadcast, op(A)^T the panels, packed
// unless ta) into a per-thread buffer then copied to c in 16 x 16 register transposes.  Returns
// false, computing nothing, where it does not serve (serves()): the caller then calls BLAS.
bool gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
          bool accumulate, float* c, int64_t ldc);

// out (m x n) = a (m x k) b (k x n), plus out's values with accumulate, for float CPU tensors
// whose rows or columns have unit stride, split over the intra-op threads (blocks of 64 columns,
// or of rows when out is tall); every element is one sum over k in order, so the bits do not
// depend on the thread count (but for B transposed with so many threads that a block of rows is
// shorter than kMinTransposedRows and goes to BLAS).  Returns false, computing nothing, where it
// does not serve (not enabled(), another dtype or device, other strides, sizes past int, a short
// product with B transposed): the caller then uses at::mm.
bool mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, bool accumulate);

}  // namespace cpu_gemm
}  // namespace convrnn
