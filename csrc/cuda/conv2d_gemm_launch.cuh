// conv2d CUDA: grid sizing and tile choice of the implicit-GEMM kernels (conv2d_gemm.cuh),
// included by the per-dtype translation units conv2d_gemm_float.cu / conv2d_gemm_half.cu.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <limits>
#include <type_traits>

#include "cuda/conv2d_gemm.cuh"
#include "cuda/conv2d_gemm_image.cuh"
#include "cuda/conv2d_gemm_wgrad.cuh"

namespace convrnn {
namespace conv {

inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The most GEMM rows any phase has: the whole output (forward), or phase (0, 0)'s share of
// the input, ceil(H/sh) x ceil(W/sw) (backward data).
inline int64_t image_rows_max(const ImageGemmArgs& a) {
  if (!a.dgrad) return static_cast<int64_t>(a.nimg) * a.P * a.Q;
  return static_cast<int64_t>(a.nimg) * ceil_div64(a.H, a.sh) * ceil_div64(a.W, a.sw);
}

inline unsigned checked_blocks(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "convrnn.conv2d: the problem needs ", blocks,
              " thread blocks, more than the 2^31-1 a CUDA grid holds");
  return static_cast<unsigned>(blocks);
}

template <int BM, int BN>
inline unsigned image_grid(ImageGemmArgs& a) {
  a.tiles_m = ceil_div64(image_rows_max(a), BM);
  a.tiles_n = static_cast<int>(ceil_div64(a.ncols, BN));
  return checked_blocks(a.tiles_m * a.tiles_n * a.phases_h * a.phases_w * a.groups);
}

template <int BM, int BN>
inline unsigned wgrad_grid(WgradArgs& a) {
  a.tiles_m = static_cast<int>(ceil_div64(a.Kg, BM));
  a.tiles_n = static_cast<int>(ceil_div64(static_cast<int64_t>(a.R) * a.S * a.Cg, BN));
  return checked_blocks(static_cast<int64_t>(a.tiles_m) * a.tiles_n * a.chunks * a.groups);
}


inline bool aligned16(const void* p) { return aligned_to(p, 16); }

// 16-byte vector loads of the image operand: channel counts multiples of 16 bytes' worth of
// elements and a 16-byte aligned base (the packed weight is always aligned and padded).
template <typename T>
inline bool image_vec_ok(const ImageGemmArgs& a) {
  constexpr int v = 16 / sizeof(T);
  return a.cpg % v == 0 && a.cs % v == 0 && aligned16(a.src) && aligned16(a.wgt) && a.ldb % v == 0;
}

template <typename T>
inline bool wgrad_vec_ok(const WgradArgs& a) {
  constexpr int v = 16 / sizeof(T);
  return a.Kg % v == 0 && a.Cg % v == 0 && aligned16(a.go) && aligned16(a.x);
}

// Backward data by the direct small-C kernels (conv2d_gemm_image.cuh: dgrad_small_c_run_kernel
// where small_c_run_ok, else dgrad_small_c_kernel)
// where it applies: round 3 on (a.sms > 0), one group of 2 to 4 input channels, grad_output channels in 16-byte
// vectors, and every stride phase's weight rows (taps x Kg, k rounded up to whole 8-lane steps) in its shared memory.  Returns
// false (nothing launched) elsewhere.
template <typename T>
bool dgrad_small_c(ImageGemmArgs a, cudaStream_t stream) {
  constexpr int v = 16 / sizeof(T);
  if (!a.dgrad || a.sms <= 0 || a.groups != 1 || a.ncols < 2 || a.ncols > 4 || a.cpg % v != 0 || a.cs % v != 0 ||
      !aligned16(a.src)) {
    return false;
  }
  for (int ph = 0; ph < a.phases_h; ++ph) {
    for (int pw = 0; pw < a.phases_w; ++pw) {
      const AxisPlan ah = backward_data_axis(a.H, a.R, a.sh, a.ph, a.dh, a.P, ph);
      const AxisPlan aw = backward_data_axis(a.W, a.S, a.sw, a.pw, a.dw, a.Q, pw);
      if (small_c_entries<T>(static_cast<int64_t>(ah.taps) * aw.taps, a.cpg) > small_c_capacity<T>()) return false;
    }
  }
  // CG = a.ncols as a compile-time constant: 2, 3 or 4
  const auto with_cg = [&](auto launch) {
    switch (a.ncols) {
      case 2:
        launch(std::integral_constant<int, 2>{});
        break;
      case 3:
        launch(std::integral_constant<int, 3>{});
        break;
      default:
        launch(std::integral_constant<int, 4>{});
        break;
    }
  };
  if (small_c_run_ok(a)) {  // runs of 4 pixels along a phase row: fewer grad_output reads
    a.tiles_m = small_c_run_tiles(a);
    a.tiles_n = 1;
    const unsigned blocks = checked_blocks(a.tiles_m * a.phases_h * a.phases_w * a.groups);
    with_cg([&](auto cg) { dgrad_small_c_run_kernel<T, decltype(cg)::value><<<blocks, kGemmThreads, 0, stream>>>(a); });
  } else {
    const unsigned blocks = image_grid<kSmallCBlockRows, 16>(a);
    with_cg([&](auto cg) { dgrad_small_c_kernel<T, decltype(cg)::value><<<blocks, kGemmThreads, 0, stream>>>(a); });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T, int BN, bool VEC>
void launch_image_wmma(ImageGemmArgs a, cudaStream_t stream) {
  const unsigned blocks = image_grid<128, BN>(a);
  image_gemm_wmma_kernel<T, BN, VEC><<<blocks, kGemmThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
bool image_gemm_wmma(const ImageGemmArgs& a, cudaStream_t stream) {
  if (dgrad_small_c<T>(a, stream)) return true;
  const bool vec = image_vec_ok<T>(a);
  switch (column_tile(a.ncols)) {
    case 32:
      vec ? launch_image_wmma<T, 32, true>(a, stream) : launch_image_wmma<T, 32, false>(a, stream);
      break;
    case 64:
      vec ? launch_image_wmma<T, 64, true>(a, stream) : launch_image_wmma<T, 64, false>(a, stream);
      break;
    default:
      vec ? launch_image_wmma<T, 128, true>(a, stream) : launch_image_wmma<T, 128, false>(a, stream);
  }
  return false;
}

template <typename T>
void wgrad_gemm_wmma(WgradArgs a, cudaStream_t stream) {
  if (wgrad_vec_ok<T>(a)) {
    // 64 x 128 tile, k 32 (TF32: 16), 2 x 4 warps of 32 x 32.
    constexpr int BK = Mma<T>::BK;
    const unsigned blocks = wgrad_grid<64, 128>(a);
    wgrad_wmma_kernel<T, 64, 128, BK, 2, true><<<blocks, kGemmThreads, 0, stream>>>(a);
  } else {
    // 64 x 64 tile, k 16, 2 x 4 warps of 32 x 16, element loads.
    const unsigned blocks = wgrad_grid<64, 64>(a);
    wgrad_wmma_kernel<T, 64, 64, 16, 2, false><<<blocks, kGemmThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace conv
}  // namespace convrnn
