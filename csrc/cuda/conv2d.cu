// CUDA conv2d forward and backward: host wrappers, weight packing and the split-K reductions.
//
// Paths (the kernels are in conv2d_gemm.cuh, conv2d_gemm_*.cu and conv2d_depthwise.cu):
//  * depthwise (groups == C, Cg == 1): direct kernels on the tensors as they are (any strides).
//  * everything else: implicit GEMM on NHWC copies of input / grad_output (a no-op for
//    channels_last tensors), results written straight in g.format through their strides:
//      forward and backward data: image GEMM (1x1 without padding: a specialised SIMT path);
//      backward weight: split-K weight GEMM into per-chunk partials, summed in chunk order;
//      backward bias: per-chunk channel sums, summed in chunk order.
//    float16 / bfloat16: tensor cores (wmma, float accumulators); float32: TF32 tensor cores
//    when torch.backends.cudnn.allow_tf32 is on, else exact SIMT; float64: SIMT.
// No atomics anywhere: every reduction has a fixed order, so results are deterministic.
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>

#include "conv2d.h"
#include "cuda/conv2d_cuda.h"
#include "cuda/conv2d_gemm.cuh"
#include "cuda/launch.cuh"

namespace convrnn {
namespace {

using at::Tensor;

constexpr int kPackAlign = 8;  // packed weight rows padded to 8 elements (16 bytes of half)

void check_int_range(const Conv2d& g) {
  const int64_t lim = std::numeric_limits<int32_t>::max() / 4;
  for (int64_t v : {g.N, g.C, g.H, g.W, g.K, g.P, g.Q, g.R, g.S, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups}) {
    TORCH_CHECK(v < lim, "convrnn.conv2d: sizes, strides, paddings and dilations must be below ", lim,
                " for the CUDA kernels");
  }
  TORCH_CHECK(g.R * g.S * std::max(g.Cg, g.Kg) < lim && (g.H + 2 * g.ph) * g.dh < lim && (g.W + 2 * g.pw) * g.dw < lim,
              "convrnn.conv2d: the filter (R*S*channels per group) is too large for the CUDA kernels");
}

template <typename T>
__global__ void pack_weight_kernel(const T* __restrict__ w, T* __restrict__ out, int64_t total, int ldb, bool dgrad,
                                   int groups, int Cg, int Kg, int H, int R, int sh, int ph, int dh, int P, int W,
                                   int S, int sw, int pw, int dw, int Q) {
  CONVRNN_GRID_STRIDE(int64_t, e, total) {
    const int s = static_cast<int>(e % S);
    const int r = static_cast<int>((e / S) % R);
    const int c = static_cast<int>((e / (S * R)) % Cg);
    const int k = static_cast<int>(e / (static_cast<int64_t>(S) * R * Cg));
    const int grp = k / Kg, kl = k % Kg;
    const int64_t row = conv::packed_row(dgrad, grp, r, s, dgrad ? kl : c, groups, dgrad ? Kg : Cg, H, R, sh, ph, dh,
                                         P, W, S, sw, pw, dw, Q);
    const int col = dgrad ? c : kl, cols = dgrad ? Cg : Kg;
    out[row * ldb + col] = w[e];
    if (col == cols - 1) {  // every packed row has one such element: it zeroes the row's padding
      for (int j = cols; j < ldb; ++j) out[row * ldb + j] = T(0);
    }
  }
}

// The weight as the image GEMM's B operand: [rows][ldb], rows in conv::packed_row order,
// columns the output channels of the group (forward) or its input channels (backward
// data), zero-padded to a multiple of kPackAlign.  K*C/groups*R*S elements: small.
Tensor pack_weight(const Tensor& weight, const Conv2d& g, bool dgrad, cudaStream_t stream) {
  const Tensor w = weight.contiguous();
  const int64_t cols = dgrad ? g.Cg : g.Kg, cpg = dgrad ? g.Kg : g.Cg;
  const int64_t ldb = (cols + kPackAlign - 1) / kPackAlign * kPackAlign;
  Tensor out = at::empty({g.groups * g.R * g.S * cpg, ldb}, w.options());  // every element written
  const int64_t total = w.numel();
  CONVRNN_DISPATCH_FLOATING(w.scalar_type(), "convrnn.conv2d", [&] {
    pack_weight_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, static_cast<int>(ldb), dgrad,
        static_cast<int>(g.groups), static_cast<int>(g.Cg), static_cast<int>(g.Kg), static_cast<int>(g.H),
        static_cast<int>(g.R), static_cast<int>(g.sh), static_cast<int>(g.ph), static_cast<int>(g.dh),
        static_cast<int>(g.P), static_cast<int>(g.W), static_cast<int>(g.S), static_cast<int>(g.sw),
        static_cast<int>(g.pw), static_cast<int>(g.dw), static_cast<int>(g.Q));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Round 3's kernel choices (the SIMT tile fitted to the SM count, the direct small-C backward
// data) get the device's SM count; with round 3 off (conv2d.h: conv_r3_mode) 0: round 2's.
int tile_sms() {
  return conv_r3_mode().load() != 0 ? at::cuda::getCurrentDeviceProperties()->multiProcessorCount : 0;
}

// Image GEMM arguments: forward (src = input, dst = output) or backward data (src =
// grad_output, dst = grad_input).  src is NHWC dense; dst any strides.
conv::ImageGemmArgs image_args(const Conv2d& g, bool dgrad, const Tensor& src, const Tensor& packed, const Tensor& dst) {
  conv::ImageGemmArgs a{};
  a.src = src.const_data_ptr();
  a.wgt = packed.const_data_ptr();
  a.bias = nullptr;
  a.dst = dst.mutable_data_ptr();
  a.dst_sn = dst.stride(0);
  a.dst_sc = dst.stride(1);
  a.dst_sh = dst.stride(2);
  a.dst_sw = dst.stride(3);
  a.nimg = static_cast<int>(g.N);
  a.cs = static_cast<int>(dgrad ? g.K : g.C);
  a.cpg = static_cast<int>(dgrad ? g.Kg : g.Cg);
  a.ncols = static_cast<int>(dgrad ? g.Cg : g.Kg);
  a.ldb = static_cast<int>(packed.size(1));
  a.groups = static_cast<int>(g.groups);
  a.R = static_cast<int>(g.R);
  a.S = static_cast<int>(g.S);
  a.dgrad = dgrad;
  a.H = static_cast<int>(g.H);
  a.W = static_cast<int>(g.W);
  a.P = static_cast<int>(g.P);
  a.Q = static_cast<int>(g.Q);
  a.sh = static_cast<int>(g.sh);
  a.sw = static_cast<int>(g.sw);
  a.ph = static_cast<int>(g.ph);
  a.pw = static_cast<int>(g.pw);
  a.dh = static_cast<int>(g.dh);
  a.dw = static_cast<int>(g.dw);
  // Backward data: one phase per input row/column residue modulo the stride; residues at or
  // past the input size have no rows.
  a.phases_h = dgrad ? static_cast<int>(std::min(g.sh, g.H)) : 1;
  a.phases_w = dgrad ? static_cast<int>(std::min(g.sw, g.W)) : 1;
  a.sms = tile_sms();
  return a;
}

// The image GEMM (or round 3's direct small-C backward data) of a's dtype; counts the
// launches that took a round-3 path.
void run_image_gemm(const conv::ImageGemmArgs& a, at::ScalarType dtype, cudaStream_t stream) {
  bool r3 = false;
  switch (dtype) {
    case at::kFloat:
      r3 = conv::image_gemm_float(a, at::globalContext().allowTF32CuDNN(), stream);
      break;
    case at::kDouble:
      r3 = conv::image_gemm_double(a, stream);
      break;
    case at::kHalf:
      r3 = conv::image_gemm_half(a, stream);
      break;
    case at::kBFloat16:
      r3 = conv::image_gemm_bfloat16(a, stream);
      break;
    default:
      TORCH_CHECK(false, "convrnn.conv2d: unsupported dtype ", dtype);
  }
  if (r3) ++conv_r3_launches();
}

void run_wgrad_gemm(const conv::WgradArgs& a, at::ScalarType dtype, cudaStream_t stream) {
  switch (dtype) {
    case at::kFloat:
      return conv::wgrad_gemm_float(a, at::globalContext().allowTF32CuDNN(), stream);
    case at::kDouble:
      return conv::wgrad_gemm_double(a, stream);
    case at::kHalf:
      return conv::wgrad_gemm_half(a, stream);
    case at::kBFloat16:
      return conv::wgrad_gemm_bfloat16(a, stream);
    default:
      TORCH_CHECK(false, "convrnn.conv2d_backward: unsupported dtype ", dtype);
  }
}

// Sums the weight GEMM's chunk partials [chunks][K][(r, s, c)] in chunk order into grad_weight
// (any strides); thread per weight element, in the partials' order (coalesced reads).
template <typename T>
__global__ void wgrad_reduce_kernel(const acc_t<T>* __restrict__ part, int chunks, int64_t K, int64_t rsc, int64_t Cg,
                                    int64_t S, T* __restrict__ gw, int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
  const int64_t total = K * rsc;
  CONVRNN_GRID_STRIDE(int64_t, e, total) {
    acc_t<T> acc = 0;
    for (int c = 0; c < chunks; ++c) acc += part[static_cast<int64_t>(c) * total + e];
    const int64_t k = e / rsc, n = e % rsc;
    const int64_t c = n % Cg, rs = n / Cg;
    gw[k * s0 + c * s1 + (rs / S) * s2 + (rs % S) * s3] = static_cast<T>(acc);
  }
}

// Bias gradient, NHWC grad_output: partial[chunk][k] over the chunk's pixels (thread per
// (chunk, k), k fastest), then the chunks summed in order.
template <typename T>
__global__ void bias_partial_kernel(const T* __restrict__ go, int64_t pixels, int64_t K, int64_t chunk_len,
                                    int64_t total, acc_t<T>* __restrict__ part) {
  CONVRNN_GRID_STRIDE(int64_t, e, total) {
    const int64_t k = e % K, chunk = e / K;
    const int64_t first = chunk * chunk_len;
    const int64_t last = first + chunk_len < pixels ? first + chunk_len : pixels;
    acc_t<T> acc = 0;
    for (int64_t p = first; p < last; ++p) acc += static_cast<acc_t<T>>(go[p * K + k]);
    part[e] = acc;
  }
}

template <typename T>
__global__ void bias_reduce_kernel(const acc_t<T>* __restrict__ part, int chunks, int64_t K, T* __restrict__ gb) {
  CONVRNN_GRID_STRIDE(int64_t, k, K) {
    acc_t<T> acc = 0;
    for (int c = 0; c < chunks; ++c) acc += part[static_cast<int64_t>(c) * K + k];
    gb[k] = static_cast<T>(acc);
  }
}

void weight_gradient(const Conv2d& g, const Tensor& go, const Tensor& x, Tensor& gw, cudaStream_t stream) {
  const int64_t rsc = g.R * g.S * g.Cg;
  const int64_t pixels = g.N * g.P * g.Q;
  // Chunks fixed by the shape: about 512 blocks of 64 x 128 tiles in all, chunks of at
  // least 256 pixels, partials below 2^26 elements.
  const int64_t tiles = g.groups * ((g.Kg + 63) / 64) * ((rsc + 127) / 128);
  const int64_t max_by_memory = std::max<int64_t>(1, (int64_t(1) << 26) / (g.K * rsc));
  const conv::Chunks ch = conv::split_chunks(pixels, tiles, 512, 256, conv::kWgradChunkAlign,
                                             static_cast<int>(std::min<int64_t>(256, max_by_memory)));
  TORCH_CHECK(ch.len < std::numeric_limits<int32_t>::max(), "convrnn.conv2d_backward: too many pixels per chunk");
  const Tensor part = at::empty({ch.count, g.K, rsc}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  conv::WgradArgs a{};
  a.go = go.const_data_ptr();
  a.x = x.const_data_ptr();
  a.partial = part.mutable_data_ptr();
  a.H = static_cast<int>(g.H);
  a.W = static_cast<int>(g.W);
  a.C = static_cast<int>(g.C);
  a.K = static_cast<int>(g.K);
  a.P = static_cast<int>(g.P);
  a.Q = static_cast<int>(g.Q);
  a.R = static_cast<int>(g.R);
  a.S = static_cast<int>(g.S);
  a.Cg = static_cast<int>(g.Cg);
  a.Kg = static_cast<int>(g.Kg);
  a.groups = static_cast<int>(g.groups);
  a.sh = static_cast<int>(g.sh);
  a.sw = static_cast<int>(g.sw);
  a.ph = static_cast<int>(g.ph);
  a.pw = static_cast<int>(g.pw);
  a.dh = static_cast<int>(g.dh);
  a.dw = static_cast<int>(g.dw);
  a.pixels = pixels;
  a.chunk_len = ch.len;
  a.chunks = ch.count;
  run_wgrad_gemm(a, x.scalar_type(), stream);
  const int64_t total = g.K * rsc;
  CONVRNN_DISPATCH_FLOATING(x.scalar_type(), "convrnn.conv2d_backward", [&] {
    using A = acc_t<scalar_t>;
    wgrad_reduce_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        part.const_data_ptr<A>(), ch.count, g.K, rsc, g.Cg, g.S, gw.mutable_data_ptr<scalar_t>(), gw.stride(0),
        gw.stride(1), gw.stride(2), gw.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bias_gradient(const Conv2d& g, const Tensor& go, Tensor& gb, cudaStream_t stream) {
  const int64_t pixels = g.N * g.P * g.Q;
  const conv::Chunks ch = conv::split_chunks(pixels, g.K, int64_t(1) << 16, 64, 1, 1024);
  const Tensor part = at::empty({ch.count, g.K}, go.options().dtype(at::toOpMathType(go.scalar_type())));
  const int64_t total = ch.count * g.K;
  CONVRNN_DISPATCH_FLOATING(go.scalar_type(), "convrnn.conv2d_backward", [&] {
    using A = acc_t<scalar_t>;
    bias_partial_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), pixels, g.K, ch.len, total, part.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bias_reduce_kernel<scalar_t><<<blocks_for(g.K), kThreads, 0, stream>>>(part.const_data_ptr<A>(), ch.count, g.K,
                                                                          gb.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor conv2d_cuda(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Conv2d g = conv2d_geometry("conv2d", input, weight, bias, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Tensor out = conv2d_empty(g, g.output_sizes(), input.options());
  if (out.numel() == 0) return out;
  check_int_range(g);
  const Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : Tensor();
  if (g.depthwise()) {
    depthwise_forward_cuda(g, input, weight, b, out, stream);
    return out;
  }
  const Tensor x = channels_last_cuda(input, stream);
  const Tensor packed = pack_weight(weight, g, /*dgrad=*/false, stream);
  conv::ImageGemmArgs a = image_args(g, /*dgrad=*/false, x, packed, out);
  a.bias = b.defined() ? b.const_data_ptr() : nullptr;
  run_image_gemm(a, x.scalar_type(), stream);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                                        const Tensor& weight, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups, std::array<bool, 3> output_mask) {
  const Conv2d g = conv2d_backward_geometry("conv2d_backward", grad_output, input, weight, stride, padding,
                                            dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto opts = input.options();
  Tensor gi = output_mask[0] ? conv2d_empty(g, g.input_sizes(), opts) : conv2d_not_needed(opts);
  Tensor gw = output_mask[1] ? at::empty(weight.sizes(), opts.memory_format(weight.suggest_memory_format()))
                             : conv2d_not_needed(opts);
  Tensor gb = output_mask[2] ? at::empty({g.K}, opts) : conv2d_not_needed(opts);
  if (g.N == 0) {  // empty batch: no input gradient to write, zero weight and bias gradients
    if (output_mask[1]) gw.zero_();
    if (output_mask[2]) gb.zero_();
    return {gi, gw, gb};
  }
  check_int_range(g);
  if (g.depthwise()) {
    if (output_mask[0]) depthwise_backward_data_cuda(g, grad_output, weight, gi, stream);
    if (output_mask[1] || output_mask[2]) {
      Tensor gw_arg = output_mask[1] ? gw : Tensor();
      Tensor gb_arg = output_mask[2] ? gb : Tensor();
      depthwise_backward_weight_cuda(g, grad_output, input, gw_arg, gb_arg, stream);
    }
    return {gi, gw, gb};
  }
  const Tensor go = channels_last_cuda(grad_output, stream);
  if (output_mask[0]) {
    const Tensor packed = pack_weight(weight, g, /*dgrad=*/true, stream);
    run_image_gemm(image_args(g, /*dgrad=*/true, go, packed, gi), go.scalar_type(), stream);
  }
  if (output_mask[1]) weight_gradient(g, go, channels_last_cuda(input, stream), gw, stream);
  if (output_mask[2]) bias_gradient(g, go, gb, stream);
  return {gi, gw, gb};
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_IMPL(convrnn, CUDA, m) {
  m.impl("conv2d", &convrnn::conv2d_cuda);
  m.impl("conv2d_backward", &convrnn::conv2d_backward_cuda);
}
