// conv2d CUDA: depthwise convolution (groups == C, Cg == 1; K = C * Kg), direct.
//
// Forward: one thread per output element in the output's memory order (NCHW: q fastest;
// channels_last: k fastest), so neighbouring threads read neighbouring inputs; the window's
// taps inside the image come from conv_taps (no per-tap bounds test).  Input read through
// its strides: no copy of a non-contiguous or NCHW/NHWC input.
// Backward data: one thread per input element gathers its Kg * R * S contributions
// (conv_source) in a fixed order.
// Backward weight (and bias, as one more "tap" whose input is 1): split-K over the output
// pixels in chunks fixed by the shape; channels_last: one thread per (chunk, tap, k) walks its
// chunk (k fastest: coalesced); NCHW: one warp per (chunk, k, tap), lanes over consecutive
// pixels, then a fixed-order shuffle reduction.  A last kernel sums the chunks in order.
// Deterministic, no atomics.
#include "cuda/conv2d_cuda.h"
#include "cuda/conv2d_depthwise.cuh"
#include "cuda/launch.cuh"
#include "cuda/conv2d_plan.cuh"

namespace convrnn {
namespace {

using at::Tensor;
using namespace dwconv;

DwGeom dw_geom(const Conv2d& g, const Tensor& t) {
  return DwGeom{g.N,  g.K,  g.H,  g.W,  g.P,  g.Q,  g.R,  g.S,  g.Kg, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
                t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

constexpr int64_t kI32 = int64_t(1) << 31;

// The tiled NCHW kernel's parameters for an output plane (OH, OW) over a source plane
// (SH, SW) read through `src`'s strides, or false where it does not apply (a patch or the taps
// over the shared-memory budget, a plane offset beyond 32 bits, too many blocks).
bool tile_params(const Conv2d& g, const Tensor& src, int64_t OC, int64_t OH, int64_t OW, int64_t SH, int64_t SW,
                 int64_t sh, int64_t sw, int64_t ph, int64_t pw, int rows, DwTile& t, int64_t& blocks) {
  if (g.R * g.S > kTileTaps) return false;
  const int64_t tp = tile_p(rows);
  const int64_t patch_h = (tp - 1) * sh + (g.R - 1) * g.dh + 1, patch_w = (kTileQ - 1) * sw + (g.S - 1) * g.dw + 1;
  if (patch_h * patch_w > kTileSmem) return false;
  if (src.stride(2) < 0 || src.stride(3) < 0 || ph <= -kI32 / 4 || ph >= kI32 / 4 || pw <= -kI32 / 4 ||
      pw >= kI32 / 4) {
    return false;
  }
  if ((SH - 1) * src.stride(2) + (SW - 1) * src.stride(3) >= kI32 || OH * OW >= kI32) return false;
  if (SH + patch_h >= kI32 / 4 || SW + patch_w >= kI32 / 4 || OH >= kI32 / (4 * sh) || OW >= kI32 / (4 * sw)) return false;
  const int64_t tiles_p = (OH + tp - 1) / tp, tiles_q = (OW + kTileQ - 1) / kTileQ;
  blocks = g.N * OC * tiles_p * tiles_q;
  if (blocks <= 0 || blocks >= kI32) return false;
  t = DwTile{static_cast<int>(OH), static_cast<int>(OW), static_cast<int>(SH), static_cast<int>(SW),
             static_cast<int>(g.R), static_cast<int>(g.S), static_cast<int>(sh), static_cast<int>(sw),
             static_cast<int>(ph), static_cast<int>(pw), static_cast<int>(g.dh), static_cast<int>(g.dw),
             static_cast<int>(patch_h), static_cast<int>(patch_w), static_cast<int>(tiles_p), static_cast<int>(tiles_q),
             static_cast<int>(OC), static_cast<int>(g.Kg), src.stride(0), src.stride(1),
             static_cast<int>(src.stride(2)), static_cast<int>(src.stride(3))};
  return true;
}

// The same for the channels_last kernel (`rows` output rows, kClTileQ columns, 32 channels a block).
bool cl_tile_params(const Conv2d& g, const Tensor& src, int64_t OC, int64_t OH, int64_t OW, int64_t SH, int64_t SW,
                    int64_t sh, int64_t sw, int64_t ph, int64_t pw, int rows, DwTile& t, int64_t& blocks) {
  const int64_t patch_h = (rows - 1) * sh + (g.R - 1) * g.dh + 1, patch_w = (kClTileQ - 1) * sw + (g.S - 1) * g.dw + 1;
  if (patch_h * patch_w * kClLanes > kClSmem) return false;
  if (src.stride(2) < 0 || src.stride(3) < 0 || OC >= kI32 / 4) return false;
  if (ph <= -kI32 / 4 || ph >= kI32 / 4 || pw <= -kI32 / 4 || pw >= kI32 / 4) return false;
  if ((SH - 1) * src.stride(2) + (SW - 1) * src.stride(3) >= kI32) return false;
  if (SH + patch_h >= kI32 / 4 || SW + patch_w >= kI32 / 4 || OH >= kI32 / (4 * sh) || OW >= kI32 / (4 * sw)) return false;
  if (g.R * g.S >= kI32 / 4) return false;
  const int64_t tiles_p = (OH + rows - 1) / rows;
  const int64_t tiles_q = (OW + kClTileQ - 1) / kClTileQ, tiles_c = (OC + kClLanes - 1) / kClLanes;
  blocks = g.N * tiles_p * tiles_q * tiles_c;
  if (blocks <= 0 || blocks >= kI32) return false;
  t = DwTile{static_cast<int>(OH), static_cast<int>(OW), static_cast<int>(SH), static_cast<int>(SW),
             static_cast<int>(g.R), static_cast<int>(g.S), static_cast<int>(sh), static_cast<int>(sw),
             static_cast<int>(ph), static_cast<int>(pw), static_cast<int>(g.dh), static_cast<int>(g.dw),
             static_cast<int>(patch_h), static_cast<int>(patch_w), static_cast<int>(tiles_p), static_cast<int>(tiles_q),
             static_cast<int>(OC), static_cast<int>(g.Kg), src.stride(0), src.stride(1),
             static_cast<int>(src.stride(2)), static_cast<int>(src.stride(3))};
  return true;
}

// The tiled kernel's plan: round 3's taller tiles (NCHW kTileRowsR3 rows a thread, channels_last
// kClRowsR3 rows a block) where they fit and round 3 is on (conv2d.h: conv_r3_mode), else
// round 2's; false where no tile fits.  `rows` is the plan's TR (NCHW) or ROWS (channels_last).
bool tile_plan(const Conv2d& g, const Tensor& src, int64_t OC, int64_t OH, int64_t OW, int64_t SH, int64_t SW,
               int64_t sh, int64_t sw, int64_t ph, int64_t pw, DwTile& t, int64_t& blocks, int& rows) {
  if (g.K > INT32_MAX) return false;
  const bool cl = g.channels_last();
  for (const int r : {cl ? kClRowsR3 : kTileRowsR3, cl ? 1 : kTileRows}) {
    if (r != (cl ? 1 : kTileRows) && conv_r3_mode().load() == 0) continue;
    const bool ok = cl ? cl_tile_params(g, src, OC, OH, OW, SH, SW, sh, sw, ph, pw, r, t, blocks)
                       : tile_params(g, src, OC, OH, OW, SH, SW, sh, sw, ph, pw, r, t, blocks);
    if (ok) {
      rows = r;
      return true;
    }
  }
  return false;
}

// Launches the tiled kernel of a plan (tile_plan).
template <typename T, bool FLIP>
void launch_tile(bool cl, int rows, int64_t blocks, const T* src, const T* w, const T* b, T* out, const DwTile& t,
                 cudaStream_t stream) {
  const unsigned nb = static_cast<unsigned>(blocks);
  if (cl && rows == kClRowsR3) {
    dw_tile_cl_kernel<T, FLIP, kClRowsR3><<<nb, kTileThreads, 0, stream>>>(src, w, b, out, t);
  } else if (cl) {
    dw_tile_cl_kernel<T, FLIP, 1><<<nb, kTileThreads, 0, stream>>>(src, w, b, out, t);
  } else if (rows == kTileRowsR3) {
    dw_tile_kernel<T, FLIP, kTileRowsR3><<<nb, kTileThreads, 0, stream>>>(src, w, b, out, t);
  } else {
    dw_tile_kernel<T, FLIP, kTileRows><<<nb, kTileThreads, 0, stream>>>(src, w, b, out, t);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (rows == (cl ? kClRowsR3 : kTileRowsR3)) ++conv_r3_launches();
}

// The vector kernel's plan (dw_vec_cl_kernel) for an output (OH, OW, OC channels) over a source
// plane (SH, SW) read through `src`'s strides, or false where it does not apply: round 5 off,
// not channels_last, Kg > 1, a window other than square 3x3 or 5x5, column stride or dilation
// other than 1, C not a multiple of the vector, a channel stride other than 1, a pointer or
// stride off the vector's alignment, an output that is not channels_last contiguous, or
// plane sizes beyond the kernel's 32-bit fields.
bool vec_plan(const Conv2d& g, const Tensor& src, const Tensor& out, int64_t OC, int64_t OH, int64_t OW, int64_t SH,
              int64_t SW, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dw, DwTile& t) {
  if (conv_dw_vec_mode().load() == 0 || !g.channels_last() || g.Kg != 1 || g.R != g.S || (g.R != 3 && g.R != 5) ||
      sw != 1 || dw != 1) {
    return false;
  }
  const int64_t L = src.element_size() >= 8 ? 2 : 4, bytes = L * src.element_size();
  if (OC % L != 0 || src.stride(1) != 1) return false;
  for (const int d : {0, 2, 3}) {
    if (src.stride(d) < 0 || src.stride(d) % L != 0) return false;
  }
  if (!aligned_to(src.const_data_ptr(), bytes) || !aligned_to(out.const_data_ptr(), bytes)) return false;
  if (!out.is_contiguous(at::MemoryFormat::ChannelsLast)) return false;
  if (src.stride(2) >= kI32 || src.stride(3) >= kI32 || OC >= kI32 / 4 || OH >= kI32 / 4 || OW >= kI32 / 4 ||
      SH >= kI32 / 4 || SW >= kI32 / 4 || sh >= kI32 / 4 || g.dh >= kI32 / 4 || ph <= -kI32 / 4 || ph >= kI32 / 4 ||
      pw <= -kI32 / 4 || pw >= kI32 / 4 || OH * sh >= kI32 / 4 || g.R * g.dh >= kI32 / 4) {
    return false;
  }
  t = DwTile{static_cast<int>(OH), static_cast<int>(OW), static_cast<int>(SH), static_cast<int>(SW),
             static_cast<int>(g.R), static_cast<int>(g.S), static_cast<int>(sh), 1, static_cast<int>(ph),
             static_cast<int>(pw), static_cast<int>(g.dh), 1, 0, 0, 0, 0, static_cast<int>(OC), 1, src.stride(0),
             src.stride(1), static_cast<int>(src.stride(2)), static_cast<int>(src.stride(3))};
  return true;
}

// Launches the vector kernel of a plan (vec_plan) over N images: QN = 4 outputs a thread, or 8
// in round 5's mode 2 (an A/B on the GPU: fewer column loads an output, more registers).
template <typename T, bool FLIP>
void launch_vec(int64_t N, const T* src, const T* w, const T* b, T* out, const DwTile& t, cudaStream_t stream) {
  const int QN = conv_dw_vec_mode().load() == 2 ? 8 : 4;
  const int64_t items = N * t.OH * ((t.OW + QN - 1) / QN) * (t.OC / vec_lanes<T>());
  if (items == 0) return;
  with_index_type(items, [&](auto index_zero) {
    using index_t = decltype(index_zero);
    static_assert(kVecThreads == kThreads, "blocks_for counts blocks of kThreads");
    const unsigned blocks = blocks_for(items);
    const index_t n = static_cast<index_t>(items);
    if (QN == 8) {
      if (t.R == 3) {
        dw_vec_cl_kernel<T, FLIP, 3, 8, index_t><<<blocks, kVecThreads, 0, stream>>>(src, w, b, out, t, n);
      } else {
        dw_vec_cl_kernel<T, FLIP, 5, 8, index_t><<<blocks, kVecThreads, 0, stream>>>(src, w, b, out, t, n);
      }
    } else if (t.R == 3) {
      dw_vec_cl_kernel<T, FLIP, 3, 4, index_t><<<blocks, kVecThreads, 0, stream>>>(src, w, b, out, t, n);
    } else {
      dw_vec_cl_kernel<T, FLIP, 5, 4, index_t><<<blocks, kVecThreads, 0, stream>>>(src, w, b, out, t, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  ++conv_dw_vec_launches();
}

}  // namespace

void depthwise_forward_cuda(const Conv2d& g, const Tensor& input, const Tensor& weight, const Tensor& bias, Tensor& out,
                            cudaStream_t stream) {
  const Tensor w = weight.contiguous();  // [K][1][R][S]
  const int64_t total = out.numel();
  DwTile t;
  int64_t tile_blocks = 0;
  int rows = 0;
  const bool cl = g.channels_last();
  DwTile tv;
  const bool vec = vec_plan(g, input, out, g.K, g.P, g.Q, g.H, g.W, g.sh, g.sw, g.ph, g.pw, g.dw, tv);
  const bool tiled = !vec && tile_plan(g, input, g.K, g.P, g.Q, g.H, g.W, g.sh, g.sw, g.ph, g.pw, t, tile_blocks, rows);
  CONVRNN_DISPATCH_FLOATING(input.scalar_type(), "convrnn.conv2d", [&] {
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    if (vec) {
      launch_vec<scalar_t, false>(g.N, input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b,
                                  out.mutable_data_ptr<scalar_t>(), tv, stream);
      return;
    }
    if (tiled) {
      launch_tile<scalar_t, false>(cl, rows, tile_blocks, input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                   b, out.mutable_data_ptr<scalar_t>(), t, stream);
      return;
    }
    with_index_type(total, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      if (g.channels_last()) {
        dw_forward_kernel<scalar_t, true, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b, out.mutable_data_ptr<scalar_t>(),
            dw_geom(g, input), static_cast<index_t>(total));
      } else {
        dw_forward_kernel<scalar_t, false, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b, out.mutable_data_ptr<scalar_t>(),
            dw_geom(g, input), static_cast<index_t>(total));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void depthwise_backward_data_cuda(const Conv2d& g, const Tensor& grad_output, const Tensor& weight, Tensor& grad_input,
                                  cudaStream_t stream) {
  const Tensor w = weight.contiguous();
  const int64_t total = grad_input.numel();
  // Stride 1: the forward tile over grad_output with flipped taps and padding (R-1)*d - p.
  DwTile t;
  int64_t tile_blocks = 0;
  int rows = 0;
  const bool cl = g.channels_last();
  DwTile tv;
  const bool vec = g.sh == 1 && g.sw == 1 &&
                   vec_plan(g, grad_output, grad_input, g.K / g.Kg, g.H, g.W, g.P, g.Q, 1, 1, (g.R - 1) * g.dh - g.ph,
                            (g.S - 1) * g.dw - g.pw, g.dw, tv);
  const bool tiled = !vec && g.sh == 1 && g.sw == 1 &&
                     tile_plan(g, grad_output, g.K / g.Kg, g.H, g.W, g.P, g.Q, 1, 1, (g.R - 1) * g.dh - g.ph,
                               (g.S - 1) * g.dw - g.pw, t, tile_blocks, rows);
  CONVRNN_DISPATCH_FLOATING(grad_output.scalar_type(), "convrnn.conv2d_backward", [&] {
    if (vec) {
      launch_vec<scalar_t, true>(g.N, grad_output.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), nullptr,
                                 grad_input.mutable_data_ptr<scalar_t>(), tv, stream);
      return;
    }
    if (tiled) {
      launch_tile<scalar_t, true>(cl, rows, tile_blocks, grad_output.const_data_ptr<scalar_t>(),
                                  w.const_data_ptr<scalar_t>(), nullptr, grad_input.mutable_data_ptr<scalar_t>(), t,
                                  stream);
      return;
    }
    with_index_type(total, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      if (g.channels_last()) {
        dw_backward_data_kernel<scalar_t, true, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            grad_input.mutable_data_ptr<scalar_t>(), dw_geom(g, grad_output), static_cast<index_t>(total));
      } else {
        dw_backward_data_kernel<scalar_t, false, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            grad_input.mutable_data_ptr<scalar_t>(), dw_geom(g, grad_output), static_cast<index_t>(total));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void depthwise_backward_weight_cuda(const Conv2d& g, const Tensor& grad_output, const Tensor& input,
                                    Tensor& grad_weight, Tensor& grad_bias, cudaStream_t stream) {
  DwGradGeom gg{dw_geom(g, input), grad_output.stride(0), grad_output.stride(1), grad_output.stride(2),
                grad_output.stride(3), g.N * g.P * g.Q, 0, 0, static_cast<int>(g.R * g.S + 1)};
  const bool cl = g.channels_last();
  const int64_t outputs = gg.taps * g.K;
  // At most 25 taps and 32-bit plane offsets: all taps per thread; NCHW: block per (k, chunk),
  // about 1024 blocks of chunks of at least 1024 pixels; channels_last: block per (32 channels,
  // chunk), about 1024 blocks of chunks of at least 128 pixels.
  const bool taps_kernel = gg.pixels > 0 && gg.taps <= 26 && g.P * g.Q < kI32 - 1024 && g.H < kI32 / 4 && g.W < kI32 / 4 &&
                           input.stride(2) >= 0 && input.stride(3) >= 0 && grad_output.stride(2) >= 0 &&
                           grad_output.stride(3) >= 0 &&
                           (g.H - 1) * input.stride(2) + (g.W - 1) * input.stride(3) < kI32 &&
                           (g.P - 1) * grad_output.stride(2) + (g.Q - 1) * grad_output.stride(3) < kI32 &&
                           g.P * g.sh < kI32 / 4 && g.Q * g.sw < kI32 / 4 && g.R * g.dh < kI32 / 4 &&
                           g.S * g.dw < kI32 / 4 && g.ph < kI32 / 4 && g.pw < kI32 / 4 && g.K * 1024 < kI32;
  // Fixed by the shape: about 2^17 threads (channels_last) or 2^14 warps (NCHW) of work.
  const conv::Chunks ch =
      taps_kernel && cl ? conv::split_chunks(gg.pixels, (g.K + kClLanes - 1) / kClLanes, 1024, 128, 1, 1024)
      : taps_kernel     ? conv::split_chunks(gg.pixels, g.K, 1024, 1024, 1, 1024)
                  : conv::split_chunks(gg.pixels, outputs, cl ? (int64_t(1) << 17) : (int64_t(1) << 14),
                                       cl ? 64 : 256, 1, 1024);
  gg.chunk_len = ch.len;
  gg.chunks = ch.count;
  const Tensor part = at::empty({ch.count, gg.taps, g.K},
                                input.options().dtype(at::toOpMathType(input.scalar_type())));
  CONVRNN_DISPATCH_FLOATING(input.scalar_type(), "convrnn.conv2d_backward", [&] {
    using A = acc_t<scalar_t>;
    const int64_t items = ch.count * outputs;
    if (taps_kernel && cl) {
      const unsigned blocks = static_cast<unsigned>(ch.count * ((g.K + kClLanes - 1) / kClLanes));
      if (gg.taps <= 10) {
        dw_wgrad_taps_cl_kernel<scalar_t, 10><<<blocks, kTileThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), part.mutable_data_ptr<A>(), gg);
      } else {
        dw_wgrad_taps_cl_kernel<scalar_t, 26><<<blocks, kTileThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), part.mutable_data_ptr<A>(), gg);
      }
    } else if (taps_kernel) {
      const unsigned blocks = static_cast<unsigned>(ch.count * g.K);
      if (gg.taps <= 10) {
        dw_wgrad_taps_kernel<scalar_t, 10><<<blocks, kTileThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), part.mutable_data_ptr<A>(), gg);
      } else {
        dw_wgrad_taps_kernel<scalar_t, 26><<<blocks, kTileThreads, 0, stream>>>(
            grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), part.mutable_data_ptr<A>(), gg);
      }
    } else if (cl) {
      dw_wgrad_thread_kernel<scalar_t><<<blocks_for(items), kThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), part.mutable_data_ptr<A>(), gg,
          items);
    } else {
      dw_wgrad_warp_kernel<scalar_t><<<blocks_for(items * 32), kThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), part.mutable_data_ptr<A>(), gg,
          items);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scalar_t* gw = grad_weight.defined() ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gb = grad_bias.defined() ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t sk = grad_weight.defined() ? grad_weight.stride(0) : 0;
    const int64_t sr = grad_weight.defined() ? grad_weight.stride(2) : 0;
    const int64_t ss = grad_weight.defined() ? grad_weight.stride(3) : 0;
    dw_wgrad_reduce_kernel<scalar_t><<<blocks_for(outputs), kThreads, 0, stream>>>(part.const_data_ptr<A>(), gw, gb,
                                                                                   sk, sr, ss, gg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace convrnn
