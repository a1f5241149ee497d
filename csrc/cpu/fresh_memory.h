// Large CPU outputs with their pages mapped in bulk before a kernel writes them.
//
// A tensor of 32 MiB or more comes from a fresh mmap on every allocation (glibc's largest mmap
// threshold), and each 4 KiB page faults on its first write: a 103 MB gradient (max_pool2d's for
// VGG's 2x2/2 layer) cost 37-51 ms of faults and writes on two threads here, more than the
// kernel's own work.  madvise(MADV_POPULATE_WRITE) (Linux 5.14) maps a range's pages in one
// call per chunk, without a trap per page: 29-36 ms for the same faults and writes (/tmp
// harness, AMD EPYC VM).  The pages are the same zeroed pages the faults would have mapped.  Where
// the kernel lacks the advice (EINVAL), and on memory already mapped, the pages are left as they
// are.  In max_pool2d's forward+backward (one process, alternating with and without): VGG 2x2/2
// NCHW 45.5 -> 39.9 ms, the ResNet stem 52.9 -> 47.1 ms, channels_last 83.1 -> 74.4 ms.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#endif

namespace convrnn {

// Below this many bytes an output is left to fault page by page: smaller blocks often come back
// from glibc's heap already mapped, where the call still walks every page table entry (a 25.7 MB
// max-pool output reused from the heap: 6.3 -> 7.2 ms forward with the call).
constexpr int64_t kPopulateBytes = int64_t(32) << 20;

// Maps the pages of t's memory in bulk, the chunks over the intra-op threads, where t holds at
// least kPopulateBytes of fresh (unmapped) memory.
inline void populate_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  static std::atomic<bool> works{true};
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (bytes < kPopulateBytes || !works.load(std::memory_order_relaxed) || !t.is_cpu()) return;
  const auto page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto start = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t lo = (start + page - 1) / page * page, hi = (start + bytes) / page * page;
  if (hi <= lo) return;
  // only fresh memory: on pages already mapped (a block glibc kept) the call still costs 3-4 ms
  // for 37 MB here, more than the writes.  A fresh mmap's first page holds glibc's chunk header, so
  // its middle and last pages tell: neither resident, populate.
  for (const std::uintptr_t sample : {lo + (hi - lo) / 2 / page * page, hi - page}) {
    unsigned char resident = 0;
    if (mincore(reinterpret_cast<void*>(sample), page, &resident) != 0 || (resident & 1) != 0) return;
  }
  const std::uintptr_t chunk = std::max<std::uintptr_t>(page, (std::uintptr_t(2) << 20) / page * page);
  const int64_t chunks = static_cast<int64_t>((hi - lo + chunk - 1) / chunk);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const std::uintptr_t a = lo + c0 * chunk, b = std::min(hi, lo + c1 * chunk);
    if (madvise(reinterpret_cast<void*>(a), b - a, MADV_POPULATE_WRITE) != 0 && errno == EINVAL) {
      works.store(false, std::memory_order_relaxed);
    }
  });
#else
  (void)t;
#endif
}

// at::empty for an output a kernel writes whole, its pages mapped in bulk where fresh
// (populate_pages).
inline at::Tensor empty_populated(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  populate_pages(t);
  return t;
}

}  // namespace convrnn
