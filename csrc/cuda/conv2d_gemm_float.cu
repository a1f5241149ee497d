// conv2d CUDA: the float32 (exact SIMT, or TF32 tensor cores when allowed) and float64 (SIMT)
// GEMM kernels.
#include "cuda/conv2d_gemm_launch.cuh"

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

template <bool ONE>
void image_simt_float(const ImageGemmArgs& a, cudaStream_t stream) {
  // At most 16 columns (the backward data of C = 1..16 layers: AlexNet CONV1, 7x7 stems,
  // LeNet): a 256 x 16 tile, half the padded columns of 128 x 32 (C = 3: 3/16 useful, not 3/32).
  if (a.ncols <= 16) return launch_image_simt<float, 256, 16, ONE>(a, stream);
  switch (column_tile(a.ncols)) {
    case 32:
      return launch_image_simt<float, 128, 32, ONE>(a, stream);
    case 64:
      return launch_image_simt<float, 128, 64, ONE>(a, stream);
    default:
      return launch_image_simt<float, 128, 128, ONE>(a, stream);
  }
}

}  // namespace

void image_gemm_float(ImageGemmArgs a, bool tf32, cudaStream_t stream) {
  if (tf32) return image_gemm_wmma<float>(a, stream);
  return one_by_one(a) ? image_simt_float<true>(a, stream) : image_simt_float<false>(a, stream);
}

void image_gemm_double(ImageGemmArgs a, cudaStream_t stream) {
  return one_by_one(a) ? launch_image_simt<double, 64, 64, true>(a, stream)
                       : launch_image_simt<double, 64, 64, false>(a, stream);
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
