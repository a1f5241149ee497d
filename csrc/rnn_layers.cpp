// Whole-sequence recurrent layers: lstm_layer, gru_layer, rnn_layer and their backward ops.
//
// One op runs the recurrence of one layer in one direction.  The input projection of all
// steps is computed before it (one matrix product, in Python, differentiated by autograd);
// the op gets it as x_proj and loops over the steps here, in C++: per step one at::mm for
// h W_hh^T and one call of the fused cell op (convrnn::*_cell_fused, through the dispatcher,
// so that the same code runs on the CPU and on CUDA).  The backward op loops over the steps
// in the opposite order calling the fused backward ops, carries dh (and dc), and computes
// grad W_hh with ONE matrix product over all steps at the end; bias gradients are sums.
//
// Layout: x_proj is (T, B, G*H) or, for a PackedSequence, (sum(batch_sizes), G*H) with
// batch_sizes (T,) int64 on the CPU (sorted by decreasing length: step t uses the first
// batch_sizes[t] rows).  Internally both are (N, G*H) row blocks: step t is rows
// [off[t], off[t] + bs[t]).  The state entering a step is the previous processed step's rows,
// plus rows of h0 for sequences that start at this step (reverse direction of packed input).
//
// The code is device-agnostic (ATen ops and dispatcher calls only) and registered for the
// CPU and the CUDA dispatch keys.  On CUDA each op first offers its recurrence to the
// persistent kernels (csrc/rnn_persistent.h; CONVRNN_PERSISTENT_RNN=0 turns them off), on the
// CPU they offer it to the CPU recurrence (csrc/cpu/rnn_recurrence.h;
// CONVRNN_CPU_RECURRENCE=0 turns it off), and run the step loop below only where they decline.
// rnn_stack (at the end) runs a whole unidirectional stack for inference: on CUDA every layer in
// one stacked persistent kernel where it can, else these layer functions in turn.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "cpu/panel_gemm.h"
#include "cpu/reused_memory.h"
#include "cpu/rnn_recurrence.h"
#include "rnn_persistent.h"
#include "switches.h"
#include "typed_op.h"

namespace convrnn {

// ---- the persistent CUDA recurrence's switch (rnn_persistent.h) ----

namespace {

// 1: on (the default), 0: off.  CONVRNN_PERSISTENT_RNN=0 (or false/off/no) when first asked
// turns it off; convrnn::_persistent_rnn sets it.
std::atomic<int>& persistent_mode() {
  static std::atomic<int> mode(env_mode("CONVRNN_PERSISTENT_RNN", 1));
  return mode;
}

// The CPU recurrence (cpu/rnn_recurrence.h): 1 on (the default), 0 off, 2 on with every step
// split over the hidden units, 3 on with the forward and the backward split over the batch's rows
// whatever the size; CONVRNN_CPU_RECURRENCE when first asked, convrnn::_cpu_recurrence.
std::atomic<int>& cpu_mode() {
  static std::atomic<int> mode(env_mode("CONVRNN_CPU_RECURRENCE", 3));
  return mode;
}

// The stacked kernel (rnn_persistent.h: PersistentStack): 1 on (the default), 0 off;
// CONVRNN_PERSISTENT_STACK when first asked, convrnn::_persistent_rnn_stack.
std::atomic<int>& stack_mode() {
  static std::atomic<int> mode(env_mode("CONVRNN_PERSISTENT_STACK", 1));
  return mode;
}

std::atomic<int64_t> persistent_launches{0}, cpu_runs{0}, stack_launches{0};
std::atomic<int64_t> persistent_launches_by_sync[3] = {{0}, {0}, {0}};

// Counts persistent kernel launches.
std::tuple<int64_t, int64_t> persistent_rnn_op(int64_t mode) {
  return switch_op("_persistent_rnn", persistent_mode(), persistent_launches, mode, 1);
}

// The persistent launches so far by how their blocks synchronised: [grid barrier, one cluster,
// one cluster exchanging through distributed shared memory] (cuda/rnn_persistent.cuh: Sync).
std::vector<int64_t> persistent_launches_op() {
  std::vector<int64_t> n;
  for (const auto& c : persistent_launches_by_sync) n.push_back(c.load());
  return n;
}

// Counts stacked launches (every layer of a stack in one kernel).
std::tuple<int64_t, int64_t> persistent_stack_op(int64_t mode) {
  return switch_op("_persistent_rnn_stack", stack_mode(), stack_launches, mode, 1);
}

// Counts the layer calls (forward or backward) the CPU recurrence ran.
std::tuple<int64_t, int64_t> cpu_recurrence_op(int64_t mode) {
  return switch_op("_cpu_recurrence", cpu_mode(), cpu_runs, mode, 3,
                   "2 (on, every step split over the hidden units) or 3 (on, forward and backward split over the "
                   "batch's rows from 2 rows a task)");
}

}  // namespace

bool persistent_rnn_enabled() {
  return persistent_mode().load(std::memory_order_relaxed) != 0;
}

void note_persistent_launch(int sync) {
  persistent_launches.fetch_add(1, std::memory_order_relaxed);
  persistent_launches_by_sync[std::clamp(sync, 0, 2)].fetch_add(1, std::memory_order_relaxed);
}

bool persistent_stack_enabled() {
  return stack_mode().load(std::memory_order_relaxed) != 0;
}

void note_persistent_stack_launch() {
  stack_launches.fetch_add(1, std::memory_order_relaxed);
}

int cpu_recurrence_mode() {
  return cpu_mode().load(std::memory_order_relaxed);
}

void note_cpu_recurrence_run() {
  cpu_runs.fetch_add(1, std::memory_order_relaxed);
}

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool given(const OptTensor& t) {
  return t.has_value() && t->defined();
}

// ---- the fused cell ops, called through the dispatcher ----

using LstmCellFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                      const OptTensor&);
using LstmCellBackwardFn = std::tuple<Tensor, Tensor>(const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                                                      const Tensor&);
using GruCellFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                             const OptTensor&);
using GruCellBackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&);
using RnnCellFn = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool);
using RnnCellBackwardFn = Tensor(const Tensor&, const Tensor&, bool);

const c10::TypedOperatorHandle<LstmCellFn>& lstm_cell_op() {
  static const auto h = typed_op<LstmCellFn>("convrnn::lstm_cell_fused");
  return h;
}
const c10::TypedOperatorHandle<LstmCellBackwardFn>& lstm_cell_backward_op() {
  static const auto h = typed_op<LstmCellBackwardFn>("convrnn::lstm_cell_fused_backward");
  return h;
}
const c10::TypedOperatorHandle<GruCellFn>& gru_cell_op() {
  static const auto h = typed_op<GruCellFn>("convrnn::gru_cell_fused");
  return h;
}
const c10::TypedOperatorHandle<GruCellBackwardFn>& gru_cell_backward_op() {
  static const auto h = typed_op<GruCellBackwardFn>("convrnn::gru_cell_fused_backward");
  return h;
}
const c10::TypedOperatorHandle<RnnCellFn>& rnn_cell_op() {
  static const auto h = typed_op<RnnCellFn>("convrnn::rnn_cell_fused");
  return h;
}
const c10::TypedOperatorHandle<RnnCellBackwardFn>& rnn_cell_backward_op() {
  static const auto h = typed_op<RnnCellBackwardFn>("convrnn::rnn_cell_fused_backward");
  return h;
}

// ---- step geometry ----

struct Seq {
  int64_t T = 0, B = 0, N = 0;
  bool packed = false, reverse = false;
  std::vector<int64_t> bs, off;  // rows and first row of step t

  // The step processed k-th.
  int64_t step(int64_t k) const {
    return reverse ? T - 1 - k : k;
  }
};

// Steps of x, a (T, B, F) sequence or, with batch_sizes, the (N, F) data of a PackedSequence.
Seq make_seq(const char* op, const char* x_name, const Tensor& x, const OptTensor& batch_sizes, bool reverse) {
  Seq s;
  s.reverse = reverse;
  s.packed = given(batch_sizes);
  if (s.packed) {
    const Tensor& b = *batch_sizes;
    TORCH_CHECK(b.dim() == 1 && b.scalar_type() == at::kLong && b.device().is_cpu(), "convrnn.", op,
                ": batch_sizes must be a 1-D int64 CPU tensor (PackedSequence.batch_sizes), but got a ", b.dim(),
                "-D ", b.scalar_type(), " tensor on ", b.device());
    TORCH_CHECK(x.dim() == 2, "convrnn.", op, ": ", x_name,
                " must be (sum(batch_sizes), features) for packed input, but got shape ", x.sizes());
    const Tensor bc = b.contiguous();
    const int64_t* p = bc.const_data_ptr<int64_t>();
    s.T = b.numel();
    s.bs.assign(p, p + s.T);
    s.off.resize(s.T);
    int64_t sum = 0;
    for (int64_t t = 0; t < s.T; ++t) {
      TORCH_CHECK(s.bs[t] >= 1 && (t == 0 || s.bs[t] <= s.bs[t - 1]), "convrnn.", op,
                  ": batch_sizes must be positive and non-increasing (sequences sorted by decreasing length), but "
                  "batch_sizes[",
                  t, "] = ", s.bs[t]);
      s.off[t] = sum;
      sum += s.bs[t];
    }
    TORCH_CHECK(sum == x.size(0), "convrnn.", op, ": ", x_name, " has ", x.size(0),
                " rows but batch_sizes sums to ", sum);
    s.N = sum;
    s.B = s.T > 0 ? s.bs[0] : 0;
  } else {
    TORCH_CHECK(x.dim() == 3, "convrnn.", op, ": ", x_name, " must be (seq_len, batch, features), but got shape ",
                x.sizes());
    s.T = x.size(0);
    s.B = x.size(1);
    s.N = s.T * s.B;
    s.bs.assign(s.T, s.B);
    s.off.resize(s.T);
    for (int64_t t = 0; t < s.T; ++t) s.off[t] = t * s.B;
  }
  return s;
}

// The rows of step t of a per-step result: `all` is either a vector of per-step tensors (the
// forward collects its results so, and concatenates them once at the end) or one (N, D)
// tensor of row blocks (what the backward gets back).
CONVRNN_INLINE Tensor block(const Seq&, const std::vector<Tensor>& all, int64_t t) {
  return all[t];
}
CONVRNN_INLINE Tensor block(const Seq& s, const Tensor& all, int64_t t) {
  return all.narrow(0, s.off[t], s.bs[t]);
}

// Rows [0, bs) of the state entering the k-th processed step: the previous processed step's
// rows of `all` (the states it produced), then rows of `init` for sequences starting here.
template <typename All>
Tensor state_before(const Seq& s, const All& all, const Tensor& init, int64_t k) {
  const int64_t n = s.bs[s.step(k)];
  if (k == 0) return n == init.size(0) ? init : init.narrow(0, 0, n);
  const int64_t tp = s.step(k - 1), np = s.bs[tp];
  const Tensor prev = block(s, all, tp);
  if (n == np) return prev;
  if (n < np) return prev.narrow(0, 0, n);
  return at::cat({prev, init.narrow(0, np, n - np)});
}

// (N, D): the state entering every step, in row-block order (for the W_hh gradient).
template <typename All>
Tensor states_before(const Seq& s, const All& all, const Tensor& init) {
  if (s.T == 0) return init.new_empty({0, init.size(1)});
  std::vector<Tensor> parts(s.T);
  for (int64_t k = 0; k < s.T; ++k) parts[s.step(k)] = state_before(s, all, init, k);
  return at::cat(parts);
}

// (B, D): every sequence's state after its last step (init where a sequence has no step).
template <typename All>
Tensor final_state(const Seq& s, const All& all, const Tensor& init) {
  if (s.T > 0 && !s.packed) return block(s, all, s.step(s.T - 1)).clone(at::MemoryFormat::Contiguous);
  Tensor out = init.clone(at::MemoryFormat::Contiguous);
  for (int64_t k = 0; k < s.T; ++k) {
    const int64_t t = s.step(k), n = s.bs[t];
    const int64_t next = k + 1 < s.T ? s.bs[s.step(k + 1)] : 0;
    if (next < n) out.narrow(0, next, n - next).copy_(block(s, all, t).narrow(0, next, n - next));
  }
  return out;
}

// The per-step results as one (N, D) tensor of row blocks.
Tensor concat_steps(const std::vector<Tensor>& parts, int64_t cols, const at::TensorOptions& opts) {
  return parts.empty() ? at::empty({0, cols}, opts) : at::cat(parts);
}

// Per-step results gathered into one (N, cols) tensor of row blocks.  On the CPU, large blocks
// are copied into place as each step produces them (still in cache; a concatenation at the end
// would read them back from memory); small blocks, and every block on a GPU (where a copy per
// step is a kernel launch per step), are kept and concatenated once at the end.  Without a backward to come
// (need_backward false), saved tensors are not gathered at all (kState: the blocks are kept
// only as the recurrence's state; kDrop: not kept).
class StepRows {
 public:
  enum Mode { kGather, kState, kDrop };
  static constexpr int64_t kEagerElements = 4096;

  StepRows(const Seq& s, int64_t cols, const at::TensorOptions& opts, Mode mode = kGather)
      : s_(&s), cols_(cols), opts_(opts), mode_(mode),
        eager_(mode == kGather && opts.device().is_cpu() && s.B * cols >= kEagerElements),
        parts_(mode == kDrop ? 0 : s.T) {
    if (eager_) buf_ = at::empty({s.N, cols}, opts);
  }

  void put(int64_t t, Tensor v) {
    if (mode_ == kDrop) return;
    if (eager_) {
      buf_.narrow(0, s_->off[t], s_->bs[t]).copy_(v);
      if (last_ >= 0) parts_[last_].reset();  // only the newest block is read again (the next step's state)
      last_ = t;
    }
    parts_[t] = std::move(v);
  }

  Tensor block(int64_t t) const {
    return parts_[t].defined() ? parts_[t] : buf_.narrow(0, s_->off[t], s_->bs[t]);
  }

  // The (N, cols) tensor, or an empty (0, 0) one where nothing was gathered.
  Tensor finish() const {
    if (mode_ != kGather) return at::empty({0, 0}, opts_);
    return eager_ ? buf_ : concat_steps(parts_, cols_, opts_);
  }

 private:
  const Seq* s_;
  int64_t cols_;
  at::TensorOptions opts_;
  Mode mode_;
  bool eager_;
  std::vector<Tensor> parts_;
  Tensor buf_;
  int64_t last_ = -1;
};

CONVRNN_INLINE Tensor block(const Seq&, const StepRows& all, int64_t t) {
  return all.block(t);
}

// a b: float on the CPU through cpu_gemm (split over the threads), else at::mm.
Tensor product(const Tensor& a, const Tensor& b) {
  if (a.is_cpu() && a.scalar_type() == at::kFloat && cpu_gemm::enabled()) {
    Tensor out = reused_empty({a.size(0), b.size(1)}, a.options());
    if (cpu_gemm::mm(a, b, out, false)) return out;
  }
  return at::mm(a, b);
}

// grad W_hh = sum over steps of g_t^T h_prev_t: the gate gradients of all steps (N, G*H)
// against the states entering them (N, P), one matrix product.  Unpacked, those states are
// the output shifted by one step plus h0, so the product needs no copy of them: h0's step,
// then the steps entered from the output added to it.
Tensor grad_w_hh(const Seq& s, const Tensor& g_all, const Tensor& out, const Tensor& h_init) {
  if (s.packed || s.T < 2) return product(g_all.t(), states_before(s, out, h_init));
  const int64_t rest = s.N - s.B;
  const Tensor g_first = g_all.narrow(0, s.reverse ? rest : 0, s.B);
  const Tensor g_rest = g_all.narrow(0, s.reverse ? 0 : s.B, rest);
  const Tensor h_rest = out.narrow(0, s.reverse ? s.B : 0, rest);
  Tensor gw = product(g_first.t(), h_init);
  if (!cpu_gemm::mm(g_rest.t(), h_rest, gw, true)) gw.addmm_(g_rest.t(), h_rest);
  return gw;
}

// (N, F) as the (T, B, F) shape of an unpacked sequence.
Tensor as_sequence(const Seq& s, const Tensor& rows) {
  return s.packed ? rows : rows.view({s.T, s.B, rows.size(1)});
}

// Whether to offer a layer to this device's whole-layer recurrence (steps to run): on CUDA the
// persistent kernels when their switch is on, on the CPU the CPU recurrence when its switch is on
// and it serves the dtype.
bool offer_layer(const Tensor& t, const Seq& s) {
  if (s.T == 0 || s.N == 0) return false;
  if (t.is_cuda()) return persistent_rnn_enabled();
  return t.is_cpu() && cpu_recurrence_mode() != 0 && cpu_recurrence_serves(t.scalar_type());
}

// The whole-layer forward of this device (persistent_forward's arguments); false where it declines.
bool layer_forward(const PersistentLayer& l, const Tensor& x, Tensor& out, Tensor& cs, Tensor& ws) {
  return x.is_cuda() ? persistent_forward(l, x, out, cs, ws) : cpu_recurrence_forward(l, x, out, cs, ws);
}

// The whole-layer backward of this device (persistent_backward's arguments), and the bias
// gradients: grad_b_ih the sum over all rows of the input-side gate gradients (g_input for the
// GRU, else g_hidden: the LSTM's and the RNN's serve both biases), grad_b_hh the GRU's of g_hidden
// (undefined for the others).  The CPU recurrence sums them as it goes; on CUDA they are summed
// after.  False where it declines.
bool layer_backward(const PersistentLayer& l, const Tensor& grad_out, const Tensor& out, const Tensor& cs,
                    const Tensor& ws, Tensor& dh, Tensor& dc, Tensor& g_hidden, Tensor& g_input, Tensor& grad_b_ih,
                    Tensor& grad_b_hh) {
  const bool gru = l.cell == RnnCell::kGru;
  if (out.is_cuda()) {
    if (!persistent_backward(l, grad_out, out, cs, ws, dh, dc, g_hidden, g_input)) return false;
    grad_b_ih = (gru ? g_input : g_hidden).sum(0);
    if (gru) grad_b_hh = g_hidden.sum(0);
    return true;
  }
  grad_b_ih = at::empty({g_hidden.size(1)}, out.options());
  if (gru) grad_b_hh = at::empty({g_hidden.size(1)}, out.options());
  return cpu_recurrence_backward(l, grad_out, out, cs, ws, dh, dc, g_hidden, g_input, grad_b_ih, grad_b_hh);
}

PersistentLayer persistent_layer(RnnCell cell, const Seq& s, int64_t H, const Tensor& w_hh, const OptTensor& b_ih,
                                 const OptTensor& b_hh, const Tensor& h0, const Tensor& c0) {
  PersistentLayer l;
  l.cell = cell;
  l.T = s.T;
  l.B = s.B;
  l.N = s.N;
  l.H = H;
  l.reverse = s.reverse;
  l.bs = s.packed ? &s.bs : nullptr;
  l.off = s.packed ? &s.off : nullptr;
  // contiguous once here, as rnn_persistent.h promises, for both recurrences (the ops pass
  // their states already contiguous: h_init, c_init)
  l.w_hh = w_hh.contiguous();
  if (given(b_ih)) l.b_ih = b_ih->contiguous();
  if (given(b_hh)) l.b_hh = b_hh->contiguous();
  l.h0 = h0;
  l.c0 = c0;
  return l;
}

// ---- argument checks ----

// b_ih and b_hh: given together, each of GH elements, x's device and dtype (suffix: "[l]" names
// a stack's layer l).
void check_biases(const char* op, const OptTensor& b_ih, const OptTensor& b_hh, int64_t GH, const Tensor& x,
                  const std::string& suffix = "") {
  const std::string ih = "b_ih" + suffix, hh = "b_hh" + suffix;
  TORCH_CHECK(given(b_ih) == given(b_hh), "convrnn.", op, ": ", ih, " and ", hh, " must be given together");
  for (const auto& [name, b] : {std::pair<const std::string*, const OptTensor*>{&ih, &b_ih}, {&hh, &b_hh}}) {
    if (given(*b)) {
      check_same(op, name->c_str(), **b, "x_proj", x);
      check_shape(op, name->c_str(), **b, {GH});
    }
  }
}

struct Dims {
  int64_t H, P;  // hidden size, size of h (proj_size with a projection, else H)
};

Dims check_layer(const char* op, int64_t G, const Tensor& x, const Tensor& h0, const Tensor* c0, const Tensor& w_hh,
                 const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, Seq& s) {
  check_same(op, "w_hh", w_hh, "x_proj", x);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % G == 0 && w_hh.size(0) > 0, "convrnn.", op, ": w_hh must be a (", G,
              " * hidden_size, hidden_size) matrix, but got shape ", w_hh.sizes());
  const int64_t H = w_hh.size(0) / G;
  int64_t P = H;
  if (given(w_hr)) {
    check_same(op, "w_hr", *w_hr, "x_proj", x);
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == H && w_hr->size(0) > 0, "convrnn.", op,
                ": w_hr must be a (proj_size, hidden_size = ", H, ") matrix, but got shape ", w_hr->sizes());
    P = w_hr->size(0);
  }
  TORCH_CHECK(w_hh.size(1) == P, "convrnn.", op, ": w_hh must have ", P,
              given(w_hr) ? " columns (proj_size, the rows of w_hr)" : " columns (hidden_size)", ", but got shape ",
              w_hh.sizes());
  TORCH_CHECK(x.size(-1) == G * H, "convrnn.", op, ": x_proj must have ", G, " * hidden_size = ", G * H,
              " columns (the input projection of the gates of w_hh), but got shape ", x.sizes());
  check_biases(op, b_ih, b_hh, G * H, x);
  if (s.packed && s.T == 0) s.B = h0.size(0);
  check_same(op, "h0", h0, "x_proj", x);
  check_shape(op, "h0", h0, {s.B, P});
  if (c0 != nullptr) {
    check_same(op, "c0", *c0, "x_proj", x);
    check_shape(op, "c0", *c0, {s.B, H});
  }
  return {H, P};
}

// Backward checks: the saved tensors and incoming gradients have the forward's shapes.
Dims check_layer_backward(const char* op, int64_t G, const Tensor& output, const Tensor& h0, const Tensor& w_hh,
                          const OptTensor& w_hr, Seq& s, std::initializer_list<std::pair<const char*, const OptTensor*>> grads) {
  check_floating(op, "output", output);
  check_same(op, "w_hh", w_hh, "output", output);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % G == 0 && w_hh.size(0) > 0, "convrnn.", op, ": w_hh must be a (", G,
              " * hidden_size, hidden_size) matrix, but got shape ", w_hh.sizes());
  const int64_t H = w_hh.size(0) / G, P = w_hh.size(1);
  if (given(w_hr)) {
    check_same(op, "w_hr", *w_hr, "output", output);
    check_shape(op, "w_hr", *w_hr, {P, H});
  } else {
    TORCH_CHECK(P == H, "convrnn.", op, ": w_hh must be (", G * H, ", ", H, "), but got shape ", w_hh.sizes());
  }
  TORCH_CHECK(output.size(-1) == P, "convrnn.", op, ": output must have ", P, " features, but got shape ",
              output.sizes());
  if (s.packed && s.T == 0) s.B = h0.size(0);
  check_same(op, "h0", h0, "output", output);
  check_shape(op, "h0", h0, {s.B, P});
  for (const auto& [name, g] : grads) {
    if (given(*g)) {
      check_same(op, name, **g, "output", output);
      check_shape(op, name, **g, std::string(name) == "grad_output" ? output.sizes() : h0.sizes());
    }
  }
  return {H, P};
}

void check_rows(const char* op, const char* name, const Tensor& t, const Tensor& ref, int64_t N, int64_t cols) {
  check_same(op, name, t, "output", ref);
  check_shape(op, name, t, {N, cols});
}

// A (rows, cols) buffer holding the incoming gradient of a final state, or zeros.
Tensor grad_buffer(const OptTensor& g, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  Tensor b = at::empty({rows, cols}, opts);
  if (given(g)) {
    b.copy_(*g);
  } else {
    b.zero_();
  }
  return b;
}

// The incoming gradient of the whole output as (N, P), or undefined.
Tensor grad_rows(const OptTensor& g, const Seq& s, int64_t P) {
  return given(g) ? g->contiguous().view({s.N, P}) : Tensor();
}

// dh of step rows [0, n): the carried gradient plus the output's own.
Tensor step_grad(const Tensor& dh, const Tensor& gout, int64_t o, int64_t n) {
  const Tensor carried = n == dh.size(0) ? dh : dh.narrow(0, 0, n);
  return gout.defined() ? carried + gout.narrow(0, o, n) : carried;
}

// Stores a gradient of the state entering a step in the carried (B, D) buffer: it becomes the
// buffer when every row was active, else it overwrites the first rows.
void set_rows(Tensor& buf, Tensor value) {
  if (value.size(0) == buf.size(0)) {
    buf = std::move(value);
  } else {
    buf.narrow(0, 0, value.size(0)).copy_(value);
  }
}

// ---- LSTM ----

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer(const Tensor& x_proj, const Tensor& h0,
                                                                      const Tensor& c0, const Tensor& w_hh,
                                                                      const OptTensor& b_ih, const OptTensor& b_hh,
                                                                      const OptTensor& w_hr,
                                                                      const OptTensor& batch_sizes, bool reverse,
                                                                      bool need_backward) {
  const char* op = "lstm_layer";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the inner ops record no graph
  check_floating(op, "x_proj", x_proj);
  Seq s = make_seq(op, "x_proj", x_proj, batch_sizes, reverse);
  const Dims d = check_layer(op, 4, x_proj, h0, &c0, w_hh, b_ih, b_hh, w_hr, s);
  const bool proj = given(w_hr);
  const auto opts = x_proj.options();
  const Tensor x = x_proj.contiguous().view({s.N, 4 * d.H});
  const Tensor h_init = h0.contiguous(), c_init = c0.contiguous();
  if (!proj && offer_layer(x, s)) {
    Tensor out = reused_empty({s.N, d.H}, opts), cs = reused_empty({s.N, d.H}, opts);
    Tensor ws = need_backward ? reused_empty({s.N, 4 * d.H}, opts) : Tensor();
    const PersistentLayer l = persistent_layer(RnnCell::kLstm, s, d.H, w_hh, b_ih, b_hh, h_init, c_init);
    if (layer_forward(l, x, out, cs, ws)) {
      const Tensor none = at::empty({0, 0}, opts);
      Tensor h_n = final_state(s, out, h_init), c_n = final_state(s, cs, c_init);
      return {as_sequence(s, out), h_n, c_n, need_backward ? cs : none, need_backward ? ws : none, none};
    }
  }
  const Tensor w_hh_t = w_hh.t().contiguous();  // (P, G*H) rows: BLAS runs h W_hh^T faster so for small batches
  const Tensor w_hr_t = proj ? w_hr->t().contiguous() : Tensor();
  const auto saved = need_backward ? StepRows::kGather : StepRows::kDrop;
  StepRows hs(s, d.P, opts), ws(s, 4 * d.H, opts, saved), hps(s, proj ? d.H : 0, opts, saved);
  StepRows cs(s, d.H, opts, need_backward ? StepRows::kGather : StepRows::kState);
  const auto& cell = lstm_cell_op();
  for (int64_t k = 0; k < s.T; ++k) {
    const int64_t t = s.step(k);
    const Tensor gh = at::mm(state_before(s, hs, h_init, k), w_hh_t);
    auto [hy, cy, w] = cell.call(block(s, x, t), gh, state_before(s, cs, c_init, k), b_ih, b_hh);
    if (proj) {
      hs.put(t, at::mm(hy, w_hr_t));
      hps.put(t, std::move(hy));
    } else {
      hs.put(t, std::move(hy));
    }
    cs.put(t, std::move(cy));
    ws.put(t, std::move(w));
  }
  Tensor h_n = final_state(s, hs, h_init), c_n = final_state(s, cs, c_init);
  Tensor hp = proj ? hps.finish() : at::empty({0, 0}, opts);
  return {as_sequence(s, hs.finish()), h_n, c_n, cs.finish(), ws.finish(), hp};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward(
    const OptTensor& grad_output, const OptTensor& grad_hn, const OptTensor& grad_cn, const Tensor& h0,
    const Tensor& c0, const Tensor& w_hh, const OptTensor& w_hr, const Tensor& output, const Tensor& cs,
    const Tensor& workspace, const Tensor& hp, const OptTensor& batch_sizes, bool reverse) {
  const char* op = "lstm_layer_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Seq s = make_seq(op, "output", output, batch_sizes, reverse);
  const Dims d = check_layer_backward(op, 4, output, h0, w_hh, w_hr, s,
                                      {{"grad_output", &grad_output}, {"grad_hn", &grad_hn}});
  const bool proj = given(w_hr);
  check_rows(op, "cs", cs, output, s.N, d.H);
  check_rows(op, "workspace", workspace, output, s.N, 4 * d.H);
  if (proj) check_rows(op, "hp", hp, output, s.N, d.H);
  check_same(op, "c0", c0, "output", output);
  check_shape(op, "c0", c0, {s.B, d.H});
  if (given(grad_cn)) {
    check_same(op, "grad_cn", *grad_cn, "output", output);
    check_shape(op, "grad_cn", *grad_cn, {s.B, d.H});
  }
  const auto opts = output.options();
  const Tensor out = output.contiguous().view({s.N, d.P}), c_all = cs.contiguous(), ws = workspace.contiguous();
  const Tensor h_init = h0.contiguous(), c_init = c0.contiguous();
  const Tensor gout = grad_rows(grad_output, s, d.P);
  Tensor dh = grad_buffer(grad_hn, s.B, d.P, opts), dc = grad_buffer(grad_cn, s.B, d.H, opts);
  if (!proj && offer_layer(out, s)) {
    Tensor gg = reused_empty({s.N, 4 * d.H}, opts), none, grad_bias, unused;
    const PersistentLayer l = persistent_layer(RnnCell::kLstm, s, d.H, w_hh, std::nullopt, std::nullopt, h_init, c_init);
    if (layer_backward(l, gout, out, c_all, ws, dh, dc, gg, none, grad_bias, unused)) {
      return {as_sequence(s, gg), dh, dc, grad_w_hh(s, gg, out, h_init), grad_bias, at::empty({0}, opts)};
    }
  }
  StepRows ggs(s, 4 * d.H, opts), dhs(s, proj ? d.P : 0, opts);
  const auto& cell_backward = lstm_cell_backward_op();
  for (int64_t k = s.T - 1; k >= 0; --k) {
    const int64_t t = s.step(k), n = s.bs[t];
    Tensor dh_t = step_grad(dh, gout, s.off[t], n);
    Tensor ghy = dh_t;
    if (proj) {
      ghy = at::mm(dh_t, *w_hr);
      dhs.put(t, dh_t.clone());  // dh_t may be a view of the buffer overwritten below
    }
    auto [gg, gcx] = cell_backward.call(ghy, n == s.B ? dc : dc.narrow(0, 0, n), state_before(s, c_all, c_init, k),
                                        block(s, c_all, t), block(s, ws, t));
    set_rows(dh, at::mm(gg, w_hh));
    set_rows(dc, std::move(gcx));
    ggs.put(t, std::move(gg));
  }
  const Tensor gg_all = ggs.finish();
  Tensor grad_w_hr = proj ? at::mm(dhs.finish().t(), hp.contiguous()) : at::empty({0}, opts);
  return {as_sequence(s, gg_all), dh, dc, grad_w_hh(s, gg_all, out, h_init), gg_all.sum(0), grad_w_hr};
}

// ---- GRU ----

std::tuple<Tensor, Tensor, Tensor> gru_layer(const Tensor& x_proj, const Tensor& h0, const Tensor& w_hh,
                                             const OptTensor& b_ih, const OptTensor& b_hh,
                                             const OptTensor& batch_sizes, bool reverse, bool need_backward) {
  const char* op = "gru_layer";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_floating(op, "x_proj", x_proj);
  Seq s = make_seq(op, "x_proj", x_proj, batch_sizes, reverse);
  const Dims d = check_layer(op, 3, x_proj, h0, nullptr, w_hh, b_ih, b_hh, std::nullopt, s);
  const auto opts = x_proj.options();
  const Tensor x = x_proj.contiguous().view({s.N, 3 * d.H});
  const Tensor h_init = h0.contiguous();
  if (offer_layer(x, s)) {
    Tensor out = reused_empty({s.N, d.H}, opts), none;
    Tensor ws = need_backward ? reused_empty({s.N, 4 * d.H}, opts) : Tensor();
    const PersistentLayer l = persistent_layer(RnnCell::kGru, s, d.H, w_hh, b_ih, b_hh, h_init, Tensor());
    if (layer_forward(l, x, out, none, ws)) {
      Tensor h_n = final_state(s, out, h_init);
      return {as_sequence(s, out), h_n, need_backward ? ws : at::empty({0, 0}, opts)};
    }
  }
  const Tensor w_hh_t = w_hh.t().contiguous();
  StepRows hs(s, d.H, opts), ws(s, 4 * d.H, opts, need_backward ? StepRows::kGather : StepRows::kDrop);
  const auto& cell = gru_cell_op();
  for (int64_t k = 0; k < s.T; ++k) {
    const int64_t t = s.step(k);
    const Tensor h = state_before(s, hs, h_init, k);
    auto [hy, w] = cell.call(block(s, x, t), at::mm(h, w_hh_t), h, b_ih, b_hh);
    hs.put(t, std::move(hy));
    ws.put(t, std::move(w));
  }
  Tensor h_n = final_state(s, hs, h_init);
  return {as_sequence(s, hs.finish()), h_n, ws.finish()};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward(const OptTensor& grad_output,
                                                                      const OptTensor& grad_hn, const Tensor& h0,
                                                                      const Tensor& w_hh, const Tensor& output,
                                                                      const Tensor& workspace,
                                                                      const OptTensor& batch_sizes, bool reverse) {
  const char* op = "gru_layer_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Seq s = make_seq(op, "output", output, batch_sizes, reverse);
  const Dims d = check_layer_backward(op, 3, output, h0, w_hh, std::nullopt, s,
                                      {{"grad_output", &grad_output}, {"grad_hn", &grad_hn}});
  check_rows(op, "workspace", workspace, output, s.N, 4 * d.H);
  const auto opts = output.options();
  const Tensor out = output.contiguous().view({s.N, d.H}), ws = workspace.contiguous(), h_init = h0.contiguous();
  const Tensor gout = grad_rows(grad_output, s, d.H);
  Tensor dh = grad_buffer(grad_hn, s.B, d.H, opts);
  if (offer_layer(out, s)) {
    Tensor gx = reused_empty({s.N, 3 * d.H}, opts), gh = reused_empty({s.N, 3 * d.H}, opts), none, gb_ih, gb_hh;
    const PersistentLayer l = persistent_layer(RnnCell::kGru, s, d.H, w_hh, std::nullopt, std::nullopt, h_init, Tensor());
    if (layer_backward(l, gout, out, none, ws, dh, none, gh, gx, gb_ih, gb_hh)) {
      return {as_sequence(s, gx), dh, grad_w_hh(s, gh, out, h_init), gb_ih, gb_hh};
    }
  }
  StepRows gxs(s, 3 * d.H, opts), ghs(s, 3 * d.H, opts);
  const auto& cell_backward = gru_cell_backward_op();
  for (int64_t k = s.T - 1; k >= 0; --k) {
    const int64_t t = s.step(k);
    auto [gx, gh, ghx] =
        cell_backward.call(step_grad(dh, gout, s.off[t], s.bs[t]), state_before(s, out, h_init, k), block(s, ws, t));
    set_rows(dh, at::addmm(ghx, gh, w_hh));
    gxs.put(t, std::move(gx));
    ghs.put(t, std::move(gh));
  }
  const Tensor gx_all = gxs.finish(), gh_all = ghs.finish();
  return {as_sequence(s, gx_all), dh, grad_w_hh(s, gh_all, out, h_init), gx_all.sum(0), gh_all.sum(0)};
}

// ---- vanilla RNN (tanh or relu) ----

std::tuple<Tensor, Tensor> rnn_layer(const Tensor& x_proj, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_ih,
                                     const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse, bool relu) {
  const char* op = "rnn_layer";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_floating(op, "x_proj", x_proj);
  Seq s = make_seq(op, "x_proj", x_proj, batch_sizes, reverse);
  const Dims d = check_layer(op, 1, x_proj, h0, nullptr, w_hh, b_ih, b_hh, std::nullopt, s);
  const auto opts = x_proj.options();
  const Tensor x = x_proj.contiguous().view({s.N, d.H});
  const Tensor h_init = h0.contiguous();
  if (offer_layer(x, s)) {
    Tensor out = reused_empty({s.N, d.H}, opts), none;
    const PersistentLayer l =
        persistent_layer(relu ? RnnCell::kRelu : RnnCell::kTanh, s, d.H, w_hh, b_ih, b_hh, h_init, Tensor());
    if (layer_forward(l, x, out, none, none)) {
      Tensor h_n = final_state(s, out, h_init);
      return {as_sequence(s, out), h_n};
    }
  }
  const Tensor w_hh_t = w_hh.t().contiguous();
  StepRows hs(s, d.H, opts);
  const auto& cell = rnn_cell_op();
  for (int64_t k = 0; k < s.T; ++k) {
    const int64_t t = s.step(k);
    const Tensor gh = at::mm(state_before(s, hs, h_init, k), w_hh_t);
    hs.put(t, cell.call(block(s, x, t), gh, b_ih, b_hh, relu));
  }
  Tensor h_n = final_state(s, hs, h_init);
  return {as_sequence(s, hs.finish()), h_n};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_layer_backward(const OptTensor& grad_output, const OptTensor& grad_hn,
                                                              const Tensor& h0, const Tensor& w_hh,
                                                              const Tensor& output, const OptTensor& batch_sizes,
                                                              bool reverse, bool relu) {
  const char* op = "rnn_layer_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Seq s = make_seq(op, "output", output, batch_sizes, reverse);
  const Dims d = check_layer_backward(op, 1, output, h0, w_hh, std::nullopt, s,
                                      {{"grad_output", &grad_output}, {"grad_hn", &grad_hn}});
  const auto opts = output.options();
  const Tensor out = output.contiguous().view({s.N, d.H}), h_init = h0.contiguous();
  const Tensor gout = grad_rows(grad_output, s, d.H);
  Tensor dh = grad_buffer(grad_hn, s.B, d.H, opts);
  if (offer_layer(out, s)) {
    Tensor gp = reused_empty({s.N, d.H}, opts), none, grad_bias, unused;
    const PersistentLayer l = persistent_layer(relu ? RnnCell::kRelu : RnnCell::kTanh, s, d.H, w_hh, std::nullopt,
                                               std::nullopt, h_init, Tensor());
    if (layer_backward(l, gout, out, none, none, dh, none, gp, none, grad_bias, unused)) {
      return {as_sequence(s, gp), dh, grad_w_hh(s, gp, out, h_init), grad_bias};
    }
  }
  StepRows gps(s, d.H, opts);
  const auto& cell_backward = rnn_cell_backward_op();
  for (int64_t k = s.T - 1; k >= 0; --k) {
    const int64_t t = s.step(k);
    Tensor gpre = cell_backward.call(step_grad(dh, gout, s.off[t], s.bs[t]), block(s, out, t), relu);
    set_rows(dh, at::mm(gpre, w_hh));
    gps.put(t, std::move(gpre));
  }
  const Tensor gp_all = gps.finish();
  return {as_sequence(s, gp_all), dh, grad_w_hh(s, gp_all, out, h_init), gp_all.sum(0)};
}

// ---- a unidirectional stack, inference ----

// ---- the input projection ----

void check_projection(const Tensor& input, const Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "convrnn.input_projection: weight must be 2-D (gates * hidden_size, input_size), "
              "but got shape ", weight.sizes());
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == weight.size(1), "convrnn.input_projection: input has ",
              input.dim() >= 1 ? input.size(-1) : 0, " features but weight expects input_size = ", weight.size(1));
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "convrnn.input_projection: weight has dtype ",
              weight.scalar_type(), " but input has dtype ", input.scalar_type(), "; expected one dtype");
  TORCH_CHECK(input.device() == weight.device(), "convrnn.input_projection: weight is on ", weight.device(),
              " but input is on ", input.device(), "; expected both on one device");
}

// input (..., I) as (rows, I) (no -1: I may be 0).
Tensor as_rows(const Tensor& input) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < input.dim(); ++d) rows *= input.size(d);
  return input.reshape({rows, input.size(-1)});
}

// Every step's input projection, input (..., I) times weight^T ((G, I): w_ih): F.linear without a
// bias, one product over all rows.
Tensor input_projection(const Tensor& input, const Tensor& weight) {
  check_projection(input, weight);
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = weight.size(0);
  return product(as_rows(input), weight.t()).view(shape);
}

// grad_input = grad weight, grad_weight = grad^T input (each only where output_mask asks; else an
// empty tensor).
std::tuple<Tensor, Tensor> input_projection_backward(const Tensor& grad, const Tensor& input, const Tensor& weight,
                                                     std::array<bool, 2> output_mask) {
  check_projection(input, weight);
  const Tensor g = as_rows(grad);
  const Tensor gi = output_mask[0] ? product(g, weight).view(input.sizes()) : at::empty({0}, input.options());
  const Tensor gw = output_mask[1] ? product(g.t(), as_rows(input)) : at::empty({0}, weight.options());
  return {gi, gw};
}

// Every layer of a unidirectional stack without projections, with no backward to follow:
// layer 0's input projection x_proj (T, B, G*H); hx (L, B, H); cx (L, B, H) for the LSTM (cell
// 0); w_ih of layers 1..L-1; w_hh, b_ih, b_hh of every layer.  On CUDA the stacked persistent
// kernel runs all layers at once where it serves the case (rnn_persistent.h: PersistentStack);
// elsewhere, and where it declines, each layer's op runs in turn after its input projection
// (one matrix product).  Returns the last layer's output (T, B, H), h_n (L, B, H) and c_n
// (L, B, H; an empty tensor for the others).
std::tuple<Tensor, Tensor, Tensor> rnn_stack(const Tensor& x_proj, const Tensor& hx, const OptTensor& cx,
                                             at::TensorList w_ih, at::TensorList w_hh,
                                             const c10::List<std::optional<Tensor>>& b_ih,
                                             const c10::List<std::optional<Tensor>>& b_hh, int64_t cell) {
  const char* op = "rnn_stack";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(cell >= 0 && cell <= 3, "convrnn.rnn_stack: cell must be 0 (LSTM), 1 (GRU), 2 (RNN tanh) or 3 (RNN "
              "relu), but got ", cell);
  const int64_t G = cell == 0 ? 4 : (cell == 1 ? 3 : 1), L = static_cast<int64_t>(w_hh.size());
  TORCH_CHECK(L >= 1, "convrnn.rnn_stack: w_hh must hold one matrix a layer (num_layers >= 1), but got none");
  TORCH_CHECK(int64_t(w_ih.size()) == L - 1, "convrnn.rnn_stack: w_ih must hold the input weights of layers 1..",
              L - 1, " (", L - 1, " matrices: layer 0's projection is x_proj), but got ", w_ih.size());
  TORCH_CHECK(int64_t(b_ih.size()) == L && int64_t(b_hh.size()) == L, "convrnn.rnn_stack: b_ih and b_hh must hold ",
              "one entry a layer (", L, "; a bias or None), but got ", b_ih.size(), " and ", b_hh.size());
  check_floating(op, "x_proj", x_proj);
  TORCH_CHECK(x_proj.dim() == 3, "convrnn.rnn_stack: x_proj must be (T, B, ", G, " * hidden_size), but got shape ",
              x_proj.sizes());
  TORCH_CHECK(w_hh[0].dim() == 2 && w_hh[0].size(1) > 0, "convrnn.rnn_stack: w_hh[0] must be a (", G,
              " * hidden_size, hidden_size) matrix, but got shape ", w_hh[0].sizes());
  const int64_t T = x_proj.size(0), B = x_proj.size(1), H = w_hh[0].size(1);
  TORCH_CHECK(x_proj.size(2) == G * H, "convrnn.rnn_stack: x_proj must have ", G, " * hidden_size = ", G * H,
              " columns, but got shape ", x_proj.sizes());
  for (int64_t l = 0; l < L; ++l) {
    const std::string n = "[" + std::to_string(l) + "]", whh = "w_hh" + n;
    check_same(op, whh.c_str(), w_hh[l], "x_proj", x_proj);
    check_shape(op, whh.c_str(), w_hh[l], {G * H, H});
    if (l > 0) {
      const std::string name = "w_ih[" + std::to_string(l - 1) + "]";
      check_same(op, name.c_str(), w_ih[l - 1], "x_proj", x_proj);
      check_shape(op, name.c_str(), w_ih[l - 1], {G * H, H});
    }
    check_biases(op, b_ih.get(l), b_hh.get(l), G * H, x_proj, n);
  }
  check_same(op, "hx", hx, "x_proj", x_proj);
  check_shape(op, "hx", hx, {L, B, H});
  TORCH_CHECK(given(cx) == (cell == 0), "convrnn.rnn_stack: cx must be given for the LSTM (cell 0) and only for it");
  if (given(cx)) {
    check_same(op, "cx", *cx, "x_proj", x_proj);
    check_shape(op, "cx", *cx, {L, B, H});
  }
  const auto opts = x_proj.options();
  const Tensor h_init = hx.contiguous(), c_init = given(cx) ? cx->contiguous() : Tensor();
  auto bias = [](const OptTensor& b) { return given(b) ? OptTensor(b->contiguous()) : OptTensor(); };
  if (x_proj.is_cuda() && L >= 2 && persistent_rnn_enabled() && persistent_stack_enabled()) {
    PersistentStack st;
    st.cell = static_cast<RnnCell>(cell);
    st.T = T;
    st.B = B;
    st.H = H;
    for (int64_t l = 0; l < L; ++l) {
      if (l > 0) st.w_ih.push_back(w_ih[l - 1].contiguous());
      st.w_hh.push_back(w_hh[l].contiguous());
      st.b_ih.push_back(bias(b_ih.get(l)));
      st.b_hh.push_back(bias(b_hh.get(l)));
    }
    st.h0 = h_init;
    st.c0 = c_init;
    Tensor out = at::empty({T * B, H}, opts), hn = at::empty({L, B, H}, opts);
    Tensor cn = cell == 0 ? at::empty({L, B, H}, opts) : Tensor();
    if (persistent_stack_forward(st, x_proj.contiguous().view({T * B, G * H}), out, hn, cn)) {
      return {out.view({T, B, H}), hn, cell == 0 ? cn : at::empty({0}, opts)};
    }
  }
  Tensor input = x_proj;
  std::vector<Tensor> hs, cs;
  for (int64_t l = 0; l < L; ++l) {
    const Tensor xp = l == 0 ? x_proj : at::linear(input, w_ih[l - 1]);
    const OptTensor bi = b_ih.get(l), bh = b_hh.get(l);
    if (cell == 0) {
      auto res = lstm_layer(xp, h_init[l], c_init[l], w_hh[l], bi, bh, std::nullopt, std::nullopt, false, false);
      input = std::get<0>(res);
      hs.push_back(std::get<1>(res));
      cs.push_back(std::get<2>(res));
    } else if (cell == 1) {
      auto res = gru_layer(xp, h_init[l], w_hh[l], bi, bh, std::nullopt, false, false);
      input = std::get<0>(res);
      hs.push_back(std::get<1>(res));
    } else {
      auto res = rnn_layer(xp, h_init[l], w_hh[l], bi, bh, std::nullopt, false, cell == 3);
      input = std::get<0>(res);
      hs.push_back(std::get<1>(res));
    }
  }
  return {input, at::stack(hs), cell == 0 ? at::stack(cs) : at::empty({0}, opts)};
}

}  // namespace
}  // namespace convrnn

TORCH_LIBRARY_FRAGMENT(convrnn, m) {
  // cs: every step's c; workspace: the fused cell's (activated gates); hp: the unprojected h
  // of every step with w_hr (proj_size), else empty.  need_backward false: no backward will
  // follow, so cs, workspace and hp are not gathered (returned as empty (0, 0) tensors).
  m.def("lstm_layer(Tensor x_proj, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, "
        "Tensor? batch_sizes, bool reverse, bool need_backward=True) "
        "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor cs, Tensor workspace, Tensor hp)");
  // grad_bias is the gradient of b_ih and of b_hh alike; grad_w_hr is empty without w_hr.
  m.def("lstm_layer_backward(Tensor? grad_output, Tensor? grad_hn, Tensor? grad_cn, Tensor h0, Tensor c0, "
        "Tensor w_hh, Tensor? w_hr, Tensor output, Tensor cs, Tensor workspace, Tensor hp, Tensor? batch_sizes, "
        "bool reverse) -> (Tensor grad_x_proj, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_hh, Tensor grad_bias, "
        "Tensor grad_w_hr)");
  m.def("gru_layer(Tensor x_proj, Tensor h0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? batch_sizes, "
        "bool reverse, bool need_backward=True) -> (Tensor output, Tensor h_n, Tensor workspace)");
  m.def("gru_layer_backward(Tensor? grad_output, Tensor? grad_hn, Tensor h0, Tensor w_hh, Tensor output, "
        "Tensor workspace, Tensor? batch_sizes, bool reverse) "
        "-> (Tensor grad_x_proj, Tensor grad_h0, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");
  m.def("rnn_layer(Tensor x_proj, Tensor h0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? batch_sizes, "
        "bool reverse, bool relu) -> (Tensor output, Tensor h_n)");
  m.def("rnn_layer_backward(Tensor? grad_output, Tensor? grad_hn, Tensor h0, Tensor w_hh, Tensor output, "
        "Tensor? batch_sizes, bool reverse, bool relu) "
        "-> (Tensor grad_x_proj, Tensor grad_h0, Tensor grad_w_hh, Tensor grad_bias)");
  // The opt-in persistent CUDA recurrence (rnn_persistent.h): mode -1 asks, 0 turns it off, 1 on;
  // returns the mode before the call and the number of persistent kernel launches so far.
  m.def("_persistent_rnn(int mode=-1) -> (int, int)", &convrnn::persistent_rnn_op);
  // Its launches so far by step barrier: [grid, cluster, cluster + distributed shared memory].
  m.def("_persistent_rnn_launches() -> int[]", &convrnn::persistent_launches_op);
  // Every layer of a unidirectional stack without projections, for inference (no autograd:
  // the Python side calls it only where no gradient is needed); cell 0 LSTM, 1 GRU, 2 RNN tanh,
  // 3 RNN relu; w_ih holds layers 1..L-1 (layer 0's projection is x_proj); c_n is empty but for
  // the LSTM.
  m.def("rnn_stack(Tensor x_proj, Tensor hx, Tensor? cx, Tensor[] w_ih, Tensor[] w_hh, Tensor?[] b_ih, "
        "Tensor?[] b_hh, int cell) -> (Tensor output, Tensor h_n, Tensor c_n)");
  // The stacked persistent kernel's switch (rnn_persistent.h): mode -1 asks, 0 off, 1 on; returns
  // the mode before the call and its launches so far.
  m.def("_persistent_rnn_stack(int mode=-1) -> (int, int)", &convrnn::persistent_stack_op);
  // The CPU recurrence (cpu/rnn_recurrence.h): mode -1 asks, 0 off, 1 on, 2 on with every step
  // split over the threads; returns the mode before the call and the layer calls it ran so far.
  m.def("_cpu_recurrence(int mode=-1) -> (int, int)", &convrnn::cpu_recurrence_op);
  // The CPU recurrence's float products (cpu/panel_gemm.h): mode -1 asks, 0 MKL, 1 our panel
  // kernel (the default where the CPU has AVX-512F or AVX2 + FMA); returns the mode before the call and
  // the layer calls that used the kernel so far.
  m.def("_cpu_gemm(int mode=-1) -> (int, int)", &convrnn::cpu_gemm::switch_op);
  // Every step's input projection: input (..., I) times weight^T, weight (G, I) (F.linear without a
  // bias; float on the CPU through cpu/panel_gemm.h), and its backward (each gradient only where
  // output_mask asks, else an empty tensor).
  m.def("input_projection(Tensor input, Tensor weight) -> Tensor");
  m.def("input_projection_backward(Tensor grad, Tensor input, Tensor weight, bool[2] output_mask) "
        "-> (Tensor grad_input, Tensor grad_weight)");
}

// Device-agnostic: the same functions for both keys (the fused ops they call dispatch on).
#define CONVRNN_REGISTER_LAYERS(m)                                 \
  m.impl("lstm_layer", &convrnn::lstm_layer);                      \
  m.impl("lstm_layer_backward", &convrnn::lstm_layer_backward);    \
  m.impl("gru_layer", &convrnn::gru_layer);                        \
  m.impl("gru_layer_backward", &convrnn::gru_layer_backward);      \
  m.impl("rnn_layer", &convrnn::rnn_layer);                        \
  m.impl("rnn_layer_backward", &convrnn::rnn_layer_backward);      \
  m.impl("rnn_stack", &convrnn::rnn_stack);                        \
  m.impl("input_projection", &convrnn::input_projection);          \
  m.impl("input_projection_backward", &convrnn::input_projection_backward)

TORCH_LIBRARY_IMPL(convrnn, CPU, m) {
  CONVRNN_REGISTER_LAYERS(m);
}

TORCH_LIBRARY_IMPL(convrnn, CUDA, m) {
  CONVRNN_REGISTER_LAYERS(m);
}
