// local_response_norm arithmetic shared by the CPU and CUDA kernels.
//
//   s_c   = k + alpha/size * sum_{j in win(c)} x_j^2,   win(c) = [c - size/2, c + (size-1)/2]
//   y_c   = x_c * s_c^-beta
//   dx_j  = g_j * s_j^-beta - (2 alpha beta / size) * x_j * sum_{c : j in win(c)} g_c x_c s_c^(-beta-1)
// where channels outside [0, C) count as zero (torch pads the squares with zeros and
// averages over `size` with count_include_pad), and {c : j in win(c)} = [j - (size-1)/2, j + size/2].
#pragma once

#include "common.h"

namespace convrnn {

// How s^-beta is computed: exact special cases for the common betas (AlexNet's 0.75 among
// them) need only square roots, which vectorise; any other beta calls pow.
enum LrnPow : int { kLrnPowGeneric = 0, kLrnPowHalf = 1, kLrnPowThreeQuarters = 2, kLrnPowOne = 3 };

struct LrnConst {
  int64_t size;
  double alpha_over_size, beta, k, grad_coef;  // grad_coef = 2 alpha beta / size
  int pow_mode;
};

inline LrnConst lrn_const(int64_t size, double alpha, double beta, double k) {
  int mode = beta == 0.75 ? kLrnPowThreeQuarters : beta == 0.5 ? kLrnPowHalf : beta == 1.0 ? kLrnPowOne : kLrnPowGeneric;
  return {size, alpha / static_cast<double>(size), beta, k, 2.0 * alpha * beta / static_cast<double>(size), mode};
}

// First and last channel of win(c), unclamped.
CONVRNN_HD int64_t lrn_window_first(int64_t c, int64_t size) { return c - size / 2; }
CONVRNN_HD int64_t lrn_window_last(int64_t c, int64_t size) { return c + (size - 1) / 2; }
// First and last channel c whose window contains channel j (the backward's sum), unclamped.
CONVRNN_HD int64_t lrn_users_first(int64_t j, int64_t size) { return j - (size - 1) / 2; }
CONVRNN_HD int64_t lrn_users_last(int64_t j, int64_t size) { return j + size / 2; }

template <typename A>
CONVRNN_HD A lrn_scale(A sum_sq, A alpha_over_size, A k) {
  return k + alpha_over_size * sum_sq;
}

CONVRNN_HD float hd_sqrt(float v) { return sqrtf(v); }
CONVRNN_HD double hd_sqrt(double v) { return sqrt(v); }
CONVRNN_HD float hd_pow(float a, float b) { return powf(a, b); }
CONVRNN_HD double hd_pow(double a, double b) { return pow(a, b); }

// s^-beta.
template <int MODE, typename A>
CONVRNN_HD A lrn_inv_pow(A s, A beta) {
  if (MODE == kLrnPowThreeQuarters) {
    const A r = A(1) / hd_sqrt(s);  // s^-1/2
    return r * hd_sqrt(r);           // s^-1/2 * s^-1/4
  } else if (MODE == kLrnPowHalf) {
    return A(1) / hd_sqrt(s);
  } else if (MODE == kLrnPowOne) {
    return A(1) / s;
  } else {
    return hd_pow(s, -beta);
  }
}

// Calls f with the pow mode as a compile-time constant.
template <typename F>
void with_lrn_pow(int mode, F&& f) {
  switch (mode) {
    case kLrnPowHalf: f(std::integral_constant<int, kLrnPowHalf>()); break;
    case kLrnPowThreeQuarters: f(std::integral_constant<int, kLrnPowThreeQuarters>()); break;
    case kLrnPowOne: f(std::integral_constant<int, kLrnPowOne>()); break;
    default: f(std::integral_constant<int, kLrnPowGeneric>()); break;
  }
}

// The geometry every kernel sees: (N, C, S) with S the product of the trailing dims, and
// channels either strided by S (contiguous input) or innermost (4-D channels_last input).
struct Lrn {
  int64_t N, C, S;
  bool channels_last;
};

inline at::MemoryFormat lrn_format(const Lrn& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Validates input and size for op `op` and returns the geometry.
Lrn lrn_geometry(const char* op, const at::Tensor& input, int64_t size);

// The backward's checks: lrn_geometry's, and grad_output matching input.
Lrn lrn_backward_geometry(const char* op, const at::Tensor& grad_output, const at::Tensor& input, int64_t size);

}  // namespace convrnn
