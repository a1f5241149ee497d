// conv2d CUDA: the float32 (exact SIMT, or TF32 tensor cores when allowed) and float64 (SIMT)
// GEMM kernels.
#include "cuda/conv2d_gemm_launch.cuh"

#include <utility>

namespace convrnn {
namespace conv {

namespace {

template <typename T, int BM, int BN, bool ONE>
void launch_image_simt(ImageGemmArgs a, cudaStream_t stream) {
  const unsigned blocks = image_grid<BM, BN>(a);
  image_gemm_simt_kernel<T, BM, BN, ONE><<<blocks, kGemmThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 1x1 without padding: every tap of every output pixel lies inside the image.
bool one_by_one(const ImageGemmArgs& a) { return a.R == 1 && a.S == 1 && a.ph == 0 && a.pw == 0; }

// The SIMT tile: conv2d_plan.cuh's model of the grid against the device's SMs (a.sms), or
// with a.sms == 0 round 2's fixed rule.  Either gives the same bits.
SimtTile simt_tile(const ImageGemmArgs& a) {
  if (a.sms <= 0) return simt_fixed_tile(a.ncols);
  return simt_image_tile(image_rows_max(a), a.ncols, static_cast<int64_t>(a.phases_h) * a.phases_w * a.groups, a.sms);
}

// Launches the kernel of kSimtTiles[I] for the I that is tile t.
template <bool ONE, size_t... I>
void launch_simt_tile(const ImageGemmArgs& a, SimtTile t, cudaStream_t stream, std::index_sequence<I...>) {
  const bool launched = ((t.bm == kSimtTiles[I].bm && t.bn == kSimtTiles[I].bn &&
                          (launch_image_simt<float, kSimtTiles[I].bm, kSimtTiles[I].bn, ONE>(a, stream), true)) ||
                         ...);
  TORCH_CHECK(launched, "convrnn.conv2d: no SIMT kernel for a ", t.bm, " x ", t.bn, " tile");
}

template <bool ONE>
void image_simt_float(const ImageGemmArgs& a, cudaStream_t stream) {
  launch_simt_tile<ONE>(a, simt_tile(a), stream, std::make_index_sequence<kSimtTileCount>{});
}

}  // namespace

bool image_gemm_float(ImageGemmArgs a, bool tf32, cudaStream_t stream) {
  if (tf32) return image_gemm_wmma<float>(a, stream);
  if (dgrad_small_c<float>(a, stream)) return true;
  one_by_one(a) ? image_simt_float<true>(a, stream) : image_simt_float<false>(a, stream);
  return a.sms > 0;  // the fitted tile
}

bool image_gemm_double(ImageGemmArgs a, cudaStream_t stream) {
  if (dgrad_small_c<double>(a, stream)) return true;
  one_by_one(a) ? launch_image_simt<double, 64, 64, true>(a, stream) : launch_image_simt<double, 64, 64, false>(a, stream);
  return false;
}

void wgrad_gemm_float(WgradArgs a, bool tf32, cudaStream_t stream) {
  if (tf32) return wgrad_gemm_wmma<float>(a, stream);
  if (a.Kg <= 64) {
    const unsigned blocks = wgrad_grid<64, 128>(a);
    wgrad_simt_kernel<float, 64, 128><<<blocks, kGemmThreads, 0, stream>>>(a);
  } else {
    const unsigned blocks = wgrad_grid<128, 128>(a);
    wgrad_simt_kernel<float, 128, 128><<<blocks, kGemmThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void wgrad_gemm_double(WgradArgs a, cudaStream_t stream) {
  const unsigned blocks = wgrad_grid<64, 64>(a);
  wgrad_simt_kernel<double, 64, 64><<<blocks, kGemmThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace conv
}  // namespace convrnn
