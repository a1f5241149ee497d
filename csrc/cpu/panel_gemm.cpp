// The AVX-512 panel kernel of panel_gemm.h (float), and its switch.
#include "panel_gemm.h"

#include <atomic>

#include "../switches.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#define CONVRNN_PANEL_AVX512 1
#define CONVRNN_PANEL_TARGET __attribute__((target("avx512f,fma")))
#else
#define CONVRNN_PANEL_AVX512 0
#endif

namespace convrnn {
namespace cpu_gemm {
namespace {

std::atomic<int>& mode() {
  static std::atomic<int> m(env_mode("CONVRNN_CPU_GEMM", 1));
  return m;
}

std::atomic<int64_t> runs{0};

#if CONVRNN_PANEL_AVX512
bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// Rows [0, R) of a block times one panel: c (R x 64, the valid columns by the four masks).
template <int R>
CONVRNN_PANEL_TARGET void block(int64_t K, const float* a, int64_t lda, const float* panel, bool accumulate, float* c,
                                int64_t ldc, const __mmask16* mask) {
  __m512 acc[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(mask[v], c + r * ldc + 16 * v) : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kPanel;
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32),
                 w3 = _mm512_loadu_ps(w + 48);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(x, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(x, w3, acc[r][3]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mask[v], acc[r][v]);
  }
}

using Block = void (*)(int64_t, const float*, int64_t, const float*, bool, float*, int64_t, const __mmask16*);
constexpr Block kBlocks[7] = {nullptr, block<1>, block<2>, block<3>, block<4>, block<5>, block<6>};
#endif

}  // namespace

bool enabled() {
#if CONVRNN_PANEL_AVX512
  return mode().load(std::memory_order_relaxed) != 0 && cpu_has_avx512f();
#else
  return false;
#endif
}

std::tuple<int64_t, int64_t> switch_op(int64_t value) {
  return convrnn::switch_op("_cpu_gemm", mode(), runs, value, 1);
}

void note_run() {
  runs.fetch_add(1, std::memory_order_relaxed);
}

void pack_rows(const float* b, int64_t ld, int64_t K, int64_t N, float* dst) {
  for (int64_t q = 0; q * kPanel < N; ++q) {
    const int64_t j0 = q * kPanel, cols = N - j0 < kPanel ? N - j0 : kPanel;
    float* panel = dst + j0 * K;
    for (int64_t k = 0; k < K; ++k) {
      const float* s = b + k * ld + j0;
      float* d = panel + k * kPanel;
      for (int64_t c = 0; c < cols; ++c) d[c] = s[c];
      for (int64_t c = cols; c < kPanel; ++c) d[c] = 0.0f;
    }
  }
}

void multiply(int64_t m, int64_t N, int64_t K, const float* a, int64_t lda, const float* packed, bool accumulate,
              float* c, int64_t ldc) {
#if CONVRNN_PANEL_AVX512
  if (m <= 0 || N <= 0) return;
  // row blocks as even as possible, at most 6 rows each (32 rows: 6 6 5 5 5 5)
  const int64_t blocks = (m + 5) / 6;
  for (int64_t q = 0; q * kPanel < N; ++q) {
    const int64_t j0 = q * kPanel, cols = N - j0;
    __mmask16 mask[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t left = cols - 16 * v;
      mask[v] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
    }
    const float* panel = packed + j0 * K;
    int64_t r0 = 0;
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t rows = (m - r0) / (blocks - i) + ((m - r0) % (blocks - i) != 0);
      kBlocks[rows](K, a + r0 * lda, lda, panel, accumulate, c + r0 * ldc + j0, ldc, mask);
      r0 += rows;
    }
  }
#else
  (void)m, (void)N, (void)K, (void)a, (void)lda, (void)packed, (void)accumulate, (void)c, (void)ldc;
#endif
}

}  // namespace cpu_gemm
}  // namespace convrnn
