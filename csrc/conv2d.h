// conv2d: geometry, argument checks and the index arithmetic the CPU and CUDA kernels share.
//
// The op works on 4-D input (the Python wrapper adds and removes the batch dimension of
// unbatched input, and turns padding='same'/'valid' and padding_mode into numbers or an
// explicit pad).  Shapes: input (N, C, H, W), weight (K, C/groups, R, S), bias (K),
// output (N, K, P, Q).  Output layout: channels_last when input or weight suggests it (as
// torch's oneDNN and cuDNN convolutions), else contiguous NCHW.
#pragma once

#include <array>
#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace convrnn {

struct Conv2d {
  int64_t N, C, H, W;   // input
  int64_t K, R, S;      // weight: K output channels, R x S taps
  int64_t P, Q;         // output height and width
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t groups, Cg, Kg;  // Cg = C / groups input and Kg = K / groups output channels per group
  at::MemoryFormat format;  // the layout of input, output and their gradients in the kernels

  bool channels_last() const { return format == at::MemoryFormat::ChannelsLast; }
  std::vector<int64_t> input_sizes() const { return {N, C, H, W}; }
  std::vector<int64_t> output_sizes() const { return {N, K, P, Q}; }
  std::vector<int64_t> weight_sizes() const { return {K, Cg, R, S}; }
  bool depthwise() const { return groups == C && Cg == 1; }
  bool one_by_one() const { return R == 1 && S == 1 && ph == 0 && pw == 0; }
  // FLOPs of the forward (2 per multiply-add), as the benchmark counts them.
  double flops() const { return 2.0 * N * K * P * Q * Cg * R * S; }
};

// Output size along one dimension (floor mode, as convolution has no ceil_mode).
CONVRNN_HD int64_t conv_output_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return div_floor<int64_t>(in + 2 * p - d * (k - 1) - 1, s) + 1;
}

// Taps [lo, hi) of a filter of k taps (dilation d) that fall inside the input [0, in) for
// the output position whose window starts at input position `start` (= o*s - p).
template <typename I>
struct TapRange {
  I lo, hi;
};

template <typename I>
CONVRNN_HD TapRange<I> conv_taps(I start, I in, I k, I d) {
  I lo = start >= 0 ? I(0) : div_ceil<I>(-start, d);
  I hi = div_floor<I>(in - 1 - start, d) + 1;
  lo = lo < k ? lo : k;
  hi = hi < k ? hi : k;
  return {lo, hi < lo ? lo : hi};
}

// Backward of the data: output position o and tap r meet input position i when
// o*s - p + r*d == i.  For input i, tap r contributes iff (i + p - r*d) is a non-negative
// multiple of s below s*out; conv_source returns that output position or -1.
template <typename I>
CONVRNN_HD I conv_source(I i, I r, I s, I p, I d, I out) {
  const I t = i + p - r * d;
  if (t < 0 || t % s != 0) return I(-1);
  const I o = t / s;
  return o < out ? o : I(-1);
}

// The geometry of a forward call, after every argument check; bias may be absent.
Conv2d conv2d_geometry(const char* op, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups);

// The same for the backward, which also checks grad_output's shape, dtype and device.
Conv2d conv2d_backward_geometry(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups);

// An empty tensor in the kernels' layout (channels_last or contiguous) for input/output-shaped results.
at::Tensor conv2d_empty(const Conv2d& g, const std::vector<int64_t>& sizes, const at::TensorOptions& opts);

// A gradient the backward was not asked for: an empty (0,) tensor, None on the Python side.
at::Tensor conv2d_not_needed(const at::TensorOptions& opts);

// conv2d CUDA round 3 (benchmarks/NOTES-conv2d-cuda.md): 1 (the default) on, 0 round 2's
// kernels.  On: the float32 SIMT image GEMM fits its tile to the device's SM count
// (cuda/conv2d_plan.cuh: simt_image_tile; the same bits either way), and backward data of 2-4
// input channels runs the direct kernel (cuda/conv2d_gemm_image.cuh: dgrad_small_c_kernel).
// CONVRNN_CONV_R3 when first asked; convrnn::_conv2d_r3 sets it and returns how many launches
// took a round-3 path (switches.h).
std::atomic<int>& conv_r3_mode();
std::atomic<int64_t>& conv_r3_launches();

// conv2d CUDA round 5: 1 (the default) on, 2 on with 8 outputs a thread instead of 4, 0 off.
// On: depthwise channels_last forward and stride-1 backward data with square 3x3 or 5x5
// windows, column stride and dilation 1 and Kg == 1 run the vector kernel
// (cuda/conv2d_depthwise.cuh: dw_vec_cl_kernel; the tile kernel's bits).  CONVRNN_DW_VEC when first asked; convrnn::_conv2d_dw_vec sets it and returns how many
// launches took it (switches.h).
std::atomic<int>& conv_dw_vec_mode();
std::atomic<int64_t>& conv_dw_vec_launches();

}  // namespace convrnn
