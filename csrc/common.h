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

// Channels-last when the input suggests it (as torch's pooling does), else contiguous.
inline at::MemoryFormat image_format(const at::Tensor& t) {
  return t.dim() == 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

}  // namespace convrnn
