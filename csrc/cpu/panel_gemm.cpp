// The panel kernel of panel_gemm.h (float), in an AVX-512 and an AVX2 + FMA form, and its switch.
#include "panel_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <vector>

#include "../switches.h"
#include "avx512.h"
#include "blas.h"

#ifdef CONVRNN_HAVE_AVX512  // cpu/avx512.h: CONVRNN_AVX512, CONVRNN_AVX2, cpu_has_avx512f, transpose16
#define CONVRNN_PANEL_AVX512 1
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
// Which form runs: AVX-512 where the CPU has AVX-512F, else AVX2 + FMA where it has both, else
// none (MKL).
enum class Isa { kNone, kAvx2, kAvx512 };
Isa isa() {
  return cpu_has_avx512f() ? Isa::kAvx512 : cpu_has_avx2_fma() ? Isa::kAvx2 : Isa::kNone;
}

// Rows [0, R) of a block of A (element (r, k) at a[r * ars + k * aks]) times 64 columns of B
// (row k at b + k * ldb: a panel, ldb = kPanel, or B's own rows) over K into c (R x 64, the
// first `cols` columns valid), starting from c's values with accumulate.
template <int R, bool kFull>
CONVRNN_AVX512 void block(int64_t K, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb,
                          bool accumulate, float* c, int64_t ldc, int64_t cols) {
  const __mmask16 mask[4] = {lane_mask(cols), lane_mask(cols - 16), lane_mask(cols - 32), lane_mask(cols - 48)};
  __m512 acc[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(mask[v], c + r * ldc + 16 * v) : _mm512_setzero_ps();
    }
  }
  // masked loads for a partial panel (B's own rows must not be read past their end); a full one
  // (kFull) loads without masks, which leaves the mask registers free
  const __mmask16 m0 = mask[0], m1 = mask[1], m2 = mask[2], m3 = mask[3];
  for (int64_t k = 0; k < K; ++k) {
    const float* w = b + k * ldb;
    __m512 w0, w1, w2, w3;
    if constexpr (kFull) {
      w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
    } else {
      w0 = _mm512_maskz_loadu_ps(m0, w), w1 = _mm512_maskz_loadu_ps(m1, w + 16), w2 = _mm512_maskz_loadu_ps(m2, w + 32),
      w3 = _mm512_maskz_loadu_ps(m3, w + 48);
    }
    const float* ak = a + k * aks;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(ak[r * ars]);
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

// The same product with AVX2's 8-lane registers (16 of them), on one strip of 16 of a panel's 64
// columns: R x 2 accumulators (12 of the 16 registers at R = 6), per k two strip loads and R
// broadcasts for 2R FMAs.  B's strip s at b + s * sstride, its row k at + k * ldb: a packed
// strip (ldb = 16, strips kStrip * K apart: 16 KB a K-block, contiguous, in L1 while every row
// block of a group passes over it) or B's own rows.  Below 3 rows a strip's 2R accumulators are
// too few chains to hide the FMA's latency (4 cycles, 2 FMAs a cycle: 8 chains), so S = 4 / R
// strips run at once (2R x S = 8 accumulators): a batch-1 step's gemv was latency-bound at 2
// chains.  Each element of C is the same sum over k in order as block()'s: the same bits.  Lanes
// past `cols` (counted from the first strip) by masked loads and stores (B's own rows are not
// read past their end).
template <int R, bool kFull>
CONVRNN_AVX2 void block_avx2(int64_t K, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb,
                             int64_t sstride, bool accumulate, float* c, int64_t ldc, int64_t cols) {
  constexpr int S = R == 1 ? 4 : R == 2 ? 2 : 1;
  __m256i mask[S][2];
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s) {
    const int64_t left = cols - 16 * s;
    mask[s][0] = lane_mask8(left), mask[s][1] = lane_mask8(left - 8);
  }
  __m256 acc[R][S][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      float* cr = c + r * ldc + 16 * s;
      if (!accumulate) {
        acc[r][s][0] = _mm256_setzero_ps(), acc[r][s][1] = _mm256_setzero_ps();
      } else if constexpr (kFull) {
        acc[r][s][0] = _mm256_loadu_ps(cr), acc[r][s][1] = _mm256_loadu_ps(cr + 8);
      } else {
        acc[r][s][0] = _mm256_maskload_ps(cr, mask[s][0]), acc[r][s][1] = _mm256_maskload_ps(cr + 8, mask[s][1]);
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    __m256 wv[S][2];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      const float* w = b + s * sstride + k * ldb;
      if constexpr (kFull) {
        wv[s][0] = _mm256_loadu_ps(w), wv[s][1] = _mm256_loadu_ps(w + 8);
      } else {
        wv[s][0] = _mm256_maskload_ps(w, mask[s][0]), wv[s][1] = _mm256_maskload_ps(w + 8, mask[s][1]);
      }
    }
    const float* ak = a + k * aks;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(ak + r * ars);
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s) {
        acc[r][s][0] = _mm256_fmadd_ps(x, wv[s][0], acc[r][s][0]);
        acc[r][s][1] = _mm256_fmadd_ps(x, wv[s][1], acc[r][s][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      float* cr = c + r * ldc + 16 * s;
      if constexpr (kFull) {
        _mm256_storeu_ps(cr, acc[r][s][0]), _mm256_storeu_ps(cr + 8, acc[r][s][1]);
      } else {
        _mm256_maskstore_ps(cr, mask[s][0], acc[r][s][0]), _mm256_maskstore_ps(cr + 8, mask[s][1], acc[r][s][1]);
      }
    }
  }
}
using Block = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, bool, float*, int64_t,
                       int64_t);
// [full panel][rows]
constexpr Block kBlocks[2][7] = {
    {nullptr, block<1, false>, block<2, false>, block<3, false>, block<4, false>, block<5, false>, block<6, false>},
    {nullptr, block<1, true>, block<2, true>, block<3, true>, block<4, true>, block<5, true>, block<6, true>}};
using StripBlock = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t, bool, float*,
                            int64_t, int64_t);
// [full strips][rows]
constexpr StripBlock kStripBlocks[2][7] = {
    {nullptr, block_avx2<1, false>, block_avx2<2, false>, block_avx2<3, false>, block_avx2<4, false>,
     block_avx2<5, false>, block_avx2<6, false>},
    {nullptr, block_avx2<1, true>, block_avx2<2, true>, block_avx2<3, true>, block_avx2<4, true>,
     block_avx2<5, true>, block_avx2<6, true>}};

// Up to this many k per pass over a column panel (a K-block: 256 x 64 floats of B, 64 KB, stay
// in L2 while every row block of A passes over them); c carries the sums between K-blocks, so the
// order of the sum over k, and the bits, are those of one pass.
constexpr int64_t kBlockK = 256;

// Working memory of one product: from a per-thread buffer kept between calls up to kKeptFloats
// (16 MiB), else allocated for the call alone (a big product's buffer is not held forever).
class Scratch {
 public:
  static constexpr int64_t kKeptFloats = int64_t(4) << 20;

  Scratch(int which, int64_t floats) {
    if (floats > kKeptFloats) {
      own_.resize(floats);
      data_ = own_.data();
      return;
    }
    thread_local std::vector<float> kept[3];
    std::vector<float>& b = kept[which];
    if (int64_t(b.size()) < floats) b.resize(floats);
    data_ = b.data();
  }
  float* data() const {
    return data_;
  }

 private:
  std::vector<float> own_;
  float* data_ = nullptr;
};
// dst ((r, k) at k * kGroupRows + r) = rows [0, rows) of A over k in [0, kc), A's (r, k) at
// a[r + k * aks], rows <= kGroupRows: per k, kGroupRows / 16 masked vector copies (whole lines of
// A where the group starts on one).
constexpr int64_t kGroupRows = 48;
CONVRNN_AVX512 void copy_group(const float* a, int64_t aks, int64_t rows, int64_t kc, float* dst) {
  constexpr int kChunks = kGroupRows / 16;
  __mmask16 mask[kChunks];
  for (int j = 0; j < kChunks; ++j) mask[j] = lane_mask(rows - 16 * j);
  for (int64_t k = 0; k < kc; ++k) {
    const float* src = a + k * aks;
    float* d = dst + k * kGroupRows;
#pragma GCC unroll 8
    for (int j = 0; j < kChunks; ++j) _mm512_store_ps(d + 16 * j, _mm512_maskz_loadu_ps(mask[j], src + 16 * j));
  }
}
// copy_group's copy, its rows past `rows` zeros, for AVX2 (the compiler's vectors).
CONVRNN_AVX2 void copy_group_avx2(const float* __restrict a, int64_t aks, int64_t rows, int64_t kc,
                                  float* __restrict dst) {
  for (int64_t k = 0; k < kc; ++k) {
    const float* __restrict src = a + k * aks;
    float* __restrict d = dst + k * kGroupRows;
    for (int64_t j = 0; j < rows; ++j) d[j] = src[j];
    for (int64_t j = rows; j < kGroupRows; ++j) d[j] = 0.0f;
  }
}

// Rows [0, kc) and columns [0, cols) (cols <= kPanel) of B's own rows (row k at b + k * ldb) into
// dst as strips of kStrip: strip s's row k at dst + s * kStrip * kc + k * kStrip, columns past
// cols zeros (the packed layout of panel_gemm.h for one panel's K-block).
CONVRNN_AVX2 void pack_block_avx2(const float* b, int64_t ldb, int64_t kc, int64_t cols, float* dst) {
  if (cols == kPanel) {
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = b + k * ldb;
#pragma GCC unroll 4
      for (int64_t s = 0; s < kPanel / kStrip; ++s) {
        float* d = dst + s * kStrip * kc + k * kStrip;
        _mm256_storeu_ps(d, _mm256_loadu_ps(src + s * kStrip));
        _mm256_storeu_ps(d + 8, _mm256_loadu_ps(src + s * kStrip + 8));
      }
    }
    return;
  }
  for (int64_t s = 0; s < (cols + kStrip - 1) / kStrip; ++s) {
    const __m256i m0 = lane_mask8(cols - s * kStrip), m1 = lane_mask8(cols - s * kStrip - 8);
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = b + k * ldb + s * kStrip;
      float* d = dst + s * kStrip * kc + k * kStrip;
      _mm256_storeu_ps(d, _mm256_maskload_ps(src, m0));
      _mm256_storeu_ps(d + 8, _mm256_maskload_ps(src + 8, m1));
    }
  }
}

// c (m x n) (+)= A B, AVX-512: A's element (r, k) at a[r * ars + k * aks], B's row k at b + k * ldb,
// or B packed (panel q at b + q * kPanel * K, its row k at + k * kPanel).
//
// A with rows of unit stride (aks == 1) is read in place, panel after panel, each panel's K-block
// (64 KB) staying in L2 while every row block passes over it.  A transposed (a gradient's columns:
// aks = lda, a line, often a page, per k) goes row block after row block instead, from a copy of
// the K-block of a group of 48 rows (48 KB, L2) that serves the group's row blocks and every
// panel, where read in place it cost every panel a strided walk (a layer's grad W_hh, 1024 x 128 x
// 1568 a thread: 89.7 -> 94.2 GF/s a core with a 6-row copy; copying a whole K-block of A at once,
// 1 MB, measured 79).  The 48-row copy reads whole lines of A once where the 6-row one read 24
// bytes of each of 256 lines per block (grad W of 1024 x 256 x 1600, 2 threads: 4.82 -> 4.35 ms,
// session 14).
void run_blocks_avx512(int64_t m, int64_t n, int64_t K, const float* a, int64_t ars, int64_t aks, const float* b,
                       int64_t ldb, bool packed, bool accumulate, float* c, int64_t ldc) {
  const int64_t blocks = (m + 5) / 6;  // row blocks as even as possible, at most 6 rows each (32: 6 6 5 5 5 5)
  const auto rows_of = [&](int64_t i, int64_t r0) { return (m - r0) / (blocks - i) + ((m - r0) % (blocks - i) != 0); };
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t panel_stride = packed ? kPanel * K : kPanel;
  if (packed) ldb = kPanel;
  const auto run = [&](int64_t q, int64_t r0, int64_t rows, int64_t k0, int64_t kc, const float* ab, int64_t rs,
                       int64_t ks) {
    const int64_t j0 = q * kPanel, cols = std::min(kPanel, n - j0);
    kBlocks[cols == kPanel][rows](kc, ab, rs, ks, b + q * panel_stride + k0 * ldb, ldb, accumulate || k0 > 0,
                                  c + r0 * ldc + j0, ldc, cols);
  };
  if (aks == 1) {
    // row blocks in groups of kGroupBlocks (<= 96 rows): a group's K-block of A (<= 96 KB) stays
    // in L2 while every panel passes over it, where all of A's rows per panel re-read A from
    // memory once per panel (256 x 1024 by 1024 x 2048 a thread: A's K-block 1 MB)
    constexpr int64_t kGroupBlocks = 16;
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t kc = std::min(kBlockK, K - k0);
      for (int64_t i0 = 0, g0 = 0; i0 < blocks;) {
        const int64_t i1 = std::min(blocks, i0 + kGroupBlocks);
        int64_t g1 = g0;
        for (int64_t q = 0; q < panels; ++q) {
          int64_t r0 = g0;
          for (int64_t i = i0; i < i1; r0 += rows_of(i, r0), ++i) {
            run(q, r0, rows_of(i, r0), k0, kc, a + r0 * ars + k0, ars, 1);
          }
          g1 = r0;
        }
        i0 = i1, g0 = g1;
      }
    }
    return;
  }
  // A transposed (its rows contiguous at each k: ars == 1, as gemm() passes a gradient's G^T): a
  // group of up to kGroupRows rows copied at once, k by k, into (r, k) at k * kGroupRows + r, and
  // read in place there by every row block inside the group
  TORCH_INTERNAL_ASSERT(ars == 1, "convrnn: run_blocks takes A's rows or columns contiguous");
  alignas(64) float group_a[kGroupRows * kBlockK];
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t kc = std::min(kBlockK, K - k0);
    int64_t g0 = 0, g1 = 0;  // the rows in group_a
    for (int64_t i = 0, r0 = 0; i < blocks; r0 += rows_of(i, r0), ++i) {
      const int64_t rows = rows_of(i, r0);
      if (r0 + rows > g1) {
        g0 = r0;
        g1 = std::min(m, r0 + kGroupRows);
        copy_group(a + r0 + k0 * aks, aks, g1 - g0, kc, group_a);
      }
      for (int64_t q = 0; q < panels; ++q) run(q, r0, rows, k0, kc, group_a + (r0 - g0), 1, kGroupRows);
    }
  }
}

// run_blocks' AVX2 form: the same K-blocks and groups of rows, then per panel strip by strip, and
// per strip every row block of the group, so that the strip's K-block (16 KB) serves them all from
// L1.  B's own rows (not packed) are first packed into strips, a K-block at a time: all panels at
// once where they fit in kPackAllFloats (256 KB; then once for every group of rows), else panel by
// panel.  Read in place, a 64-column panel's rows are one line apart per k only by B's leading
// dimension (1-4 KB in the cells' products), so a strip's 256 lines fell into a few L1 sets and
// came from L2 for every row block.  Measured (one thread, ms, the cells' products at B = 64):
// see benchmarks/NOTES.md, session 22.
void run_blocks_avx2(int64_t m, int64_t n, int64_t K, const float* a, int64_t ars, int64_t aks, const float* b,
                     int64_t ldb, bool packed, bool accumulate, float* c, int64_t ldc) {
  const int64_t blocks = (m + 5) / 6;
  const auto rows_of = [&](int64_t i, int64_t r0) { return (m - r0) / (blocks - i) + ((m - r0) % (blocks - i) != 0); };
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int S = m == 1 ? 4 : m == 2 ? 2 : 1;  // strips a call (block_avx2's S: one row block below 3 rows)
  constexpr int64_t kPackAllFloats = int64_t(64) << 10;
  const int64_t kc_max = std::min(kBlockK, K);
  const bool pack_all = !packed && kc_max * panels * kPanel <= kPackAllFloats;
  const Scratch strips(2, packed ? 0 : pack_all ? kc_max * panels * kPanel : kc_max * kPanel);
  // panel q's K-block [k0, k0 + kc) as block_avx2 takes it: (first strip, row stride, strip stride)
  const auto panel = [&](int64_t q, int64_t k0, int64_t kc, bool pack_now, const float*& sb, int64_t& sld,
                         int64_t& sst) {
    const int64_t j0 = q * kPanel;
    if (packed) {
      sb = b + q * kPanel * K + k0 * kStrip, sld = kStrip, sst = kStrip * K;
      return;
    }
    float* dst = strips.data() + (pack_all ? q * kPanel * kc : 0);
    if (pack_now) pack_block_avx2(b + k0 * ldb + j0, ldb, kc, std::min(kPanel, n - j0), dst);
    sb = dst, sld = kStrip, sst = kStrip * kc;
  };
  // row blocks [i0, i1) (first row r0; A's row r at ab + (r - ar0) * rs, k at ks) over panel q
  const auto pass = [&](int64_t q, int64_t k0, int64_t kc, const float* sb, int64_t sld, int64_t sst, int64_t i0,
                        int64_t i1, int64_t r0, const float* ab, int64_t ar0, int64_t rs, int64_t ks) {
    const int64_t j0 = q * kPanel, cols = std::min(kPanel, n - j0);
    for (int64_t s = 0; s * kStrip < cols; s += S) {
      const int64_t left = cols - s * kStrip;
      const StripBlock* kernels = kStripBlocks[left >= S * kStrip];
      for (int64_t i = i0, r = r0; i < i1; r += rows_of(i, r), ++i) {
        kernels[rows_of(i, r)](kc, ab + (r - ar0) * rs, rs, ks, sb + s * sst, sld, sst, accumulate || k0 > 0,
                               c + r * ldc + j0 + s * kStrip, ldc, left);
      }
    }
  };
  const auto pack_k_block = [&](int64_t k0, int64_t kc) {
    if (pack_all) pack_rows(b + k0 * ldb, ldb, kc, n, strips.data());
  };
  if (aks == 1) {  // groups of kGroupBlocks row blocks, as run_blocks_avx512's
    constexpr int64_t kGroupBlocks = 16;
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t kc = std::min(kBlockK, K - k0);
      pack_k_block(k0, kc);
      for (int64_t i0 = 0, g0 = 0; i0 < blocks;) {
        const int64_t i1 = std::min(blocks, i0 + kGroupBlocks);
        for (int64_t q = 0; q < panels; ++q) {
          const float* sb;
          int64_t sld, sst;
          panel(q, k0, kc, !pack_all, sb, sld, sst);
          pass(q, k0, kc, sb, sld, sst, i0, i1, g0, a + k0, 0, ars, 1);
        }
        for (int64_t i = i0; i < i1; ++i) g0 += rows_of(i, g0);
        i0 = i1;
      }
    }
    return;
  }
  // A transposed: groups of the row blocks that fit in kGroupRows rows, each copied as
  // run_blocks_avx512 copies it
  TORCH_INTERNAL_ASSERT(ars == 1, "convrnn: run_blocks takes A's rows or columns contiguous");
  alignas(64) float group_a[kGroupRows * kBlockK];
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t kc = std::min(kBlockK, K - k0);
    pack_k_block(k0, kc);
    for (int64_t i0 = 0, g0 = 0; i0 < blocks;) {
      int64_t i1 = i0, g1 = g0;
      while (i1 < blocks && g1 + rows_of(i1, g1) - g0 <= kGroupRows) g1 += rows_of(i1, g1), ++i1;
      copy_group_avx2(a + g0 + k0 * aks, aks, g1 - g0, kc, group_a);
      for (int64_t q = 0; q < panels; ++q) {
        const float* sb;
        int64_t sld, sst;
        panel(q, k0, kc, !pack_all, sb, sld, sst);
        pass(q, k0, kc, sb, sld, sst, i0, i1, g0, group_a, g0, 1, kGroupRows);
      }
      i0 = i1, g0 = g1;
    }
  }
}

// c (m x n) (+)= A B as above; B packed (packed_floats, panel_gemm.h's layout for this CPU) or B's
// own rows (row k at b + k * ldb).
void run_blocks(int64_t m, int64_t n, int64_t K, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb,
                bool packed, bool accumulate, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  (isa() == Isa::kAvx2 ? run_blocks_avx2 : run_blocks_avx512)(m, n, K, a, ars, aks, b, ldb, packed, accumulate, c,
                                                              ldc);
}

// dst (cols x rows, ldd) = src (rows x cols, lds) transposed: AVX2's in 8 x 8 register tiles
// (the compiler's scalar loops, which it did not vectorise, took ~14% of a cell's transposed
// forward product), AVX-512's in 16 x 16 ones.
CONVRNN_AVX2 inline void transpose8x8_avx2(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds),
         r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds),
         r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}
CONVRNN_AVX2 void transpose_avx2(int64_t rows, int64_t cols, const float* __restrict src, int64_t lds,
                                 float* __restrict dst, int64_t ldd) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t i0 = 0; i0 < r8; i0 += 8) {
    for (int64_t j0 = 0; j0 < c8; j0 += 8) transpose8x8_avx2(src + i0 * lds + j0, lds, dst + j0 * ldd + i0, ldd);
    for (int64_t j = c8; j < cols; ++j) {
      for (int64_t i = i0; i < i0 + 8; ++i) dst[j * ldd + i] = src[i * lds + j];
    }
  }
  for (int64_t i = r8; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
  }
}
CONVRNN_AVX512 void transpose_avx512(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst,
                                     int64_t ldd) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      transpose16(src + i0 * lds + j0, lds, dst + j0 * ldd + i0, ldd, static_cast<int>(std::min<int64_t>(16, rows - i0)),
                  static_cast<int>(std::min<int64_t>(16, cols - j0)));
    }
  }
}

void transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd) {
  (isa() == Isa::kAvx2 ? transpose_avx2 : transpose_avx512)(rows, cols, src, lds, dst, ldd);
}

#endif

}  // namespace

bool enabled() {
#if CONVRNN_PANEL_AVX512
  return mode().load(std::memory_order_relaxed) != 0 && isa() != Isa::kNone;
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

int64_t strip_width() {
#if CONVRNN_PANEL_AVX512
  return isa() == Isa::kAvx2 ? kStrip : kPanel;
#else
  return kPanel;
#endif
}

void pack_rows(const float* b, int64_t ld, int64_t K, int64_t N, float* dst) {
#if CONVRNN_PANEL_AVX512
  if (isa() == Isa::kAvx2) {  // strips of kStrip: run_blocks_avx2's own K-block packing, a panel at a time
    for (int64_t j0 = 0; j0 < N; j0 += kPanel) pack_block_avx2(b + j0, ld, K, std::min(kPanel, N - j0), dst + j0 * K);
    return;
  }
#endif
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
  run_blocks(m, N, K, a, lda, 1, packed, 0, true, accumulate, c, ldc);
#else
  (void)m, (void)N, (void)K, (void)a, (void)lda, (void)packed, (void)accumulate, (void)c, (void)ldc;
#endif
}

bool serves(bool tb, int64_t m, int64_t n) {
  return enabled() && !(tb && m <= n && m < kMinTransposedRows);
}

bool serves_size(int64_t m, int64_t n, int64_t k) {
#if CONVRNN_PANEL_AVX512
  return isa() != Isa::kAvx2 || m * n * k <= kAvx2MaxMacs;
#else
  (void)m, (void)n, (void)k;
  return false;
#endif
}

bool gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
          bool accumulate, float* c, int64_t ldc) {
#if CONVRNN_PANEL_AVX512
  if (!serves(tb, m, n)) return false;
  if (m <= 0 || n <= 0 || k <= 0) return true;
  // op(A)'s element (r, kk) at a[r * ars + kk * aks]
  const int64_t ars = ta ? 1 : lda, aks = ta ? lda : 1;
  if (!tb) {  // B row-major (k x n): its own rows serve as the panels' rows
    run_blocks(m, n, k, a, ars, aks, b, ldb, false, accumulate, c, ldc);
  } else if (m <= n) {
    // C^T (n x m) = B op(A)^T into a buffer (B's rows, b[j * ldb + kk], broadcast; op(A)^T (k x m)
    // the panels: op(A)'s rows as they are where ta, else packed), then transposed into c: packing
    // B^T would copy the weight every call, and C^T's rows written straight into c's columns
    // measured 19% of the time in scattered copies
    const Scratch result(1, n * m);
    float* ct = result.data();
    if (accumulate) transpose(m, n, c, ldc, ct, m);
    if (ta) {
      run_blocks(n, m, k, b, ldb, 1, a, lda, false, accumulate, ct, m);
    } else {
      const Scratch packed(0, packed_floats(k, m));
      float* p = packed.data();
      pack_columns(k, m, [&](int64_t i) { return a + i * lda; }, p);
      run_blocks(n, m, k, b, ldb, 1, p, 0, true, accumulate, ct, m);
    }
    transpose(n, m, ct, m, c, ldc);
  } else {  // B^T's rows packed into panels
    const Scratch packed(0, packed_floats(k, n));
    float* p = packed.data();
    pack_columns(k, n, [&](int64_t j) { return b + j * ldb; }, p);
    run_blocks(m, n, k, a, ars, aks, p, 0, true, accumulate, c, ldc);
  }
  return true;
#else
  (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)a, (void)lda, (void)b, (void)ldb, (void)accumulate, (void)c,
      (void)ldc;
  return false;
#endif
}

namespace {

// A 2-D float operand as gemm() takes it: transposed (column-major) or not, and its leading
// dimension; false where neither its rows nor its columns have unit stride.
bool operand(const at::Tensor& t, bool& transposed, int64_t& ld) {
  const int64_t r = t.size(0), c = t.size(1);
  if (t.stride(1) == 1 || c == 1) {
    transposed = false;
    ld = std::max<int64_t>({t.stride(0), c, 1});
    return r == 1 || t.stride(0) >= c;
  }
  if (t.stride(0) == 1 || r == 1) {
    transposed = true;
    ld = std::max<int64_t>({t.stride(1), r, 1});
    return c == 1 || t.stride(1) >= r;
  }
  return false;
}

}  // namespace

bool mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, bool accumulate) {
  if (!enabled() || a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat ||
      out.scalar_type() != at::kFloat || !a.is_cpu() || !b.is_cpu() || !out.is_cpu() || a.dim() != 2 ||
      b.dim() != 2 || out.dim() != 2 || !out.is_contiguous()) {
    return false;
  }
  bool ta = false, tb = false;
  int64_t lda = 0, ldb = 0;
  if (!operand(a, ta, lda) || !operand(b, tb, ldb)) return false;
  const int64_t m = out.size(0), n = out.size(1), k = a.size(1);
  if (!serves(tb, m, n) || !serves_size(m, n, k) || !cpu_blas::available(at::kFloat) ||
      std::max({m, n, k, lda, ldb}) >= INT_MAX) {
    return false;
  }
  if (m == 0 || n == 0) return true;
  float* c = out.data_ptr<float>();
  if (k == 0) {
    if (!accumulate) out.zero_();
    return true;
  }
  const float *pa = a.const_data_ptr<float>(), *pb = b.const_data_ptr<float>();
  // blocks of whole panels (64 columns) over the threads, or of rows (multiples of 6) for a tall
  // out, and wherever op(A) is copied a row block at a time (A transposed, but for the transposed
  // form): split by panels, every thread copied every row block of A and used each copy for its
  // few panels (a layer's grad W_hh, 1024 x 256 x 1600: 6.5 MB of strided copies a thread, each
  // serving 2 of the 4 panels)
  const bool by_rows = m > 4 * n || (ta && !(tb && m <= n));
  const int64_t unit = by_rows ? 6 : kPanel, extent = by_rows ? m : n;
  const int64_t units = (extent + unit - 1) / unit;
  // one block per thread; one block in all below ~2M multiply-adds (a fork-join costs microseconds)
  const int64_t grain = m * n * k < (int64_t(1) << 21) ? units : std::max<int64_t>(1, units / at::get_num_threads());
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t lo = u0 * unit, hi = std::min(extent, u1 * unit);
    const int64_t ms = by_rows ? hi - lo : m, ns = by_rows ? n : hi - lo;
    const float* as = by_rows ? pa + (ta ? lo : lo * lda) : pa;
    const float* bs = by_rows ? pb : pb + (tb ? lo * ldb : lo);
    float* cs = by_rows ? c + lo * n : c + lo;
    if (!gemm(ta, tb, ms, ns, k, as, lda, bs, ldb, accumulate, cs, n)) {  // a short slice of rows: BLAS's
      const cpu_blas::Sequential sequential;
      cpu_blas::gemm(ta, tb, int(ms), int(ns), int(k), as, int(lda), bs, int(ldb), accumulate ? 1.0f : 0.0f, cs,
                     int(n));
    }
  });
  return true;
}

}  // namespace cpu_gemm
}  // namespace convrnn
