// BLAS called directly by the CPU recurrent kernels (rnn_cell_products.cpp, rnn_recurrence.cpp).
//
// float and double call the routine at::mm reaches in torch's x86 builds (sgemm_ / dgemm_: MKL),
// declared weak as torch declares them, so a build without them links and falls back.  MKL's
// packed-matrix API (cblas_sgemm_pack / _compute: the right operand laid out once in MKL's
// internal panels, reused by every product with the same shape) and its thread-local thread
// count are weak too.
//
// Row-major throughout: C (m x n) = op(A) op(B) (+ C).  Column-major BLAS computes C^T =
// op(B)^T op(A)^T with the same memory, so A and B swap places and the flags carry over.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's thread-local thread count (0: back to the global one).  torch turns MKL's dynamic
// adjustment off, so without it MKL would start its own threads inside ours.
// Returns the thread's previous value.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));  // the C entry (mkl_set_num_threads_local is Fortran)
// The packed API (MKL_INT = int: LP64; the CBLAS enums are ints).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace convrnn {
namespace cpu_blas {

// Below this many multiply-adds a step's products run on the calling thread (BLAS decides its
// own threads there); a fork-join costs a few microseconds.
constexpr int64_t kParallelMacs = int64_t(1) << 21;
// Below this many multiply-adds a step's products run with MKL single-threaded (Sequential
// below): MKL forks its OpenMP team even for a batch-1 gemv (perf: mkl_blas_sgemv_omp), which
// costs more than it saves at the vanilla RNN cell's 128 x 128 (RNN cell, B=1, forward+backward:
// 1.42-1.51x -> 1.56-1.66x torch, interleaved); the LSTM's 512 x 128 gains from MKL's two
// threads (1.98x -> 1.89x single-threaded), the GRU's 384 x 128 neither way: the bound lies
// below the GRU's and LSTM's batch-1 forwards (74K and 98K) and above the RNN's backward (50K).
constexpr int64_t kSequentialMacs = int64_t(1) << 16;

// CBLAS constants of the packed API.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

inline void gemm(bool ta, bool tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta,
                 float* c, int ldc) {
  const float one = 1.0f;
  sgemm_(tb ? "T" : "N", ta ? "T" : "N", &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

inline void gemm(bool ta, bool tb, int m, int n, int k, const double* a, int lda, const double* b, int ldb,
                 double beta, double* c, int ldc) {
  const double one = 1.0;
  dgemm_(tb ? "T" : "N", ta ? "T" : "N", &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

// BLAS takes this dtype and is linked in.
inline bool available(at::ScalarType s) {
  return (s == at::kFloat && sgemm_ != nullptr) || (s == at::kDouble && dgemm_ != nullptr);
}

// MKL's packed sgemm is linked in.
inline bool packed_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

// BLAS on one thread while in scope (in a task of ours); the thread's setting before is restored.
struct Sequential {
  int before = 0;
  Sequential() {
    if (MKL_Set_Num_Threads_Local != nullptr) before = MKL_Set_Num_Threads_Local(1);
  }
  ~Sequential() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(before);
  }
  Sequential(const Sequential&) = delete;
  Sequential& operator=(const Sequential&) = delete;
};

}  // namespace cpu_blas
}  // namespace convrnn
