// Host stand-in for CUDA's <mma.h> (nvcuda::wmma), for running the conv2d GEMM kernels under
// the CPU emulation (cuda_emulation.h, included before this).  Every lane holds a whole
// fragment (redundantly), the products are summed in float in k order, and only lane 0 of a
// warp writes memory in store_matrix_sync.  It checks the kernels' tiling and indexing, not the
// tensor cores' rounding (the GPU sums a k-step's products in its own order).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

inline float wmma_emu_float(float v) { return v; }
inline float wmma_emu_float(__half v) { return __half2float(v); }
inline float wmma_emu_float(__nv_bfloat16 v) { return __bfloat162float(v); }

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
};

inline float __float_to_tf32(float f) {  // round to nearest (ties away), 10-bit mantissa
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) {
    u += 0x1000u;
    u &= 0xffffe000u;
  }
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool rm = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = wmma_emu_float(rm ? p[r * ldm + c] : p[r + c * ldm]);
}

template <int M, int N, int K, typename T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K, typename TA, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K, typename T>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t l) {
  if (threadIdx.x % 32 != 0) return;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (l == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[i * N + j];
}

}  // namespace wmma
}  // namespace nvcuda
