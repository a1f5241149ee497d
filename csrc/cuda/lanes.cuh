// Vector accesses of the CUDA kernels: L values of one type loaded or stored as one access of
// sizeof(T) * L bytes (up to 16), and the alignment test the launchers make before taking such a
// path.  Plain C++ (no CUDA runtime), so the CPU checks of tests/native/ include it too.
#pragma once

#include <cstddef>
#include <cstdint>

namespace convrnn {

// The address of such an access must be aligned to its size.
template <typename T, int L>
struct alignas(sizeof(T) * L) Lanes {
  T v[L];
};

inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace convrnn
