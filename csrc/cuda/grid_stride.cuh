// The grid-stride loop of the CUDA kernels, apart from launch.cuh (which brings in ATen's CUDA
// context) so that kernel headers can be compiled on the host under the CPU emulation of
// tests/native/cuda_emulation.h.
#pragma once

#define CONVRNN_GRID_STRIDE(index_t, i, n)                                                 \
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<index_t>(blockDim.x) * gridDim.x)
