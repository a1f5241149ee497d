// The CPU layer recurrence (csrc/cpu/rnn_recurrence.cpp), as rnn_layers.cpp calls it.
//
// One call runs every step of one LSTM, GRU or RNN layer and direction, forward or backward, on
// the CPU: the hidden units are split over the intra-op threads once, each task keeps its slice
// of W_hh packed for its products (float: our AVX-512 panels, else MKL's) for all steps, and a
// step is one parallel region in which every task multiplies the state by its slice and runs
// the cell on its units: no dispatcher call, allocation or copy per step.  A forward or backward
// with enough batch rows splits the rows over the threads instead, each running every step on
// its own rows.  rnn_layers.cpp asks it first for float and double layers (LSTMs without a
// projection; unless CONVRNN_CPU_RECURRENCE=0, or convrnn::_cpu_recurrence(0)) and runs its own
// step loop wherever these return false.
#pragma once

#include <ATen/ATen.h>

#include "rnn_persistent.h"  // PersistentLayer: the layer's description, shared with the CUDA recurrence

namespace convrnn {

// 0: off; 1: on (the default); 2: on, and every step split over the hidden units whatever its
// size; 3: on, the forward and the backward split over the batch's rows from 2 rows a task (the
// tests' ways to reach the parallel code with small shapes).  rnn_layers.cpp keeps it.
int cpu_recurrence_mode();
// Counts the layer calls the recurrence served (convrnn::_cpu_recurrence returns the count).
void note_cpu_recurrence_run();

// Whether the recurrence serves this dtype here (float and double, with BLAS linked in).
bool cpu_recurrence_serves(at::ScalarType dtype);

// The tensors are rnn_persistent.h's (persistent_forward / persistent_backward), on the CPU, and
// so is what they hold: x (N, G*H) the input projections; fills out (N, H), cs (N, H, LSTM) and,
// when defined, ws (N, 4H: the LSTM's activated gates, the GRU's r, z, n, hn), all preallocated.
// Returns false, computing nothing, where it does not serve the case.
bool cpu_recurrence_forward(const PersistentLayer& l, const at::Tensor& x, at::Tensor& out, at::Tensor& cs,
                            at::Tensor& ws);

// grad_out (N, H) or undefined; dh (and dc, LSTM) (B, H) come in holding grad_hn (grad_cn) or
// zeros and leave holding grad_h0 (grad_c0); fills g_hidden (N, G*H: the hidden-side gate
// gradients), g_input (N, 3H: the GRU's input-side ones; unused otherwise), grad_b_ih (G*H: the
// sum of the input-side gate gradients over every row of every step; the LSTM's and the RNN's
// serve for both biases) and grad_b_hh (the GRU's hidden-side sum).  Preallocated.
bool cpu_recurrence_backward(const PersistentLayer& l, const at::Tensor& grad_out, const at::Tensor& out,
                             const at::Tensor& cs, const at::Tensor& ws, at::Tensor& dh, at::Tensor& dc,
                             at::Tensor& g_hidden, at::Tensor& g_input, at::Tensor& grad_b_ih,
                             at::Tensor& grad_b_hh);

}  // namespace convrnn
