// Large CPU outputs with their fresh pages mapped cheaply before a kernel writes them.
//
// A tensor of many MiB often comes from a fresh mmap (glibc's mmap threshold, 32 MiB at most),
// and each 4 KiB page faults on its first write: a 103 MB gradient (max_pool2d's for VGG's
// 2x2/2 layer) costs 34-38 ms of faults and writes on two threads (Zen 3 VM, session 19), more
// than the kernel's own work.  Two remedies, tried in this order:
//  - transparent huge pages: where the kernel's THP setting is "always" or "madvise",
//    madvise(MADV_HUGEPAGE) over the 2 MiB-aligned middle of the block, so that the writers'
//    faults map 2 MiB at a time (the same zeroed memory): a fresh 103 MB tensor's fill_ 34.4 ->
//    10.2 ms (/tmp harness, session 19).  The advice takes ~0.1 ms.  This is what torch's own
//    THP_MEM_ALLOC_ENABLE does for all its CPU allocations.
//  - otherwise, for 32 MiB or more, madvise(MADV_POPULATE_WRITE) (Linux 5.14), which maps a
//    range's pages in one call per chunk, without a trap per page: 29-36 ms for the faults and
//    writes above on the Zen 4 of sessions 9-17 (it was 37-51 ms without).
// Only fresh memory (mincore: not resident) is advised; memory already mapped is left as it is.
// Where the kernel lacks an advice (EINVAL), it is not asked again.
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
#include <fstream>
#include <string>
#endif

namespace convrnn {

// Below this many bytes an output is left to fault page by page: smaller blocks often come back
// from glibc's heap already mapped, and at least one whole 2 MiB page must fit inside.
constexpr int64_t kHugeAdviceBytes = int64_t(4) << 20;
// Below this many bytes, without huge pages, the same: where memory is already mapped the populate
// call still walks every page table entry (a 25.7 MB max-pool output reused from the heap: 6.3 ->
// 7.2 ms forward with the call).
constexpr int64_t kPopulateBytes = int64_t(32) << 20;

#if defined(__linux__)
// Whether the kernel's transparent huge pages serve madvise(MADV_HUGEPAGE) ("always" or
// "madvise", not "never"), read once.
inline bool huge_pages_on_advice() {
  static const bool on = [] {
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string line;
    return std::getline(f, line) &&
           (line.find("[always]") != std::string::npos || line.find("[madvise]") != std::string::npos);
  }();
  return on;
}
#endif

// Prepares the pages of t's memory for its writers where t holds fresh (unmapped) memory: huge
// pages where the system gives them on advice (from kHugeAdviceBytes), else the pages mapped in
// bulk, the chunks over the intra-op threads (from kPopulateBytes).
inline void populate_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE) && defined(MADV_HUGEPAGE)
  static std::atomic<bool> populate_works{true}, huge_works{true};
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (bytes < kHugeAdviceBytes || !t.is_cpu()) return;
  const bool huge = huge_works.load(std::memory_order_relaxed) && huge_pages_on_advice();
  if (!huge && (bytes < kPopulateBytes || !populate_works.load(std::memory_order_relaxed))) return;
  const auto page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto start = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t lo = (start + page - 1) / page * page, hi = (start + bytes) / page * page;
  if (hi <= lo) return;
  // only fresh memory: on pages already mapped (a block glibc kept) the populate call still costs
  // 3-4 ms for 37 MB.  A fresh mmap's first page holds glibc's chunk header, so its middle and
  // last pages tell: neither resident, fresh.
  for (const std::uintptr_t sample : {lo + (hi - lo) / 2 / page * page, hi - page}) {
    unsigned char resident = 0;
    if (mincore(reinterpret_cast<void*>(sample), page, &resident) != 0 || (resident & 1) != 0) return;
  }
  if (huge) {
    constexpr std::uintptr_t kHuge = std::uintptr_t(2) << 20;
    const std::uintptr_t hlo = (start + kHuge - 1) / kHuge * kHuge, hhi = (start + bytes) / kHuge * kHuge;
    if (hhi <= hlo) return;
    if (madvise(reinterpret_cast<void*>(hlo), hhi - hlo, MADV_HUGEPAGE) == 0) return;
    if (errno == EINVAL) huge_works.store(false, std::memory_order_relaxed);
    if (bytes < kPopulateBytes || !populate_works.load(std::memory_order_relaxed)) return;
  }
  const std::uintptr_t chunk = std::max<std::uintptr_t>(page, (std::uintptr_t(2) << 20) / page * page);
  const int64_t chunks = static_cast<int64_t>((hi - lo + chunk - 1) / chunk);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const std::uintptr_t a = lo + c0 * chunk, b = std::min(hi, lo + c1 * chunk);
    if (madvise(reinterpret_cast<void*>(a), b - a, MADV_POPULATE_WRITE) != 0 && errno == EINVAL) {
      populate_works.store(false, std::memory_order_relaxed);
    }
  });
#else
  (void)t;
#endif
}

// at::empty for an output a kernel writes whole, its pages prepared where fresh (populate_pages).
inline at::Tensor empty_populated(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  populate_pages(t);
  return t;
}

}  // namespace convrnn
