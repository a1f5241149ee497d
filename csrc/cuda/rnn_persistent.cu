// Persistent recurrence: every step of one layer and direction of an LSTM, GRU or vanilla RNN
// in ONE persistent kernel, forward and backward (on by default: csrc/rnn_persistent.h).
//
// What it computes: the recurrent part of rnn_layers.cpp's lstm_layer / gru_layer / rnn_layer
// and of their backward ops: the same inputs, the same saved tensors (so either backward runs
// after either forward), the gate formulas of rnn_cells.h.  The input projections (one GEMM
// before the forward) and the weight gradients (one GEMM after the backward) stay cuBLAS's.
//
//   forward,  step k:  gates = x_proj[t] + h_prev W_hh^T (+ biases); cell; out[t] (cs[t], ws[t])
//   backward, step k:  dh = g[step after] W_hh (+ the cell's direct term); cell backward; g[t]
//
// How the work is split:
//  - block i owns hidden units [i U, i U + U) (the last block may own fewer) and stages, once
//    for all steps, the W_hh entries those units need in shared memory:
//      forward:  the G gate rows of each unit: G U rows of H          (gates[b][g H + u])
//      backward: the column of each unit: U rows of G H (W_hh^T rows)  (dh[b][u])
//  - per step every block stages the step's whole left operand (the h rows the step reads, or
//    the gate gradients of the step processed before) from L2 into shared memory, a chunk of
//    batch rows at a time; computes its outputs' dot products (below); applies the cell to its
//    own units and writes them; then one barrier ends the step: grid-wide (cooperative groups),
//    or, where the grid is small enough to be one thread-block cluster (sm_90+, <= 16 blocks:
//    small H, e.g. generation at batch 1), the cluster's hardware barrier, with the step's
//    results stored straight into every block's shared memory (rnn_persistent.cuh: Sync).
//    Data written by other blocks earlier in the kernel is read with ld.global.cg (L2, never a
//    stale L1 line); every row of out/cs/g is written once, so no step overwrites what another
//    block may still be reading.
//  - dot products: a warp takes a tile of kTR W rows x kTB batch rows and a range of k; lane l
//    takes k = l, l + 32, ... (consecutive lanes read consecutive shared-memory words: no bank
//    conflicts) and a butterfly reduce-scatter leaves the tile's 32 sums one per lane.  Where
//    the tiles are fewer than the warps, k is split into ranges whose sums are added afterwards
//    in a fixed order.  Every sum has a fixed order: results are deterministic.
//  - the grid: the host picks U (and grid or cluster) among powers of two by a per-step time
//    model (barrier, L2 staging, products) among the sizes whose slices fit in shared memory and
//    whose grid is co-resident (occupancy query) or cluster placeable (cluster occupancy query);
//    none fits: it declines and rnn_layers.cpp runs its loop.
//
// Inference of a unidirectional stack at a small batch has a third kernel: every layer at once
// in one cluster, as a wavefront (rnn_persistent.cuh: stack_forward_kernel; persistent_stack_forward
// below; convrnn::rnn_stack in rnn_layers.cpp calls it).
//
// The kernels and their device helpers are in rnn_persistent.cuh (so that tests/native can run
// them on the CPU); this file has the host side: the plan (grid and chunk sizes) and the launch.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda/launch.cuh"
#include "cuda/rnn_persistent.cuh"
#include "rnn_persistent.h"

namespace convrnn {
namespace {

using at::Tensor;
using namespace persistent;

// ---- host: plan and launch ----

int gates_of(RnnCell c) {
  return c == RnnCell::kLstm ? 4 : (c == RnnCell::kGru ? 3 : 1);
}

// Blocks of `kernel` that fit on one SM with `smem` dynamic shared memory (cached: the
// attribute call and the query cost microseconds, and a layer calls this per launch).
int blocks_per_sm(const void* kernel, int device, int64_t smem, int64_t smem_optin) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int64_t>, int> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, smem);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  // Allow the most the device allows once (also what the launch needs, smem <= optin).
  const auto attr_key = std::make_tuple(kernel, device, int64_t(-1));
  if (cache.find(attr_key) == cache.end()) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_optin)));
    cache[attr_key] = 0;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kPThreads, static_cast<size_t>(smem)));
  cache[key] = n;
  return n;
}

// CONVRNN_PERSISTENT_CLUSTER: 0 never a thread-block cluster, 1 clusters with the operand
// staged from L2, unset or 2 clusters with it exchanged through distributed shared memory too.
// Read per call, so that a benchmark can compare them in one process.
int cluster_mode() {
  const char* v = std::getenv("CONVRNN_PERSISTENT_CLUSTER");
  if (v == nullptr || *v == '\0') return 2;
  return std::clamp(std::atoi(v), 0, 2);
}

// Whether `blocks` blocks of `kernel` with `smem` bytes each can run as one cluster on `device`
// (cached; false where the runtime says no or the query fails).
bool cluster_fits(const void* kernel, int device, int blocks, int64_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int64_t>, bool> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, blocks, smem);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  bool fits = false;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(kPThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = blocks;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int n = 0;
    fits = cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) == cudaSuccess && n >= 1;
  }
  (void)cudaGetLastError();  // a refused attribute or query is an answer (no), not an error to keep
  cache[key] = fits;
  return fits;
}

// The first of plan_candidates (rnn_persistent.cuh: fastest modelled first) that can run: a grid
// whose blocks are all co-resident on the device, or a cluster the device can place (sm_90+, at
// most 16 blocks).  blocks == 0: none can.
Plan choose_plan(const void* kernel, int device, int rows_per_unit, int K, int64_t B, int H, int elem) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  const int64_t optin = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  const int mode = prop->major >= 9 ? cluster_mode() : 0;
  for (const Plan& p : plan_candidates(rows_per_unit, K, B, H, elem, optin, mode > 0 ? 16 : 0, mode == 2)) {
    // (blocks_per_sm also raises the kernel's dynamic shared-memory limit, which the cluster query needs)
    const int per_sm = blocks_per_sm(kernel, device, p.smem, optin);
    if (p.sync == Sync::kGrid ? int64_t(per_sm) * prop->multiProcessorCount >= p.blocks
                              : per_sm >= 1 && cluster_fits(kernel, device, p.blocks, p.smem)) {
      return p;
    }
  }
  return Plan{};
}

// batch_sizes then offsets as an int64 device tensor (packed input), or undefined.
Tensor upload_steps(const PersistentLayer& l, const at::Device& device) {
  if (l.bs == nullptr) return Tensor();
  Tensor host = at::empty({2 * l.T}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.mutable_data_ptr<int64_t>();
  std::copy(l.bs->begin(), l.bs->end(), h);
  std::copy(l.off->begin(), l.off->end(), h + l.T);
  return host.to(device, /*non_blocking=*/true);
}

template <typename T>
const T* ptr_of(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_ptr_of(Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// The dtypes the kernels are instantiated for (dispatch below).
bool instantiated(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

// What every launch needs: a layer with steps, a dtype we instantiate, int-sized dims and a
// device that launches cooperative kernels.
bool served(const PersistentLayer& l, const Tensor& x) {
  if (!x.is_cuda() || l.T < 1 || l.B < 1 || l.H < 1 || !instantiated(x.scalar_type())) return false;
  if (int64_t(gates_of(l.cell)) * l.H * 4 > std::numeric_limits<int>::max()) return false;
  return at::cuda::getDeviceProperties(x.get_device())->cooperativeLaunch != 0;
}

// Calls f(T*{}, integral_constant<Kind>{}) for the dtype and cell (dtypes: `served` checked).
template <typename F>
void dispatch(at::ScalarType st, RnnCell cell, F&& f) {
  auto by_cell = [&](auto tag) {
    switch (cell) {
      case RnnCell::kLstm: f(tag, std::integral_constant<Kind, Kind::kLstm>{}); break;
      case RnnCell::kGru: f(tag, std::integral_constant<Kind, Kind::kGru>{}); break;
      default: f(tag, std::integral_constant<Kind, Kind::kRnn>{}); break;
    }
  };
  if (st == at::kFloat) {
    by_cell(static_cast<float*>(nullptr));
  } else if (st == at::kHalf) {
    by_cell(static_cast<c10::Half*>(nullptr));
  } else {
    by_cell(static_cast<c10::BFloat16*>(nullptr));
  }
}

template <typename Args>
void launch(const void* kernel, const Plan& plan, Args& args, cudaStream_t stream) {
  void* params[] = {&args};
  if (plan.sync == Sync::kGrid) {
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kPThreads), params,
                                               static_cast<size_t>(plan.smem), stream));
  } else {  // the whole grid as one cluster
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(plan.blocks);
    cfg.blockDim = dim3(kPThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(plan.smem);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = plan.blocks;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelExC(&cfg, kernel, params));
  }
  note_persistent_launch(static_cast<int>(plan.sync));
}

// set_step_geometry from the layer and the plan.
template <typename Args>
void set_geometry(Args& a, const PersistentLayer& l, const Plan& plan, const Tensor& steps, int H) {
  set_step_geometry(a, steps.defined() ? steps.const_data_ptr<int64_t>() : nullptr, l.T, l.B, H, plan.units,
                    plan.chunk, l.reverse, l.cell == RnnCell::kRelu, plan.sync);
}

}  // namespace

bool persistent_forward(const PersistentLayer& l, const Tensor& x, Tensor& out, Tensor& cs, Tensor& ws) {
  if (!served(l, x)) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device(), H = static_cast<int>(l.H), G = gates_of(l.cell);
  bool launched = false;
  dispatch(x.scalar_type(), l.cell, [&](auto tag, auto cell) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr Kind C = decltype(cell)::value;
    const void* kernel = reinterpret_cast<const void*>(&forward_kernel<T, C>);
    const Plan plan = choose_plan(kernel, device, G, H, l.B, H, sizeof(T));
    if (plan.blocks == 0) return;
    const Tensor steps = upload_steps(l, x.device());
    ForwardArgs<T> a{};
    a.x = x.const_data_ptr<T>();
    a.w = l.w_hh.const_data_ptr<T>();
    a.b_ih = bias_data<T>(l.b_ih);
    a.b_hh = bias_data<T>(l.b_hh);
    a.h0 = l.h0.const_data_ptr<T>();
    a.c0 = ptr_of<T>(l.c0);
    a.out = out.mutable_data_ptr<T>();
    a.cs = mutable_ptr_of<T>(cs);
    a.ws = mutable_ptr_of<T>(ws);
    set_geometry(a, l, plan, steps, H);
    a.vec = (int64_t(H) * sizeof(T)) % 16 == 0 && aligned16(a.out) && aligned16(a.h0);
    launch(kernel, plan, a, at::cuda::getCurrentCUDAStream());
    launched = true;
  });
  return launched;
}

bool persistent_stack_forward(const PersistentStack& s, const Tensor& x, Tensor& out, Tensor& hn, Tensor& cn) {
  const int L = static_cast<int>(s.w_hh.size()), G = gates_of(s.cell);
  const auto st = x.scalar_type();
  if (!x.is_cuda() || s.T < 1 || s.B < 1 || s.B > kStackMaxBatch || s.H < 1 || L < 2 || L > kMaxStack) {
    return false;
  }
  if (!instantiated(st)) return false;
  if (s.B * s.H * L > std::numeric_limits<int>::max() / 4) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device(), H = static_cast<int>(s.H);
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  // one cluster exchanging h through distributed shared memory (sm_90+), or nothing
  if (prop->major < 9 || cluster_mode() != 2) return false;
  const int64_t optin = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  bool launched = false;
  dispatch(st, s.cell, [&](auto tag, auto cell) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr Kind C = decltype(cell)::value;
    const void* kernel = reinterpret_cast<const void*>(&stack_forward_kernel<T, C>);
    StackPlan plan;
    for (const StackPlan& p : stack_candidates(L, s.B, H, G, sizeof(T), optin, 16)) {
      if (blocks_per_sm(kernel, device, p.smem, optin) >= 1 && cluster_fits(kernel, device, p.blocks, p.smem)) {
        plan = p;
        break;
      }
    }
    if (plan.blocks == 0) return;
    StackArgs<T> a{};
    a.x = x.const_data_ptr<T>();
    for (int l = 0; l < L; ++l) {
      a.w_ih[l] = l > 0 ? s.w_ih[l - 1].const_data_ptr<T>() : nullptr;
      a.w_hh[l] = s.w_hh[l].const_data_ptr<T>();
      a.b_ih[l] = bias_data<T>(s.b_ih[l]);
      a.b_hh[l] = bias_data<T>(s.b_hh[l]);
    }
    a.h0 = s.h0.const_data_ptr<T>();
    a.c0 = ptr_of<T>(s.c0);
    a.out = out.mutable_data_ptr<T>();
    a.hn = hn.mutable_data_ptr<T>();
    a.cn = mutable_ptr_of<T>(cn);
    a.T = s.T;
    a.B = s.B;
    a.H = H;
    a.relu = s.cell == RnnCell::kRelu;
    a.plan = plan;
    Plan grid;  // the launch's terms: the whole grid as one cluster
    grid.blocks = plan.blocks;
    grid.smem = plan.smem;
    grid.sync = Sync::kClusterDsmem;
    launch(kernel, grid, a, at::cuda::getCurrentCUDAStream());
    note_persistent_stack_launch();
    launched = true;
  });
  return launched;
}

bool persistent_backward(const PersistentLayer& l, const Tensor& grad_out, const Tensor& out, const Tensor& cs,
                         const Tensor& ws, Tensor& dh, Tensor& dc, Tensor& g_hidden, Tensor& g_input) {
  if (!served(l, out)) return false;
  const c10::cuda::CUDAGuard guard(out.device());
  const int device = out.get_device(), H = static_cast<int>(l.H), G = gates_of(l.cell);
  bool launched = false;
  dispatch(out.scalar_type(), l.cell, [&](auto tag, auto cell) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr Kind C = decltype(cell)::value;
    const void* kernel = reinterpret_cast<const void*>(&backward_kernel<T, C>);
    const Plan plan = choose_plan(kernel, device, 1, G * H, l.B, H, sizeof(T));
    if (plan.blocks == 0) return;
    const Tensor steps = upload_steps(l, out.device());
    Tensor acc = at::empty({C == Kind::kLstm ? 2 : 1, l.B, l.H}, out.options().dtype(at::kFloat));
    BackwardArgs<T> a{};
    a.w = l.w_hh.const_data_ptr<T>();
    a.gout = ptr_of<T>(grad_out);
    a.out = out.const_data_ptr<T>();
    a.cs = ptr_of<T>(cs);
    a.ws = ptr_of<T>(ws);
    a.h0 = l.h0.const_data_ptr<T>();
    a.c0 = ptr_of<T>(l.c0);
    a.dh = dh.mutable_data_ptr<T>();
    a.dc = mutable_ptr_of<T>(dc);
    a.g_hidden = g_hidden.mutable_data_ptr<T>();
    a.g_input = mutable_ptr_of<T>(g_input);
    a.dh_acc = acc.mutable_data_ptr<float>();
    a.dc_acc = C == Kind::kLstm ? a.dh_acc + l.B * l.H : nullptr;
    set_geometry(a, l, plan, steps, H);
    a.vec = (int64_t(G) * H * sizeof(T)) % 16 == 0 && aligned16(a.g_hidden);
    launch(kernel, plan, a, at::cuda::getCurrentCUDAStream());
    launched = true;
  });
  return launched;
}

}  // namespace convrnn
