// The persistent CUDA recurrence (csrc/cuda/rnn_persistent.cu), as rnn_layers.cpp calls it.
//
// One cooperative kernel runs every step of one layer and direction, forward or backward,
// with its block's slice of W_hh staged in shared memory once for all steps and a grid-wide
// barrier between steps (instead of a cuBLAS product and a fused cell kernel per step).
// On by default since its first GPU run (H200, 2026-11-26: benchmarks/NOTES-rnn-seq.md):
// rnn_layers.cpp asks it first when persistent_rnn_enabled() (unless CONVRNN_PERSISTENT_RNN=0,
// or convrnn::_persistent_rnn(0)), and runs its own step loop wherever these functions return
// false (a case they do not serve: fp64, a projection, sizes whose W_hh slices do not fit on
// chip, no CUDA build, ...).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace convrnn {

enum class RnnCell : int { kLstm = 0, kGru = 1, kTanh = 2, kRelu = 3 };

// One layer and direction, in rnn_layers.cpp's terms (its Seq): steps are processed in the
// order k = 0..T-1, step(k) = reverse ? T-1-k : k, and step t is rows [off[t], off[t] + bs[t])
// of the (N, ...) row blocks.  Every tensor is on one device, of one dtype, and contiguous
// (rnn_layers.cpp's persistent_layer makes them so).
struct PersistentLayer {
  RnnCell cell = RnnCell::kLstm;
  int64_t T = 0, B = 0, N = 0, H = 0;
  bool reverse = false;
  const std::vector<int64_t>* bs = nullptr;   // rows of each step; nullptr: every step has B rows
  const std::vector<int64_t>* off = nullptr;  // first row of each step (with bs)
  at::Tensor w_hh;                             // (G*H, H)
  std::optional<at::Tensor> b_ih, b_hh;        // (G*H) each, or none
  at::Tensor h0, c0;                           // (B, H); c0 for the LSTM only
};

// A layer bias's data, or null where the layer has none.
template <typename T>
const T* bias_data(const std::optional<at::Tensor>& b) {
  return b.has_value() ? b->const_data_ptr<T>() : nullptr;
}

// Whether it is on: yes unless CONVRNN_PERSISTENT_RNN=0 (or false/off/no) when first asked,
// or what convrnn::_persistent_rnn last set (rnn_layers.cpp, compiled in every build).
bool persistent_rnn_enabled();
// Counts persistent kernel launches (convrnn::_persistent_rnn returns the count: the tests
// check that the path they force really ran), and by sync (0 grid barrier, 1 cluster, 2 cluster
// with distributed shared memory: convrnn::_persistent_rnn_launches).
void note_persistent_launch(int sync);

// A unidirectional stack of L >= 2 layers without projections, for inference (no backward
// follows): every layer's recurrence in one kernel, as a wavefront (rnn_persistent.cuh:
// stack_forward_kernel).  Every tensor contiguous, on one device, of one dtype.
struct PersistentStack {
  RnnCell cell = RnnCell::kLstm;
  int64_t T = 0, B = 0, H = 0;
  std::vector<at::Tensor> w_ih;                      // layers 1..L-1: (G*H, H)
  std::vector<at::Tensor> w_hh;                      // every layer: (G*H, H)
  std::vector<std::optional<at::Tensor>> b_ih, b_hh;  // every layer: (G*H) or none
  at::Tensor h0, c0;                                 // (L, B, H); c0 for the LSTM only
};

// Whether the stacked kernel is offered (with persistent_rnn_enabled()): yes unless
// CONVRNN_PERSISTENT_STACK=0 when first asked, or what convrnn::_persistent_rnn_stack last set;
// and counts its launches.
bool persistent_stack_enabled();
void note_persistent_stack_launch();

#if defined(CONVRNN_WITH_CUDA)
// x: (T*B, G*H) layer 0's input projections.  Fills out (T*B, H) (the last layer's h of every
// step), hn and cn ((L, B, H); cn for the LSTM), preallocated.  Returns false, launching
// nothing, where it does not serve the case (a GPU before sm_90, a batch over 8, a stack whose
// weights do not fit in one thread-block cluster's shared memory, ...).
bool persistent_stack_forward(const PersistentStack& s, const at::Tensor& x, at::Tensor& out, at::Tensor& hn,
                              at::Tensor& cn);

// x: (N, G*H) input projections.  Fills out (N, H), cs (N, H) (LSTM, every step's c), and ws
// (N, 4H) when defined (the fused cell ops' workspace: LSTM i, f, g, o; GRU r, z, n, hn), all
// preallocated.  Returns false, launching nothing, where it does not serve the case.
bool persistent_forward(const PersistentLayer& l, const at::Tensor& x, at::Tensor& out, at::Tensor& cs,
                        at::Tensor& ws);

// grad_out: (N, H) or undefined; out, cs, ws: what the forward saved.  dh (and dc, LSTM) come
// in holding grad_hn (grad_cn) or zeros, (B, H), and leave holding grad_h0 (grad_c0).
// g_hidden (N, G*H): the gradients of the hidden-side pre-activations (the LSTM's and the
// vanilla RNN's gate gradients, the GRU's gh); g_input (N, 3H): the GRU's input-side ones
// (undefined for the others, whose input-side gradient is g_hidden).  Preallocated.
bool persistent_backward(const PersistentLayer& l, const at::Tensor& grad_out, const at::Tensor& out,
                         const at::Tensor& cs, const at::Tensor& ws, at::Tensor& dh, at::Tensor& dc,
                         at::Tensor& g_hidden, at::Tensor& g_input);
#else
inline bool persistent_stack_forward(const PersistentStack&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                     at::Tensor&) {
  return false;
}
inline bool persistent_forward(const PersistentLayer&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&) {
  return false;
}
inline bool persistent_backward(const PersistentLayer&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&) {
  return false;
}
#endif

}  // namespace convrnn
