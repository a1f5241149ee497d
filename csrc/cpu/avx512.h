// The float32 AVX-512 pieces the CPU kernels share (conv2d, max_pool2d, panel_gemm, the batch-1
// cell products): the runtime CPU check, lane masks, a 16 x 16 register transpose and 16
// horizontal sums at once.  Functions carrying CONVRNN_AVX512 are
// compiled for AVX-512 whatever the build's baseline and are called only after cpu_has_avx512f().
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define CONVRNN_HAVE_AVX512 1
#include <immintrin.h>

#include <cstdint>

#define CONVRNN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
// The AVX2 + FMA forms beside the AVX-512 ones (panel GEMM, conv2d, the batch-1 cell dots), called
// only after cpu_has_avx2_fma().
#define CONVRNN_AVX2 __attribute__((target("avx2,fma")))

namespace convrnn {

inline bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// AVX2 and FMA, for the kernels that have an AVX2 form (CONVRNN_AVX2) beside their AVX-512 one.
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// The first n of AVX2's 8 lanes as a maskload / maskstore mask (n clamped to [0, 8]), for the
// AVX2 + FMA kernels' partial vectors.
CONVRNN_AVX2 inline __m256i lane_mask8(int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 0 ? 0 : n > 8 ? 8 : n)), lanes);
}

// The first n lanes (n clamped to [0, 16]).
CONVRNN_AVX512 inline __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

// 16 x 16 transpose: dst row j (at dst + j*dstride) = column j of the 16 src rows; only
// nr src rows and nc src columns are read (and nc dst rows of nr values written).  (GCC 12 warns,
// wherever this is inlined, about the _mm512_undefined_ps inside its own unpack and shuffle
// intrinsics.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
CONVRNN_AVX512 inline void transpose16(const float* src, int64_t sstride, float* dst, int64_t dstride, int nr = 16,
                                       int nc = 16) {
  __m512 r[16], t[16];
  const __mmask16 cm = lane_mask(nc), rm = lane_mask(nr);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = i < nr ? _mm512_maskz_loadu_ps(cm, src + i * sstride) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + i + 4], 0x88);
      t[8 * h + i + 4] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + i + 4], 0xdd);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j)
    if (j < nc) _mm512_mask_storeu_ps(dst + j * dstride, rm, r[j]);
}

// Lane i of the result = the sum of v[i]'s 16 lanes, for 16 vectors at once: pairs of vectors
// halve into one (unpack, 128-bit-lane shuffles) four times, 45 instructions for 16 sums where
// each sum alone is a 16-deep chain of scalar adds.  The additions' order is fixed: ((l + l^2) +
// (l^1 + l^3)) within each 128-bit lane, then lanes (0 + 2) + (1 + 3).
CONVRNN_AVX512 inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    // (v0[0]+v0[2], v1[0]+v1[2], v0[1]+v0[3], v1[1]+v1[3]) in each 128-bit lane
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    // rows 4i .. 4i+3, each summed over its 128-bit lane, in lane order
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    // [b0: lanes 0+2, 1+3 | b1: lanes 0+2, 1+3]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xee));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
}
#pragma GCC diagnostic pop

}  // namespace convrnn
#endif
