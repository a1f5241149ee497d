// CPU buffers of a few MiB kept between calls, so that the recurrent layers' per-call tensors do
// not fault their pages in anew on every call.
//
// glibc serves blocks of this size from the heap's top or from a fresh mmap, depending on its
// dynamic thresholds, and hands the top back to the system when the freed space passes its trim
// threshold; so from call to call, the same 6.5 MB input projection or gate-gradient buffer
// either comes back mapped or faults on every 4 KiB page (nn.LSTM's training step, T50 B32 H256,
// 2 layers: 3,000-8,800 minor faults an iteration run alone, ~11% of its samples in the kernel's
// fault path; none when torch's own calls alternate with ours and keep the heap large).
//
// reused_empty(sizes, opts) is at::empty for a CPU tensor of kReuseMin to kReuseMax bytes that
// its kernel writes whole: its storage comes from a small process-wide pool, a buffer at a time,
// and goes back to the pool when every tensor using it is gone (the pool's own reference is then
// the only one: no tensor, view, saved variable or Python object still holds it).  A buffer some
// tensor still holds is never handed out again, so results are those of at::empty, garbage
// included: the callers write every element.  Outside the sizes, on other devices, or with the
// pool full (kReuseSlots buffers, kReuseTotal bytes), it is at::empty itself.  The switch
// convrnn::_reuse_memory (CONVRNN_REUSE_MEMORY=0 when first asked) turns the pool off, and
// turning it off empties it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace convrnn {

constexpr int64_t kReuseMin = int64_t(1) << 20;
constexpr int64_t kReuseMax = int64_t(32) << 20;
constexpr int64_t kReuseTotal = int64_t(96) << 20;
constexpr int kReuseSlots = 16;

at::Tensor reused_empty(at::IntArrayRef sizes, const at::TensorOptions& opts);

}  // namespace convrnn
