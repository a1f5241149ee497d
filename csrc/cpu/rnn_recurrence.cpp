// The CPU layer recurrence of the LSTM, GRU and vanilla RNN (rnn_recurrence.h): every step of one
// layer and direction in one call.
//
// The step loop in rnn_layers.cpp pays per step for at::mm (dispatch, MKL's own threading: a
// B=32, H=256 step product took 74 us on MKL's two threads against 46 us as two single-threaded
// halves), a fused cell call (checks, three allocations), and copies into the gathered outputs.
// Here the H hidden units are split once into tasks (one per intra-op thread, multiples of 16
// units), and each task keeps, for the whole sequence, its units' rows of W_hh (gate-major) as
// one right operand, packed for float: into cpu_gemm's panels where that kernel runs
// (cpu/panel_gemm.h), else by MKL (a batch-1 product: 1.9 us packed against 3.6 us for sgemm_;
// B=32, H=256: 41 against 53 us, on the Xeon).  A step is one parallel region; each task:
//   forward:  multiplies the state entering the step by its slice into its own (B, G n) block,
//             then runs the cell (rnn_rows.h: rnn_cells.h's formulas) on its units, writing h
//             (c) and the workspace straight into the layer's outputs;
//   backward: finishes dh for its units (the hidden-side gate gradients of the step processed
//             before times its columns of W_hh, plus the GRU's direct part), adds the output's
//             gradient, and runs the cell backward on its units, writing the gate gradients in
//             place and summing the bias gradients.
// The end of a region is the barrier between steps: a task reads only rows that earlier regions
// finished (the whole state, or the whole gate gradients, of the step before).  Every output
// element comes from one task in a fixed order: results do not depend on the thread timing, and
// the bias sums (per row and unit over the steps in processing order, then the rows in order:
// TaskBuffers) not on the thread count.
// The forward and the backward of a batch of at least 12 rows a thread split the rows instead
// (split_rows): one region for the layer, each task running every step on its rows with all of
// W_hh, no barrier (a row's state and carried gradient come only from the same row).
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "panel_gemm.h"
#include "rnn_recurrence.h"
#include "rnn_rows.h"

namespace convrnn {
namespace {

using at::Tensor;

// The hidden units split into `count` tasks of `units` units (the last may have fewer).
// blas_threads: one task with a product big enough for BLAS's own threads (H too small to split).
struct Tasks {
  int64_t count, units, H;
  bool blas_threads;
  int64_t j0(int64_t p) const {
    return p * units;
  }
  int64_t size(int64_t p) const {
    return std::min(H, j0(p) + units) - j0(p);
  }
};

// One task per intra-op thread (at most one per 16 units) once a step's product has enough
// multiply-adds to pay for a fork-join, else one task.
Tasks split_units(int64_t B, int64_t G, int64_t H) {
  const int64_t threads = at::get_num_threads();
  const bool big = cpu_recurrence_mode() == 2 || B * G * H * H >= cpu_blas::kParallelMacs;
  int64_t count = threads > 1 && big ? std::min<int64_t>(threads, (H + 15) / 16) : 1;
  int64_t units = H;
  if (count > 1) {
    units = ((H + count - 1) / count + 15) / 16 * 16;
    count = (H + units - 1) / units;
  }
  return {count, units, H, count == 1 && big && threads > 1};
}

// The batch's rows split into `count` tasks of `rows` rows (the last may have fewer), for the
// forward: each task runs every step on its rows with every unit, so the tasks never wait for
// each other.  The split by units ends every step with a barrier (a task's units need every
// unit's state of the step before): at B=32, H=256 on two threads, 10% of the LSTM's forward went
// to libgomp's waits.  Here each task multiplies by the whole W_hh (its panels, read by both
// cores) instead of its slice.  One task (the units' split then) below kMinTaskRows rows a task:
// a block of rows shares a panel's loads among its rows.
struct RowTasks {
  int64_t count, rows;
  int64_t r0(int64_t p) const {
    return p * rows;
  }
};

constexpr int64_t kMinTaskRows = 12;

RowTasks split_rows(int64_t B, int64_t G, int64_t H) {
  const int mode = cpu_recurrence_mode();
  const int64_t threads = at::get_num_threads();
  if (threads < 2 || mode == 2) return {1, B};  // mode 2: the units' split, whatever the size
  const bool big = mode == 3 || B * G * H * H >= cpu_blas::kParallelMacs;
  const int64_t most = mode == 3 ? B : B / kMinTaskRows;
  if (!big || most < 2) return {1, B};
  const int64_t count = std::min(threads, most), rows = (B + count - 1) / count;
  return {(B + rows - 1) / rows, rows};
}

// f(p) for p in [0, count) in one parallel region, BLAS single-threaded inside it.
template <typename F>
void in_parallel(int64_t count, const F& f) {
  at::parallel_for(0, count, 1, [&](int64_t p0, int64_t p1) {
    const cpu_blas::Sequential sequential;
    for (int64_t p = p0; p < p1; ++p) f(p);
  });
}

// Runs f(p) for every task: in a parallel region (in_parallel), or, for one task, on the calling
// thread (with BLAS's own threads where the product is big; a small product on MKL's threads
// spent most of its time waking them: a batch-1 gemv measured ~40% in libgomp).
template <typename F>
void run_tasks(const Tasks& tasks, const F& f) {
  if (tasks.count == 1) {
    if (tasks.blas_threads) {
      f(int64_t(0));
    } else {
      const cpu_blas::Sequential sequential;
      f(int64_t(0));
    }
    return;
  }
  in_parallel(tasks.count, f);
}

// The k-th processed step: step t, its n rows from row `off`; the state it enters with is rows
// [0, from_prev) of the step processed before (from row prev_off), then rows of h0 / c0.
struct Step {
  int64_t t, n, off, from_prev, prev_off;
};

// Row b of the state the step enters with: a row of `all` (the layer's (N, H) states) from the
// step before, or of `init` ((B, H): h0 or c0).
template <typename T>
const T* entering(const Step& st, int64_t b, const T* all, const T* init, int64_t H) {
  return b < st.from_prev ? all + (st.prev_off + b) * H : init + b * H;
}

Step step_at(const PersistentLayer& l, int64_t k) {
  const auto index = [&](int64_t kk) { return l.reverse ? l.T - 1 - kk : kk; };
  const auto rows = [&](int64_t t) { return l.bs != nullptr ? (*l.bs)[t] : l.B; };
  const auto first = [&](int64_t t) { return l.off != nullptr ? (*l.off)[t] : t * l.B; };
  Step s{index(k), 0, 0, 0, 0};
  s.n = rows(s.t);
  s.off = first(s.t);
  if (k > 0) {
    const int64_t tp = index(k - 1);
    s.from_prev = std::min(s.n, rows(tp));
    s.prev_off = first(tp);
  }
  return s;
}

// Memory for packed slice p, at least `bytes`, from a pool of the calling thread that outlives the
// call.  MKL asks for ~9-11 MB per packed slice and writes a small part of it; allocated per call
// (mmap) the written pages faulted in every call: ~400 page faults, ~0.5 ms, per B=32 H=256
// forward, while torch's LSTM took none.
// Buffers over 64 MiB (W_hh of H > ~2900 in float) are not kept: allocated per call.
Tensor pack_buffer(int64_t p, int64_t bytes) {
  constexpr int64_t kPooled = int64_t(64) << 20;
  if (bytes > kPooled) return at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  thread_local std::vector<Tensor> pool;
  if (int64_t(pool.size()) <= p) pool.resize(p + 1);
  Tensor& b = pool[p];
  if (!b.defined() || b.numel() < bytes) b = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));  // 64-byte aligned
  return b;
}

// A task's units [j0, j0 + n) of W_hh (G*H, H): its rows q * H + j0 + u, gate-major, as a (G n, H)
// matrix (W_hh itself for a task of every unit), the right operand of h W_hh^T.  For float, that
// operand in cpu_gemm's panels (any row count) where that kernel runs, else MKL's packed copy for
// products of `packed_rows` rows (other row counts, from packed sequences, use the plain rows).
template <typename T>
struct Slice {
  int64_t G = 1, j0 = 0, n = 0, H = 0;
  Tensor rows, packed, panels;  // panels: cpu_gemm's (then rows and packed stay undefined)
  int64_t packed_rows = -1;

  // The packed operand goes to `buffer` (packed_bytes(...) of it) where defined: our panels
  // (cpu/panel_gemm.h) where that kernel runs, else MKL's packed form (float only).
  void build(const Tensor& w_hh, int64_t G_, int64_t j0_, int64_t n_, int64_t m, const Tensor& buffer) {
    G = G_;
    j0 = j0_;
    n = n_;
    H = w_hh.size(1);
    if constexpr (std::is_same_v<T, float>) {
      if (buffer.defined() && cpu_gemm::enabled()) {
        panels = buffer;
        const float* w = w_hh.const_data_ptr<float>();
        const int64_t nn = n, hh = H, first = j0;
        // column j of the operand: W_hh row q H + j0 + u (gate q = j / n, unit u = j % n); the
        // panels over the threads where this runs outside a parallel region (the rows' split)
        const int64_t N = G * n, panel_count = (N + cpu_gemm::kPanel - 1) / cpu_gemm::kPanel;
        float* dst = static_cast<float*>(panels.data_ptr());
        at::parallel_for(0, panel_count, 1, [&](int64_t q0, int64_t q1) {
          const int64_t c0 = q0 * cpu_gemm::kPanel, cols = std::min(N, q1 * cpu_gemm::kPanel) - c0;
          const auto col = [&](int64_t j) { return w + (((c0 + j) / nn) * hh + first + (c0 + j) % nn) * hh; };
          cpu_gemm::pack_columns(H, cols, col, dst + c0 * H);
        });
        return;
      }
    }
    if (n == H) {
      rows = w_hh;
    } else {
      rows = at::empty({G * n, H}, w_hh.options());
      for (int64_t q = 0; q < G; ++q) {
        std::copy_n(w_hh.const_data_ptr<T>() + (q * H + j0) * H, n * H, rows.data_ptr<T>() + q * n * H);
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      if (buffer.defined()) {
        packed = buffer;
        cblas_sgemm_pack(cpu_blas::kRowMajor, cpu_blas::kBMatrix, cpu_blas::kTrans, int(m), int(G * n), int(H), 1.0f,
                         rows.const_data_ptr<float>(), int(H), static_cast<float*>(packed.data_ptr()));
        packed_rows = m;
      }
    }
  }

  // Bytes of the packed operand for products of m rows of G n columns (0: not packed).
  static int64_t packed_bytes(int64_t m, int64_t G, int64_t n, int64_t H) {
    if (!std::is_same_v<T, float> || m == 0) return 0;
    if (cpu_gemm::enabled()) return cpu_gemm::packed_floats(H, G * n) * int64_t(sizeof(float));
    if (!cpu_blas::packed_available()) return 0;
    return int64_t(cblas_sgemm_pack_get_size(cpu_blas::kBMatrix, int(m), int(G * n), int(H)));
  }

  // c (m, G n) = a (m, H) times the slice's rows, transposed.
  void multiply(int64_t m, const T* a, T* c) const {
    if (m == 0) return;
    if constexpr (std::is_same_v<T, float>) {
      if (panels.defined()) {
        cpu_gemm::multiply(m, G * n, H, a, H, static_cast<const float*>(panels.const_data_ptr()), false, c, G * n);
        return;
      }
      if (m == packed_rows) {
        cblas_sgemm_compute(cpu_blas::kRowMajor, cpu_blas::kNoTrans, cpu_blas::kPacked, int(m), int(G * n), int(H), a,
                            int(H), static_cast<const float*>(packed.const_data_ptr()), int(H), 0.0f, c, int(G * n));
        return;
      }
    }
    cpu_blas::gemm(false, true, int(m), int(G * n), int(H), a, int(H), rows.const_data_ptr<T>(), int(H), T(0), c,
                   int(G * n));
  }
};

// Asks for rows [0, rows) (row_stride apart) of `segments` segments of n elements (seg_stride
// apart) in L2, ahead of the cell rows that read them, while a step's product runs: the LSTM row
// sat half its time on its first load of the input projection (perf annotate, AMD EPYC: a layer's
// x_proj, 6.5 MB at the training shape, comes from L3); with the prefetch the row's share of a
// layer's forward 14.9% -> 10.3%, 127 -> 119 us a step.
template <typename T>
void prefetch_rows(const T* x, int64_t rows, int64_t row_stride, int64_t segments, int64_t seg_stride, int64_t n) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t q = 0; q < segments; ++q) {
      const T* seg = x + b * row_stride + q * seg_stride;
      for (int64_t u = 0; u < n; u += kLine) __builtin_prefetch(seg + u, 0, 2);
    }
  }
}

// gates (rows [r0, e) of the step, G n wide: `width`) = the states entering the step in those
// rows times the slice: rows below st.from_prev continue the step processed before (rows of h
// from st.prev_off), the rest start from h0.
template <typename T>
void entering_product(const Slice<T>& sl, const Step& st, int64_t r0, int64_t e, const T* h, const T* h0,
                      int64_t width, T* gates) {
  const int64_t H = sl.H, mid = std::clamp(st.from_prev, r0, std::max(r0, e));
  sl.multiply(mid - r0, h + (st.prev_off + r0) * H, gates);
  sl.multiply(e - mid, h0 + mid * H, gates + (mid - r0) * width);
}

// forward_steps with the batch's rows split over the tasks (split_rows): one parallel region for
// the layer, in which task p runs every step on its rows [r0, r1): the products of their
// entering states with all of W_hh into its (rows, G H) block, then row(0, H, step, b, gates of
// row b).  A row's state comes only from the same row of the step before (or of h0), which the
// same task wrote.  The bits are the units' split's: every element of a product is one sum over k
// in order whatever the rows beside it (the panel kernel; where BLAS runs the products, the
// tests allow rounding), and the row functions see each row alone.
//
// Each row's input projection is asked for one row ahead of its row function: asked for at the
// step's start (as the units' split does) it was evicted again by the 1 MB of W_hh's panels
// streaming through L2 during the product (the LSTM row 12.8% of a layer's samples, 40% of them on
// its first loads of x_proj; one row ahead: 7.9%, 110 -> 93-100 us a step; two rows ahead within
// the noise of one).
constexpr int64_t kAhead = 1;

template <typename T, typename Row>
void forward_steps_by_rows(const PersistentLayer& l, const RowTasks& tasks, int64_t G, const T* x, const T* h0,
                           const T* h, const Row& row) {
  const int64_t H = l.H, B = l.B, width = G * H;
  Slice<T> slice;
  Tensor buffer;
  const int64_t bytes = Slice<T>::packed_bytes(tasks.rows, G, H, H);
  if (bytes > 0) buffer = pack_buffer(0, bytes);
  slice.build(l.w_hh, G, 0, H, tasks.rows, buffer);
  Tensor scratch = at::empty({tasks.count, tasks.rows, width}, l.w_hh.options());
  T* ps = scratch.data_ptr<T>();
  in_parallel(tasks.count, [&](int64_t p) {
    const int64_t r0 = tasks.r0(p), r1 = std::min(B, r0 + tasks.rows);
    T* gates = ps + p * tasks.rows * width;
    for (int64_t k = 0; k < l.T; ++k) {
      const Step st = step_at(l, k);
      const int64_t e = std::min(r1, st.n);
      if (e <= r0) continue;  // a packed sequence's step without these rows
      entering_product(slice, st, r0, e, h, h0, width, gates);
      const T* xs = x + st.off * width;
      prefetch_rows(xs + r0 * width, std::min<int64_t>(kAhead, e - r0), width, 1, 0, width);
      for (int64_t b = r0; b < e; ++b) {
        if (b + kAhead < e) prefetch_rows(xs + (b + kAhead) * width, 1, width, 1, 0, width);
        row(int64_t(0), H, st, b, gates + (b - r0) * width);
      }
    }
  });
}

// The forward steps of a cell with G gates: per step and task, the products of the state entering
// the step with the task's slice into its (rows, G n) block `gates`, then row(p, step, b, gates of
// row b) for every row b of the step.  h: the layer's output (N, H); h0 (B, H).
template <typename T, typename Row>
void forward_steps(const PersistentLayer& l, int64_t G, const T* x, const T* h0, const T* h, const Row& row) {
  const int64_t H = l.H, B = l.B;
  const RowTasks by_rows = split_rows(B, G, H);
  if (by_rows.count > 1) {
    forward_steps_by_rows(l, by_rows, G, x, h0, h, row);
    return;
  }
  const Tasks tasks = split_units(B, G, H);
  const Tensor& w_hh = l.w_hh;
  std::vector<Slice<T>> slices(tasks.count);
  std::vector<Tensor> buffers(tasks.count);
  for (int64_t p = 0; p < tasks.count; ++p) {
    const int64_t bytes = Slice<T>::packed_bytes(B, G, tasks.size(p), H);
    if (bytes > 0) buffers[p] = pack_buffer(p, bytes);
  }
  run_tasks(tasks, [&](int64_t p) { slices[p].build(w_hh, G, tasks.j0(p), tasks.size(p), B, buffers[p]); });
  Tensor scratch = at::empty({tasks.count, B, G * tasks.units}, w_hh.options());
  T* ps = scratch.data_ptr<T>();
  for (int64_t k = 0; k < l.T; ++k) {
    const Step st = step_at(l, k);
    run_tasks(tasks, [&](int64_t p) {
      const Slice<T>& sl = slices[p];
      const int64_t width = G * sl.n;
      T* gates = ps + p * B * G * tasks.units;
      prefetch_rows(x + st.off * G * H + sl.j0, st.n, G * H, G, H, sl.n);
      entering_product(sl, st, 0, st.n, h, h0, width, gates);
      for (int64_t b = 0; b < st.n; ++b) row(sl.j0, sl.n, st, b, gates + b * width);
    });
  }
}

// Whether the backward's products dh (+)= g W_hh run on cpu_gemm's panels of W_hh's columns (float
// where that kernel runs), else BLAS on W_hh's rows in place.
template <typename T>
bool backward_packs() {
  return std::is_same_v<T, float> && cpu_gemm::enabled();
}

// W_hh (G H, H)'s columns [c0, c1) into cpu_gemm's panels at `dst` (the panels of the operand whose
// first column is c0; c0 a multiple of kPanel where dst is inside a whole operand's panels).
void pack_backward_columns(const Tensor& w_hh, int64_t G, int64_t c0, int64_t c1, float* dst) {
  const int64_t H = w_hh.size(1);
  cpu_gemm::pack_rows(w_hh.const_data_ptr<float>() + c0, H, G * H, c1 - c0, dst);
}

// dh's rows [b0, b1), columns [j0, j0 + n) (+)= the gate gradients of step st's rows [b0, b1)
// (g_hidden, (N, G H)) times W_hh's columns [j0, j0 + n) (`panels`: pack_backward_columns of them, or
// undefined for BLAS on W_hh's rows).
template <typename T>
void dh_product(const PersistentLayer& l, int64_t G, const Step& st, int64_t b0, int64_t b1, int64_t j0, int64_t n,
                const Tensor& panels, const T* g_hidden, bool accumulate, T* pdh) {
  const int64_t H = l.H, m = b1 - b0;
  if (m <= 0) return;
  const T* g = g_hidden + (st.off + b0) * G * H;
  if constexpr (std::is_same_v<T, float>) {
    if (panels.defined()) {
      cpu_gemm::multiply(m, n, G * H, g, G * H, static_cast<const float*>(panels.const_data_ptr()), accumulate,
                         pdh + b0 * H + j0, H);
      return;
    }
  }
  cpu_blas::gemm(false, false, int(m), int(n), int(G * H), g, int(G * H), l.w_hh.const_data_ptr<T>() + j0, int(H),
                 accumulate ? T(1) : T(0), pdh + b0 * H + j0, int(H));
}

// Row b of step st, units [j0, j0 + n): the output's gradient (grad_out, (N, H), or null) added to
// the carried gradient dh, then row(p, j0, n, st, b), the cell backward.
template <typename T, typename Row>
void backward_row(const Row& row, int64_t p, int64_t j0, int64_t n, const Step& st, int64_t b, const T* pgo, T* pdh,
                  int64_t H) {
  if (pgo != nullptr) {
    T* ghy = pdh + b * H + j0;
    const T* go = pgo + (st.off + b) * H + j0;
    for (int64_t u = 0; u < n; ++u) ghy[u] += go[u];
  }
  row(p, j0, n, st, b);
}

// The backward steps of a cell with G gates.  dh (B, H) holds the carried gradient; per step and
// task: dh's rows of the step processed before, the task's columns, get that step's hidden-side
// gate gradients (g_hidden, (N, G H)) times the task's columns of W_hh (added to what dh holds with
// `accumulate`: the GRU's direct part, stored there by its row), the output's gradient is added to
// the step's rows, and row(p, j0, n, step, b) runs the cell backward on row b.  After the last step,
// dh gets the same product for the first processed step: the gradient of h0.  tasks: the caller's
// split_units(B, G, H), the one its per-task buffers were sized for.  prefetch(step, b0, b1, j0, n)
// asks for the saved tensors of rows [b0, b1), units [j0, j0 + n).
template <typename T, typename Row, typename Prefetch>
void backward_steps(const PersistentLayer& l, const Tasks& tasks, int64_t G, const Tensor& grad_out, T* pdh,
                    const T* g_hidden, bool accumulate, const Row& row, const Prefetch& prefetch) {
  const int64_t H = l.H;
  const T* pgo = ptr_or_null<T>(grad_out);
  // per task, its columns of W_hh (G H, n) in cpu_gemm's panels, where that kernel runs
  std::vector<Tensor> panels(tasks.count);
  if (backward_packs<T>()) {
    for (int64_t p = 0; p < tasks.count; ++p) {
      panels[p] = pack_buffer(p, cpu_gemm::packed_floats(G * H, tasks.size(p)) * int64_t(sizeof(float)));
    }
    run_tasks(tasks, [&](int64_t p) {
      pack_backward_columns(l.w_hh, G, tasks.j0(p), tasks.j0(p) + tasks.size(p),
                               static_cast<float*>(panels[p].data_ptr()));
    });
  }
  for (int64_t k = l.T - 1; k >= 0; --k) {
    const Step st = step_at(l, k);
    const bool carried = k + 1 < l.T;
    const Step next = carried ? step_at(l, k + 1) : st;
    run_tasks(tasks, [&](int64_t p) {
      const int64_t j0 = tasks.j0(p), n = tasks.size(p);
      prefetch(st, 0, st.n, j0, n);  // the rows' saved tensors, while the product runs
      if (pgo != nullptr) prefetch_rows(pgo + st.off * H + j0, st.n, H, 1, 0, n);
      if (carried) dh_product(l, G, next, 0, next.n, j0, n, panels[p], g_hidden, accumulate, pdh);
      for (int64_t b = 0; b < st.n; ++b) backward_row(row, p, j0, n, st, b, pgo, pdh, H);
    });
  }
  const Step first = step_at(l, 0);
  run_tasks(tasks, [&](int64_t p) {
    dh_product(l, G, first, 0, first.n, tasks.j0(p), tasks.size(p), panels[p], g_hidden, accumulate, pdh);
  });
}

// backward_steps with the batch's rows split over the tasks (split_rows), as the forward's
// forward_steps_by_rows: a row's carried gradient needs only the same row's gate gradients of
// the step processed before, so each task runs every step on its rows [r0, r1) with all of W_hh
// (one packed copy, shared), in one parallel region with no barrier between steps.  The units'
// split ended every step with a barrier and read half of each step's gate gradients from the
// other core's cache.  row(p, 0, H, step, b) as there.  The bits are the units' split's: every
// element of a product is one sum over k in order however the rows and columns are blocked (the
// panel kernel; BLAS, where it runs, may round differently), and the bias sums go per row
// (TaskBuffers).
template <typename T, typename Row, typename Prefetch>
void backward_steps_by_rows(const PersistentLayer& l, const RowTasks& tasks, int64_t G, const Tensor& grad_out,
                            T* pdh, const T* g_hidden, bool accumulate, const Row& row, const Prefetch& prefetch) {
  const int64_t H = l.H, B = l.B;
  const T* pgo = ptr_or_null<T>(grad_out);
  Tensor panels;
  if (backward_packs<T>()) {  // one operand of every column, its panels packed over the threads
    panels = pack_buffer(0, cpu_gemm::packed_floats(G * H, H) * int64_t(sizeof(float)));
    float* dst = static_cast<float*>(panels.data_ptr());
    const int64_t panel_count = (H + cpu_gemm::kPanel - 1) / cpu_gemm::kPanel;
    at::parallel_for(0, panel_count, 1, [&](int64_t q0, int64_t q1) {
      const int64_t c0 = q0 * cpu_gemm::kPanel, c1 = std::min(H, q1 * cpu_gemm::kPanel);
      pack_backward_columns(l.w_hh, G, c0, c1, dst + c0 * G * H);
    });
  }
  in_parallel(tasks.count, [&](int64_t p) {
    const int64_t r0 = tasks.r0(p), r1 = std::min(B, r0 + tasks.rows);
    for (int64_t k = l.T - 1; k >= 0; --k) {
      const Step st = step_at(l, k);
      const int64_t e = std::min(r1, st.n);
      if (k + 1 < l.T) {
        const Step next = step_at(l, k + 1);
        dh_product(l, G, next, r0, std::min(r1, next.n), 0, H, panels, g_hidden, accumulate, pdh);
      }
      if (e > r0) prefetch(st, r0, std::min(e, r0 + kAhead), 0, H);
      for (int64_t b = r0; b < e; ++b) {
        if (b + kAhead < e) prefetch(st, b + kAhead, b + kAhead + 1, 0, H);
        backward_row(row, p, int64_t(0), H, st, b, pgo, pdh, H);
      }
    }
    const Step first = step_at(l, 0);
    dh_product(l, G, first, r0, std::min(r1, first.n), 0, H, panels, g_hidden, accumulate, pdh);
  });
}

// How a layer's backward splits its steps over the threads: by rows where the forward does
// (split_rows), else by units (split_units).
struct BackwardSplit {
  RowTasks rows;
  Tasks units;  // the units' split, or in the rows' split one task of all H units (its H serves)
  bool by_rows() const {
    return rows.count > 1;
  }
  int64_t count() const {
    return by_rows() ? rows.count : units.count;
  }
};

BackwardSplit split_backward(int64_t B, int64_t G, int64_t H) {
  const RowTasks rows = split_rows(B, G, H);
  return {rows, rows.count > 1 ? Tasks{1, H, H, false} : split_units(B, G, H)};
}

// Runs the backward steps (backward_steps' arguments) as `split` says.
template <typename T, typename Row, typename Prefetch>
void run_backward_steps(const PersistentLayer& l, const BackwardSplit& split, int64_t G, const Tensor& grad_out,
                        T* pdh, const T* g_hidden, bool accumulate, const Row& row, const Prefetch& prefetch) {
  if (split.by_rows()) {
    backward_steps_by_rows<T>(l, split.rows, G, grad_out, pdh, g_hidden, accumulate, row, prefetch);
  } else {
    backward_steps<T>(l, split.units, G, grad_out, pdh, g_hidden, accumulate, row, prefetch);
  }
}

// The bias gradients' sums, per batch row: row b's sums (acc_t<T>, `blocks` gate blocks of n,
// as the backward rows add them) over every step it takes part in, in processing order, kept
// by the task that runs row b (its units' part in the units' split); store() then adds the rows'
// sums in row order.  The same order in both splits, so the same bits whatever the split and the
// thread count (a per-task sum over its rows would depend on both).  Also per task a row of n
// elements for a state gradient the row writes before it is copied over its input (n: the
// task's units, or H in the rows' split).
template <typename T>
struct TaskBuffers {
  const BackwardSplit& split;
  int64_t blocks;
  std::vector<std::vector<acc_t<T>>> sums;  // task p: (its rows, blocks, its units)
  std::vector<std::vector<T>> row;

  TaskBuffers(const BackwardSplit& split_, int64_t B, int64_t blocks_)
      : split(split_), blocks(blocks_), sums(split_.count()), row(split_.count()) {
    for (int64_t p = 0; p < split.count(); ++p) {
      const int64_t rows = split.by_rows() ? std::min(B, first_row(p) + split.rows.rows) - first_row(p) : B;
      sums[p].assign(rows * blocks * units(p), acc_t<T>(0));
      row[p].resize(units(p));
    }
  }

  // Task p's units (all H in the rows' split) and first row (0 in the units' split).
  int64_t units(int64_t p) const {
    return split.by_rows() ? split.units.H : split.units.size(p);
  }
  int64_t first_row(int64_t p) const {
    return split.by_rows() ? split.rows.r0(p) : 0;
  }

  // Row b's sums, in task p (which runs it).
  acc_t<T>* sums_of(int64_t p, int64_t b) {
    return sums[p].data() + (b - first_row(p)) * blocks * units(p);
  }

  // out (count H) = gate blocks [first, first + count) of the sums of rows [0, B), added in row
  // order, per part of the units (a task's in the units' split, all H in the rows').
  void store(int64_t B, int64_t first, int64_t count, const Tensor& out) const {
    if (!out.defined()) return;
    const int64_t parts = split.by_rows() ? 1 : split.units.count;
    for (int64_t q = 0; q < parts; ++q) {
      const int64_t n = units(q), j0 = split.by_rows() ? 0 : split.units.j0(q);
      std::vector<acc_t<T>> total(count * n, acc_t<T>(0));
      for (int64_t b = 0; b < B; ++b) {
        const int64_t p = split.by_rows() ? b / split.rows.rows : q;  // the task that ran row b
        const acc_t<T>* s = sums[p].data() + ((b - first_row(p)) * blocks + first) * n;
        for (int64_t i = 0; i < count * n; ++i) total[i] += s[i];
      }
      store_bias_sums<T>(total.data(), count, split.units.H, j0, n, {&out});
    }
  }
};

// ---- the cells ----

template <typename T>
void lstm_forward(const PersistentLayer& l, const Tensor& x, Tensor& out, Tensor& cs, Tensor& ws) {
  const int64_t H = l.H;
  const T *px = x.const_data_ptr<T>(), *h0 = l.h0.const_data_ptr<T>(), *c0 = l.c0.const_data_ptr<T>();
  const T *bi = bias_data<T>(l.b_ih), *bh = bias_data<T>(l.b_hh);
  T *po = out.data_ptr<T>(), *pc = cs.data_ptr<T>(), *pw = ws.defined() ? ws.data_ptr<T>() : nullptr;
  with_flags(bi != nullptr, pw != nullptr, [&](auto bias, auto save) {
    constexpr bool kBias = decltype(bias)::value, kSave = decltype(save)::value;
    forward_steps<T>(l, 4, px, h0, po, [&](int64_t j0, int64_t n, const Step& st, int64_t b, const T* gates) {
      const int64_t r = st.off + b;
      const T* cx = entering(st, b, pc, c0, H);
      lstm_row<T, kBias, false, kSave>(px + r * 4 * H + j0, gates, kBias ? bi + j0 : nullptr, kBias ? bh + j0 : nullptr,
                                       cx + j0, po + r * H + j0, pc + r * H + j0, kSave ? pw + r * 4 * H + j0 : nullptr,
                                       n, H, n);
    });
  });
}

template <typename T>
void lstm_backward(const PersistentLayer& l, const Tensor& grad_out, const Tensor& cs, const Tensor& ws, Tensor& dh,
                   Tensor& dc, Tensor& gg, Tensor& grad_bias) {
  const int64_t H = l.H;
  const T *c0 = l.c0.const_data_ptr<T>(), *pc = cs.const_data_ptr<T>(), *pws = ws.const_data_ptr<T>();
  T *pdh = dh.data_ptr<T>(), *pdc = dc.data_ptr<T>(), *pg = gg.data_ptr<T>();
  const BackwardSplit split = split_backward(l.B, 4, H);
  TaskBuffers<T> buf(split, l.B, 4);
  const auto row = [&](int64_t p, int64_t j0, int64_t n, const Step& st, int64_t b) {
    const int64_t r = st.off + b;
    const T* cx = entering(st, b, pc, c0, H);
    T* gcx = buf.row[p].data();
    lstm_backward_row<T, true>(pdh + b * H + j0, pdc + b * H + j0, cx + j0, pc + r * H + j0, pws + r * 4 * H + j0,
                               pg + r * 4 * H + j0, gcx, buf.sums_of(p, b), H, n);
    std::copy_n(gcx, n, pdc + b * H + j0);
  };
  const auto prefetch = [&](const Step& st, int64_t b0, int64_t b1, int64_t j0, int64_t n) {
    prefetch_rows(pws + (st.off + b0) * 4 * H + j0, b1 - b0, 4 * H, 4, H, n);
    prefetch_rows(pc + (st.off + b0) * H + j0, b1 - b0, H, 1, 0, n);
  };
  run_backward_steps<T>(l, split, 4, grad_out, pdh, pg, false, row, prefetch);
  buf.store(l.B, 0, 4, grad_bias);
}

template <typename T>
void gru_forward(const PersistentLayer& l, const Tensor& x, Tensor& out, Tensor& ws) {
  const int64_t H = l.H;
  const T *px = x.const_data_ptr<T>(), *h0 = l.h0.const_data_ptr<T>();
  const T *bi = bias_data<T>(l.b_ih), *bh = bias_data<T>(l.b_hh);
  T *po = out.data_ptr<T>(), *pw = ws.defined() ? ws.data_ptr<T>() : nullptr;
  with_flags(bi != nullptr, pw != nullptr, [&](auto bias, auto save) {
    constexpr bool kBias = decltype(bias)::value, kSave = decltype(save)::value;
    forward_steps<T>(l, 3, px, h0, po, [&](int64_t j0, int64_t n, const Step& st, int64_t b, const T* gates) {
      const int64_t r = st.off + b;
      const T* hx = entering(st, b, po, h0, H);
      gru_row<T, kBias, kSave>(px + r * 3 * H + j0, gates, kBias ? bi + j0 : nullptr, kBias ? bh + j0 : nullptr,
                               hx + j0, po + r * H + j0, kSave ? pw + r * 4 * H + j0 : nullptr, n, H, n);
    });
  });
}

template <typename T>
void gru_backward(const PersistentLayer& l, const Tensor& grad_out, const Tensor& out, const Tensor& ws, Tensor& dh,
                  Tensor& gh, Tensor& gx, Tensor& grad_b_ih, Tensor& grad_b_hh) {
  const int64_t H = l.H;
  const T *h0 = l.h0.const_data_ptr<T>(), *po = out.const_data_ptr<T>(), *pws = ws.const_data_ptr<T>();
  T *pdh = dh.data_ptr<T>(), *pgh = gh.data_ptr<T>(), *pgx = gx.data_ptr<T>();
  const BackwardSplit split = split_backward(l.B, 3, H);
  TaskBuffers<T> buf(split, l.B, 6);
  // the row leaves the direct part of the state's gradient (grad_hy z) in dh; the next region
  // adds the products to it
  const auto row = [&](int64_t p, int64_t j0, int64_t n, const Step& st, int64_t b) {
    const int64_t r = st.off + b;
    const T* hx = entering(st, b, po, h0, H);
    T* ghx = buf.row[p].data();
    gru_backward_row<T, true>(pdh + b * H + j0, hx + j0, pws + r * 4 * H + j0, pgx + r * 3 * H + j0,
                              pgh + r * 3 * H + j0, ghx, buf.sums_of(p, b), H, n);
    std::copy_n(ghx, n, pdh + b * H + j0);
  };
  const auto prefetch = [&](const Step& st, int64_t b0, int64_t b1, int64_t j0, int64_t n) {
    prefetch_rows(pws + (st.off + b0) * 4 * H + j0, b1 - b0, 4 * H, 4, H, n);
  };
  run_backward_steps<T>(l, split, 3, grad_out, pdh, pgh, true, row, prefetch);
  buf.store(l.B, 0, 3, grad_b_ih);
  buf.store(l.B, 3, 3, grad_b_hh);
}

template <typename T>
void rnn_forward(const PersistentLayer& l, const Tensor& x, Tensor& out) {
  const int64_t H = l.H;
  const bool relu = l.cell == RnnCell::kRelu;
  const T *px = x.const_data_ptr<T>(), *h0 = l.h0.const_data_ptr<T>();
  const T *bi = bias_data<T>(l.b_ih), *bh = bias_data<T>(l.b_hh);
  T* po = out.data_ptr<T>();
  with_flags(bi != nullptr, false, [&](auto bias, auto) {
    constexpr bool kBias = decltype(bias)::value;
    forward_steps<T>(l, 1, px, h0, po, [&](int64_t j0, int64_t n, const Step& st, int64_t b, const T* gates) {
      const int64_t r = st.off + b;
      rnn_row<T, kBias, false>(px + r * H + j0, gates, kBias ? bi + j0 : nullptr, kBias ? bh + j0 : nullptr,
                               po + r * H + j0, n, relu);
    });
  });
}

template <typename T>
void rnn_backward(const PersistentLayer& l, const Tensor& grad_out, const Tensor& out, Tensor& dh, Tensor& gp,
                  Tensor& grad_bias) {
  const int64_t H = l.H;
  const bool relu = l.cell == RnnCell::kRelu;
  const T* po = out.const_data_ptr<T>();
  T *pdh = dh.data_ptr<T>(), *pgp = gp.data_ptr<T>();
  const BackwardSplit split = split_backward(l.B, 1, H);
  TaskBuffers<T> buf(split, l.B, 1);
  const auto row = [&](int64_t p, int64_t j0, int64_t n, const Step& st, int64_t b) {
    const int64_t r = st.off + b;
    rnn_backward_row<T, true>(pdh + b * H + j0, po + r * H + j0, pgp + r * H + j0, buf.sums_of(p, b), n, relu);
  };
  const auto prefetch = [&](const Step& st, int64_t b0, int64_t b1, int64_t j0, int64_t n) {
    prefetch_rows(po + (st.off + b0) * H + j0, b1 - b0, H, 1, 0, n);
  };
  run_backward_steps<T>(l, split, 1, grad_out, pdh, pgp, false, row, prefetch);
  buf.store(l.B, 0, 1, grad_bias);
}

// The sizes BLAS takes as int, on the CPU, steps to run.
bool serves(const PersistentLayer& l, const Tensor& t) {
  return t.is_cpu() && cpu_recurrence_serves(t.scalar_type()) && l.T > 0 && l.N > 0 && l.B < INT_MAX &&
         4 * l.H < INT_MAX;
}

// Runs f<scalar_t>() where served, counting the run.
template <typename F>
bool serve(const PersistentLayer& l, const Tensor& t, const F& f) {
  if (!serves(l, t)) return false;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "convrnn.cpu_recurrence", [&] { f(scalar_t()); });
  note_cpu_recurrence_run();
  if (t.scalar_type() == at::kFloat && cpu_gemm::enabled()) cpu_gemm::note_run();
  return true;
}

}  // namespace

bool cpu_recurrence_serves(at::ScalarType dtype) {
  return cpu_blas::available(dtype);
}

bool cpu_recurrence_forward(const PersistentLayer& l, const Tensor& x, Tensor& out, Tensor& cs, Tensor& ws) {
  return serve(l, x, [&](auto v) {
    using T = decltype(v);
    switch (l.cell) {
      case RnnCell::kLstm:
        lstm_forward<T>(l, x, out, cs, ws);
        break;
      case RnnCell::kGru:
        gru_forward<T>(l, x, out, ws);
        break;
      default:
        rnn_forward<T>(l, x, out);
    }
  });
}

bool cpu_recurrence_backward(const PersistentLayer& l, const Tensor& grad_out, const Tensor& out, const Tensor& cs,
                             const Tensor& ws, Tensor& dh, Tensor& dc, Tensor& g_hidden, Tensor& g_input,
                             Tensor& grad_b_ih, Tensor& grad_b_hh) {
  return serve(l, out, [&](auto v) {
    using T = decltype(v);
    switch (l.cell) {
      case RnnCell::kLstm:
        lstm_backward<T>(l, grad_out, cs, ws, dh, dc, g_hidden, grad_b_ih);
        break;
      case RnnCell::kGru:
        gru_backward<T>(l, grad_out, out, ws, dh, g_hidden, g_input, grad_b_ih, grad_b_hh);
        break;
      default:
        rnn_backward<T>(l, grad_out, out, dh, g_hidden, grad_b_ih);
    }
  });
}

}  // namespace convrnn
