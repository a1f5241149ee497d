// The CPU layer recurrence (csrc/cpu/rnn_recurrence.cpp), as rnn_layers.cpp calls it.
//
// One call runs every step of one LSTM layer and direction, forward or backward, on the CPU:
// the hidden units are split over the intra-op threads once, each task keeps its slice of W_hh
// laid out for BLAS (MKL-packed for float) for all steps, and a step is one parallel region in
// which every task multiplies the state by its slice and runs the cell on its units: no
// dispatcher call, allocation or copy per step.  rnn_layers.cpp asks it first for float and
// double LSTMs without a projection (unless CONVRNN_CPU_RECURRENCE=0, or
// convrnn::_cpu_recurrence(0)) and runs its own step loop wherever these return false.
#pragma once

#include <ATen/ATen.h>

#include "rnn_persistent.h"  // PersistentLayer: the layer's description, shared with the CUDA recurrence

namespace convrnn {

// 0: off; 1: on (the default); 2: on, and every step split over the threads whatever its size
// (the tests' way to reach the parallel code with small shapes).  rnn_layers.cpp keeps it.
int cpu_recurrence_mode();
// Counts the layer calls the recurrence served (convrnn::_cpu_recurrence returns the count).
void note_cpu_recurrence_run();

// Whether the recurrence serves this dtype here (float and double, with BLAS linked in).
bool cpu_recurrence_serves(at::ScalarType dtype);

// The tensors are rnn_persistent.h's, on the CPU: x (N, 4H) the input projections; fills out
// (N, H), cs (N, H) and, when defined, ws (N, 4H: the activated gates i, f, g, o), all
// preallocated.  Returns false, computing nothing, where it does not serve the case.
bool cpu_lstm_forward(const PersistentLayer& l, const at::Tensor& x, at::Tensor& out, at::Tensor& cs,
                      at::Tensor& ws);

// grad_out (N, H) or undefined; dh and dc (B, H) come in holding grad_hn and grad_cn (or zeros)
// and leave holding grad_h0 and grad_c0; fills gg (N, 4H), the gate gradients, and grad_bias
// (4H), their sum over every row of every step.  Preallocated.
bool cpu_lstm_backward(const PersistentLayer& l, const at::Tensor& grad_out, const at::Tensor& out,
                       const at::Tensor& cs, const at::Tensor& ws, at::Tensor& dh, at::Tensor& dc, at::Tensor& gg,
                       at::Tensor& grad_bias);

}  // namespace convrnn
