// Runs the persistent recurrence's CUDA kernels (csrc/cuda/rnn_persistent.cuh, the very source
// nvcc compiles) on the CPU: one std::thread per CUDA thread, a barrier per block for
// __syncthreads, one for the whole grid for grid.sync(), a per-warp exchange for the shuffles,
// and NaN-filled shared memory (cuda_emulation.h).  A Python extension (tests/test_rnn_persistent.py builds it with
// torch.utils.cpp_extension.load) whose forward and backward take the layer ops' tensors and an
// explicit plan (units per block, batch rows per chunk), so that the tests compare them with
// the CPU layer ops on machines without a GPU.  It checks the kernels' indexing, staging,
// chunking, split-k and reduce-scatter arithmetic and the step geometry (packed, reverse); it
// says nothing about timing, occupancy or the memory model (L1 bypass, fences).
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "rnn_cells.h"
#include "cuda_emulation.h"  // after the host headers: it defines the CUDA keywords as macros
#include "cuda/rnn_persistent.cuh"

// ---- the Python functions ----

namespace {

using namespace convrnn::persistent;
using torch::Tensor;
using OptTensor = std::optional<Tensor>;

// cell: 0 LSTM, 1 GRU, 2 tanh, 3 relu (convrnn::RnnCell).  Calls f(T*{}, integral_constant<Kind>).
template <typename F>
void dispatch(const Tensor& t, int64_t cell, F&& f) {
  auto by_cell = [&](auto tag) {
    if (cell == 0) {
      f(tag, std::integral_constant<Kind, Kind::kLstm>{});
    } else if (cell == 1) {
      f(tag, std::integral_constant<Kind, Kind::kGru>{});
    } else {
      f(tag, std::integral_constant<Kind, Kind::kRnn>{});
    }
  };
  if (t.scalar_type() == at::kFloat) {
    by_cell(static_cast<float*>(nullptr));
  } else if (t.scalar_type() == at::kHalf) {
    by_cell(static_cast<c10::Half*>(nullptr));
  } else {
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, "emulation: float32, float16 or bfloat16");
    by_cell(static_cast<c10::BFloat16*>(nullptr));
  }
}

// batch_sizes then offsets (the host's upload_steps), or undefined for B rows per step.
Tensor steps_of(const OptTensor& batch_sizes) {
  if (!batch_sizes.has_value()) return Tensor();
  const Tensor bs = batch_sizes->to(at::kLong).contiguous();
  return at::cat({bs, bs.cumsum(0) - bs});
}

template <typename T>
T* ptr(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

int gates(int64_t cell) {
  return cell == 0 ? 4 : (cell == 1 ? 3 : 1);
}

// x (N, G*H), h0 (B, H), c0 (B, H) or none, w (G*H, H).  Returns out, cs (LSTM), ws (need_ws),
// NaN wherever the kernel wrote nothing.
std::vector<Tensor> forward(int64_t cell, Tensor x, Tensor h0, OptTensor c0, Tensor w, OptTensor b_ih,
                            OptTensor b_hh, OptTensor batch_sizes, int64_t B, bool reverse, bool need_ws,
                            int64_t units, int64_t chunk, int64_t sync) {
  const int64_t N = x.size(0), H = w.size(1), G = gates(cell);
  const Tensor steps = steps_of(batch_sizes);
  const int64_t T = steps.defined() ? batch_sizes->numel() : N / B;
  auto nan = [&](int64_t cols) { return at::full({N, cols}, NAN, x.options()); };
  Tensor out = nan(H), cs = cell == 0 ? nan(H) : Tensor(), ws = need_ws && cell <= 1 ? nan(4 * H) : Tensor();
  dispatch(x, cell, [&](auto tag, auto kind) {
    using T_ = std::remove_pointer_t<decltype(tag)>;
    constexpr Kind C = decltype(kind)::value;
    ForwardArgs<T_> a{};
    a.x = x.data_ptr<T_>();
    a.w = w.data_ptr<T_>();
    a.b_ih = ptr<T_>(b_ih);
    a.b_hh = ptr<T_>(b_hh);
    a.h0 = h0.data_ptr<T_>();
    a.c0 = ptr<T_>(c0);
    a.out = out.data_ptr<T_>();
    a.cs = ptr<T_>(cs);
    a.ws = ptr<T_>(ws);
    set_step_geometry(a, steps.defined() ? steps.data_ptr<int64_t>() : nullptr, T, B, static_cast<int>(H),
                      static_cast<int>(units), static_cast<int>(chunk), reverse, cell == 3, static_cast<Sync>(sync));
    a.vec = (H * int64_t(sizeof(T_))) % 16 == 0 && aligned16(a.out) && aligned16(a.h0);
    const int64_t smem = smem_layout(static_cast<int>(G * units), static_cast<int>(H), static_cast<int>(chunk),
                                     sizeof(T_), sync == 2 ? 2 : 1).total;
    emu::launch(&forward_kernel<T_, C>, static_cast<int>((H + units - 1) / units), kPThreads, smem, a);
  });
  return {out, cs.defined() ? cs : at::empty({0}), ws.defined() ? ws : at::empty({0})};
}

// The backward op's tensors; dh and dc start as grad_hn / grad_cn or zeros.  Returns
// g_hidden (N, G*H), g_input (N, 3H, GRU), grad_h0, grad_c0 (LSTM).
std::vector<Tensor> backward(int64_t cell, OptTensor grad_out, Tensor out, OptTensor cs, OptTensor ws, Tensor h0,
                             OptTensor c0, Tensor w, OptTensor grad_hn, OptTensor grad_cn, OptTensor batch_sizes,
                             int64_t B, bool reverse, int64_t units, int64_t chunk, int64_t sync) {
  const int64_t N = out.size(0), H = w.size(1), G = gates(cell);
  const Tensor steps = steps_of(batch_sizes);
  const int64_t T = steps.defined() ? batch_sizes->numel() : N / B;
  Tensor g_hidden = at::full({N, G * H}, NAN, out.options());
  Tensor g_input = cell == 1 ? at::full({N, 3 * H}, NAN, out.options()) : Tensor();
  Tensor dh = grad_hn.has_value() ? grad_hn->clone() : at::zeros({B, H}, out.options());
  Tensor dc = cell == 0 ? (grad_cn.has_value() ? grad_cn->clone() : at::zeros({B, H}, out.options())) : Tensor();
  Tensor acc = at::full({2, B, H}, NAN, out.options().dtype(at::kFloat));
  dispatch(out, cell, [&](auto tag, auto kind) {
    using T_ = std::remove_pointer_t<decltype(tag)>;
    constexpr Kind C = decltype(kind)::value;
    BackwardArgs<T_> a{};
    a.w = w.data_ptr<T_>();
    a.gout = ptr<T_>(grad_out);
    a.out = out.data_ptr<T_>();
    a.cs = ptr<T_>(cs);
    a.ws = ptr<T_>(ws);
    a.h0 = h0.data_ptr<T_>();
    a.c0 = ptr<T_>(c0);
    a.dh = dh.data_ptr<T_>();
    a.dc = ptr<T_>(dc);
    a.g_hidden = g_hidden.data_ptr<T_>();
    a.g_input = ptr<T_>(g_input);
    a.dh_acc = acc.data_ptr<float>();
    a.dc_acc = cell == 0 ? a.dh_acc + B * H : nullptr;
    set_step_geometry(a, steps.defined() ? steps.data_ptr<int64_t>() : nullptr, T, B, static_cast<int>(H),
                      static_cast<int>(units), static_cast<int>(chunk), reverse, cell == 3, static_cast<Sync>(sync));
    a.vec = (G * H * int64_t(sizeof(T_))) % 16 == 0 && aligned16(a.g_hidden);
    const int64_t smem = smem_layout(static_cast<int>(units), static_cast<int>(G * H), static_cast<int>(chunk),
                                     sizeof(T_), sync == 2 ? 2 : 1).total;
    emu::launch(&backward_kernel<T_, C>, static_cast<int>((H + units - 1) / units), kPThreads, smem, a);
  });
  return {g_hidden, g_input.defined() ? g_input : at::empty({0}), dh, dc.defined() ? dc : at::empty({0})};
}

// The host's plan candidates (units, blocks, chunk, smem, step_ns, sync), fastest modelled first.
using PlanTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, double, int64_t>;
std::vector<PlanTuple> candidates(int64_t rows_per_unit, int64_t K, int64_t B, int64_t H, int64_t elem,
                                  int64_t smem_optin, int64_t max_cluster, bool dsmem) {
  std::vector<PlanTuple> r;
  for (const Plan& p : plan_candidates(static_cast<int>(rows_per_unit), static_cast<int>(K), B, static_cast<int>(H),
                                       static_cast<int>(elem), smem_optin, static_cast<int>(max_cluster), dsmem)) {
    r.emplace_back(p.units, p.blocks, p.chunk, p.smem, p.step_ns, static_cast<int64_t>(p.sync));
  }
  return r;
}

// The stacked forward (every layer of a unidirectional stack in one kernel) under an explicit
// plan: units[l] hidden units a block for layer l.  x (T B, G H) layer 0's input projections;
// h0, c0 (L, B, H); w_ih: layers 1..L-1; w_hh, b_ih, b_hh: every layer.  Returns out (T B, H),
// h_n, c_n (LSTM), NaN wherever the kernel wrote nothing.
std::vector<Tensor> stack_forward(int64_t cell, Tensor x, Tensor h0, OptTensor c0, std::vector<Tensor> w_ih,
                                  std::vector<Tensor> w_hh, std::vector<OptTensor> b_ih, std::vector<OptTensor> b_hh,
                                  int64_t B, std::vector<int64_t> units) {
  const int64_t L = static_cast<int64_t>(w_hh.size()), H = w_hh[0].size(1), G = gates(cell);
  TORCH_CHECK(L >= 2 && L <= kMaxStack && int64_t(w_ih.size()) == L - 1 && int64_t(units.size()) == L &&
                  int64_t(b_ih.size()) == L && int64_t(b_hh.size()) == L,
              "emulation: a stack of 2..", kMaxStack, " layers");
  const int64_t T = x.size(0) / B;
  Tensor out = at::full({T * B, H}, NAN, x.options()), hn = at::full({L, B, H}, NAN, x.options());
  Tensor cn = cell == 0 ? at::full({L, B, H}, NAN, x.options()) : Tensor();
  dispatch(x, cell, [&](auto tag, auto kind) {
    using T_ = std::remove_pointer_t<decltype(tag)>;
    constexpr Kind C = decltype(kind)::value;
    StackArgs<T_> a{};
    a.x = x.data_ptr<T_>();
    for (int64_t l = 0; l < L; ++l) {
      a.w_ih[l] = l > 0 ? w_ih[l - 1].data_ptr<T_>() : nullptr;
      a.w_hh[l] = w_hh[l].data_ptr<T_>();
      a.b_ih[l] = ptr<T_>(b_ih[l]);
      a.b_hh[l] = ptr<T_>(b_hh[l]);
      a.plan.units[l] = static_cast<int>(units[l]);
    }
    a.h0 = h0.data_ptr<T_>();
    a.c0 = ptr<T_>(c0);
    a.out = out.data_ptr<T_>();
    a.hn = hn.data_ptr<T_>();
    a.cn = ptr<T_>(cn);
    a.T = T;
    a.B = B;
    a.H = static_cast<int>(H);
    a.relu = cell == 3;
    a.plan.L = static_cast<int>(L);
    stack_geometry(a.plan, B, static_cast<int>(H), static_cast<int>(G), sizeof(T_));
    emu::launch(&stack_forward_kernel<T_, C>, a.plan.blocks, kPThreads, a.plan.smem, a);
  });
  return {out, hn, cn.defined() ? cn : at::empty({0})};
}

// The host's stacked plans (units per layer, blocks, smem, step_ns), fastest modelled first.
using StackTuple = std::tuple<std::vector<int64_t>, int64_t, int64_t, double>;
std::vector<StackTuple> stack_plans(int64_t L, int64_t B, int64_t H, int64_t G, int64_t elem, int64_t smem_optin,
                                    int64_t max_blocks) {
  std::vector<StackTuple> r;
  for (const StackPlan& p : stack_candidates(static_cast<int>(L), B, static_cast<int>(H), static_cast<int>(G),
                                             static_cast<int>(elem), smem_optin, static_cast<int>(max_blocks))) {
    r.emplace_back(std::vector<int64_t>(p.units, p.units + p.L), p.blocks, p.smem, p.step_ns);
  }
  return r;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // sync: 0 grid barrier, 1 cluster barrier, 2 cluster barrier + distributed shared memory (Sync)
  m.def("forward", &forward, "the persistent forward kernel, emulated on the CPU", py::arg("cell"), py::arg("x"),
        py::arg("h0"), py::arg("c0"), py::arg("w"), py::arg("b_ih"), py::arg("b_hh"), py::arg("batch_sizes"),
        py::arg("B"), py::arg("reverse"), py::arg("need_ws"), py::arg("units"), py::arg("chunk"),
        py::arg("sync") = 0);
  m.def("backward", &backward, "the persistent backward kernel, emulated on the CPU", py::arg("cell"),
        py::arg("grad_out"), py::arg("out"), py::arg("cs"), py::arg("ws"), py::arg("h0"), py::arg("c0"), py::arg("w"),
        py::arg("grad_hn"), py::arg("grad_cn"), py::arg("batch_sizes"), py::arg("B"), py::arg("reverse"),
        py::arg("units"), py::arg("chunk"), py::arg("sync") = 0);
  m.def("plan_candidates", &candidates, "the host's plan candidates, fastest modelled first", py::arg("rows_per_unit"),
        py::arg("K"), py::arg("B"), py::arg("H"), py::arg("elem"), py::arg("smem_optin"), py::arg("max_cluster") = 0,
        py::arg("dsmem") = true);
  m.def("stack_forward", &stack_forward, "the stacked forward kernel, emulated on the CPU", py::arg("cell"),
        py::arg("x"), py::arg("h0"), py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"),
        py::arg("B"), py::arg("units"));
  m.def("stack_plans", &stack_plans, "the host's stacked plans, fastest modelled first", py::arg("L"), py::arg("B"),
        py::arg("H"), py::arg("G"), py::arg("elem"), py::arg("smem_optin"), py::arg("max_blocks") = 16);
}
