// Shared by every op: the host-device inline macro, CPU multiversioning, the dtype dispatch
// and the argument checks whose messages name the op and the argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

// Shared arithmetic is always inlined: on the CPU it must end up inside the cloned
// (CONVRNN_CPU_CLONES) loops to be vectorised at their width; a call out of them runs the
// baseline x86-64 code, where rint or fma are library calls.
#if defined(__CUDACC__)
#define CONVRNN_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define CONVRNN_HD inline __attribute__((always_inline))
#else
#define CONVRNN_HD inline
#endif

// Hot CPU loops are written so that the compiler vectorises them, and compiled three times
// (AVX-512, AVX2+FMA and baseline x86-64); the loader picks the best the CPU runs.  Only
// the function carrying the attribute is cloned, so it must not hide its loops in lambdas.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__) && defined(__linux__)
#define CONVRNN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CONVRNN_CPU_CLONES
#endif

// Helpers of a cloned function must be inlined into it to get its vector width (and its
// compile-time strides); a plain inline hint is not always taken.
#if defined(__GNUC__)
#define CONVRNN_INLINE inline __attribute__((always_inline))
#else
#define CONVRNN_INLINE inline
#endif

// The four floating dtypes every op supports; half types compute in float (opmath).
#define CONVRNN_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace convrnn {

template <typename T>
using acc_t = at::opmath_type<T>;

// NaN-propagating "is v a new maximum": a NaN always wins, so the last NaN in scan order is
// the argmax, exactly as torch's pooling kernels do.
template <typename A>
CONVRNN_HD bool max_takes(A v, A best) {
  return v > best || v != v;
}

// Floor and ceiling division for signed integers (32-bit on the GPU where sizes allow).
template <typename I>
CONVRNN_HD I div_floor(I a, I b) {
  I q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

template <typename I>
CONVRNN_HD I div_ceil(I a, I b) {
  return -div_floor(-a, b);
}

// Division by a divisor fixed before a kernel launch, for 0 <= n (the CUDA kernels' index
// decomposition).  32-bit indices divide without a divide instruction, by torch's
// IntDivider (Granlund & Montgomery's round-up method): with s = ceil(log2 d) and
// m = floor(2^32 (2^s - d) / d) + 1, n / d = (umulhi(n, m) + n) >> s for 0 <= n < 2^31
// (exact there; umulhi(n, m) <= n, so the sum fits 32 bits).  Other index types divide
// plainly.  Constructed on the host, passed to kernels by value.
template <typename I>
struct Divider {
  I d;
  Divider() = default;
  explicit Divider(I divisor) : d(divisor) {
    TORCH_INTERNAL_ASSERT(divisor >= 1, "convrnn: Divider needs a positive divisor, got ", divisor);
  }
  CONVRNN_HD I div(I n) const { return n / d; }
};

template <>
struct Divider<int32_t> {
  int32_t d;
  uint32_t m, s;
  Divider() = default;
  explicit Divider(int32_t divisor) : d(divisor), m(0), s(0) {
    TORCH_INTERNAL_ASSERT(divisor >= 1, "convrnn: Divider needs a positive divisor, got ", divisor);
    while ((uint64_t(1) << s) < uint64_t(divisor)) ++s;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << s) - uint64_t(divisor))) / uint64_t(divisor) + 1);
  }
  CONVRNN_HD int32_t div(int32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(static_cast<uint32_t>(n), m);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(static_cast<uint32_t>(n)) * m) >> 32);
#endif
    return static_cast<int32_t>((hi + static_cast<uint32_t>(n)) >> s);
  }
};

// n / d, and n % d in rem (0 <= n).
template <typename I>
CONVRNN_HD I divmod(I n, const Divider<I>& d, I& rem) {
  const I q = d.div(n);
  rem = n - q * d.d;
  return q;
}

// ---- host-side checks: every message starts with "convrnn.<op>: <argument> ..." ----

inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
                   "convrnn.", op, ": ", arg, " must be float32, float64, float16 or bfloat16, but got ",
                   s);
}

inline void check_same(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "convrnn.", op, ": ", arg, " is on ", t.device(), " but ",
              ref_arg, " is on ", ref.device(), "; expected all tensors on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "convrnn.", op, ": ", arg, " has dtype ",
                   t.scalar_type(), " but ", ref_arg, " has dtype ", ref.scalar_type(),
                   "; expected one dtype");
}

inline void check_shape(const char* op, const char* arg, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "convrnn.", op, ": ", arg, " must have shape ", expected, ", but got ",
              t.sizes());
}

// "(a, b)" for the messages about int-pair arguments (kernel_size, stride, padding, ...).
inline std::string pair_str(at::IntArrayRef v) {
  return "(" + std::to_string(v[0]) + ", " + std::to_string(v[1]) + ")";
}

inline void check_pair(const char* op, const char* arg, at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 2, "convrnn.", op, ": ", arg, " must be an int or a pair of ints, but got ", v.size(),
              " values");
}

// The stride, padding and dilation pairs of a windowed op (pooling, convolution):
// two values each, stride and dilation positive, padding non-negative.
inline void check_window_args(const char* op, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  check_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  check_pair(op, "dilation", dilation);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "convrnn.", op, ": stride must be greater than zero, but got ",
              pair_str(stride));
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, "convrnn.", op,
              ": dilation must be greater than zero, but got ", pair_str(dilation));
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "convrnn.", op, ": padding must be non-negative, but got ",
              pair_str(padding));
}

// Copies checked stride, padding and dilation pairs into a geometry's sh/sw, ph/pw, dh/dw.
template <typename G>
void set_window_args(G& g, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
}

// Channels-last when the input suggests it (as torch's pooling does), else contiguous.
inline at::MemoryFormat image_format(const at::Tensor& t) {
  return t.dim() == 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

}  // namespace convrnn
