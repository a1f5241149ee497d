// conv2d CUDA: the float16 and bfloat16 tensor-core (wmma) GEMM kernels, float accumulators.
#include "cuda/conv2d_gemm_launch.cuh"

namespace convrnn {
namespace conv {

bool image_gemm_half(ImageGemmArgs a, cudaStream_t stream) { return image_gemm_wmma<__half>(a, stream); }
bool image_gemm_bfloat16(ImageGemmArgs a, cudaStream_t stream) { return image_gemm_wmma<__nv_bfloat16>(a, stream); }
void wgrad_gemm_half(WgradArgs a, cudaStream_t stream) { wgrad_gemm_wmma<__half>(a, stream); }
void wgrad_gemm_bfloat16(WgradArgs a, cudaStream_t stream) { wgrad_gemm_wmma<__nv_bfloat16>(a, stream); }

}  // namespace conv
}  // namespace convrnn
