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

// The SIMT tile: conv2d_plan.cuh's model of the grid against the device's SMs (a.sms), or
// with a.sms == 0 round 2's fixed rule (256 x 16 up to 16 columns, else 128 rows by the
// smallest of 32, 64, 128 columns covering them).  Either gives the same bits.
SimtTile simt_tile(const ImageGemmArgs& a) {
  if (a.sms <= 0) return a.ncols <= 16 ? SimtTile{256, 16} : SimtTile{128, column_tile(a.ncols)};
  return simt_image_tile(image_rows_max(a), a.ncols, static_cast<int64_t>(a.phases_h) * a.phases_w * a.groups, a.sms);
}

template <bool ONE>
void image_simt_float(const ImageGemmArgs& a, cudaStream_t stream) {
  const SimtTile t = simt_tile(a);
  switch (t.bm * 1000 + t.bn) {
    case 256016:
      return launch_image_simt<float, 256, 16, ONE>(a, stream);
    case 128016:
      return launch_image_simt<float, 128, 16, ONE>(a, stream);
    case 64016:
      return launch_image_simt<float, 64, 16, ONE>(a, stream);
    case 128032:
      return launch_image_simt<float, 128, 32, ONE>(a, stream);
    case 128064:
      return launch_image_simt<float, 128, 64, ONE>(a, stream);
    case 128128:
      return launch_image_simt<float, 128, 128, ONE>(a, stream);
    case 64032:
      return launch_image_simt<float, 64, 32, ONE>(a, stream);
    case 64064:
      return launch_image_simt<float, 64, 64, ONE>(a, stream);
    case 64128:
      return launch_image_simt<float, 64, 128, ONE>(a, stream);
    default:
      TORCH_CHECK(false, "convrnn.conv2d: no SIMT kernel for a ", t.bm, " x ", t.bn, " tile");
  }
}

}  // namespace

void image_gemm_float(ImageGemmArgs a, bool tf32, cudaStream_t stream) {
  if (tf32) return image_gemm_wmma<float>(a, stream);
  return one_by_one(a) ? image_simt_float<true>(a, stream) : image_simt_float<false>(a, stream);
}

bool dgrad_small_c_float(const ImageGemmArgs& a, cudaStream_t stream) { return dgrad_small_c<float>(a, stream); }
bool dgrad_small_c_double(const ImageGemmArgs& a, cudaStream_t stream) { return dgrad_small_c<double>(a, stream); }

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
