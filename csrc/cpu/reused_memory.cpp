// The pool behind reused_empty (reused_memory.h).
#include "reused_memory.h"

#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <tuple>
#include <vector>

#include "../switches.h"

namespace convrnn {
namespace {

// CONVRNN_REUSE_MEMORY when first asked (1: the pool, 0: plain at::empty), convrnn::_reuse_memory.
std::atomic<int>& reuse_mode() {
  static std::atomic<int> mode{env_mode("CONVRNN_REUSE_MEMORY", 1)};
  return mode;
}
std::atomic<int64_t> reuses{0};  // buffers handed out again

struct Pool {
  std::mutex lock;
  std::vector<c10::Storage> kept;
  int64_t bytes = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may outlive static destruction
  return *p;
}

// Nothing but the pool holds s: no tensor (views included) and no weak reference that could
// hand it out again.
bool only_ours(const c10::Storage& s) {
  return s.use_count() == 1 && s.getWeakStorageImpl().weak_use_count() == 2;  // 2: the live count's and ours
}

at::Tensor on(const c10::Storage& s, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::empty({0}, opts).set_(s, 0, sizes, {});
}

}  // namespace

at::Tensor reused_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t n = 1;
  for (const int64_t s : sizes) n *= s;
  const int64_t bytes = n * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
  if (!opts.device().is_cpu() || bytes < kReuseMin || bytes > kReuseMax || reuse_mode().load() == 0 ||
      (opts.has_layout() && opts.layout() != at::kStrided)) {
    return at::empty(sizes, opts);
  }
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.lock);
  // the smallest free buffer that fits; else a new one; else (the pool full) the largest free one
  // too small, replaced
  int fit = -1, small = -1;
  for (int i = 0; i < static_cast<int>(p.kept.size()); ++i) {
    const c10::Storage& s = p.kept[i];
    if (!only_ours(s)) continue;
    const auto have = static_cast<int64_t>(s.nbytes());
    if (have >= bytes) {
      if (fit < 0 || have < static_cast<int64_t>(p.kept[fit].nbytes())) fit = i;
    } else if (small < 0 || have > static_cast<int64_t>(p.kept[small].nbytes())) {
      small = i;
    }
  }
  if (fit >= 0) {
    reuses.fetch_add(1, std::memory_order_relaxed);
    return on(p.kept[fit], sizes, opts);
  }
  const at::TensorOptions raw = at::TensorOptions().dtype(at::kByte).device(at::kCPU);
  if (static_cast<int>(p.kept.size()) < kReuseSlots && p.bytes + bytes <= kReuseTotal) {
    p.kept.push_back(at::empty({bytes}, raw).storage());
    p.bytes += bytes;
    return on(p.kept.back(), sizes, opts);
  }
  if (small >= 0 && p.bytes - static_cast<int64_t>(p.kept[small].nbytes()) + bytes <= kReuseTotal) {
    p.bytes -= static_cast<int64_t>(p.kept[small].nbytes());
    p.kept[small] = at::empty({bytes}, raw).storage();
    p.bytes += bytes;
    return on(p.kept[small], sizes, opts);
  }
  return at::empty(sizes, opts);
}

// Turning the pool off also lets go of the buffers no tensor holds (the others leave the pool too
// and are freed with their last tensor).
std::tuple<int64_t, int64_t> reuse_switch(int64_t mode) {
  auto result = switch_op("_reuse_memory", reuse_mode(), reuses, mode, 1);
  if (mode == 0) {
    Pool& p = pool();
    std::lock_guard<std::mutex> guard(p.lock);
    p.kept.clear();
    p.bytes = 0;
  }
  return result;
}

}  // namespace convrnn

TORCH_LIBRARY_FRAGMENT(convrnn, m) {
  // mode -1 asks, 0 turns the pool off (at::empty) and empties it, 1 on; returns (mode before,
  // buffers reused so far).
  m.def("_reuse_memory(int mode=-1) -> (int, int)", &convrnn::reuse_switch);
}
