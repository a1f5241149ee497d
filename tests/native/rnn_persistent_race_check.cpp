// Barrier check of the persistent recurrence's kernels (csrc/cuda/rnn_persistent.cuh): every
// cell's forward and backward kernel runs under the CPU emulation (cuda_emulation.h), plans with
// a ragged last block, several chunks of batch rows and k split across warps, packed input in
// both directions.  Built with -fsanitize=thread (tests/test_native.py), a missing
// __syncthreads or step barrier between a write and another thread's read (also a store into a
// peer block's shared memory, Sync::kClusterDsmem) is a reported data race
// (checked: deleting the forward's end-of-chunk barrier is reported).  Values are the emulation
// tests' business (tests/test_rnn_persistent.py -k emulated); this prints "0 fails" when the
// kernels ran to the end, which is all it checks itself.
#include <cstdio>
#include <random>
#include <vector>

#include "rnn_cells.h"
#include "cuda_emulation.h"  // after the host headers: it defines the CUDA keywords as macros
#include "cuda/rnn_persistent.cuh"

using namespace convrnn::persistent;

namespace {

std::mt19937 rng(1);

std::vector<float> random_values(size_t n) {
  std::normal_distribution<float> d(0.0f, 0.5f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// One layer forward then backward: H = 10, B = 11, T = 4 (packed lengths 4 4 3 3 2 2 2 1 1 1 1).
template <Kind C>
void run(const char* name, bool packed, bool reverse, int units, int chunk, Sync sync = Sync::kGrid) {
  constexpr int G = kGates<C>;
  const int H = 10, B = 11, T = 4;
  const int64_t lengths[] = {4, 4, 3, 3, 2, 2, 2, 1, 1, 1, 1};
  std::vector<int64_t> steps;  // batch_sizes then offsets
  int64_t N = int64_t(T) * B;
  if (packed) {
    std::vector<int64_t> off(T);
    steps.assign(T, 0);
    N = 0;
    for (int t = 0; t < T; ++t) {
      for (int64_t l : lengths) steps[t] += l > t;
      off[t] = N;
      N += steps[t];
    }
    steps.insert(steps.end(), off.begin(), off.end());
  }
  auto x = random_values(N * G * H), w = random_values(G * H * H), bi = random_values(G * H);
  auto bh = random_values(G * H), h0 = random_values(B * H), c0 = random_values(B * H);
  std::vector<float> out(N * H), cs(N * H), ws(N * 4 * H);
  ForwardArgs<float> f{};
  f.x = x.data();
  f.w = w.data();
  f.b_ih = bi.data();
  f.b_hh = bh.data();
  f.h0 = h0.data();
  f.c0 = c0.data();
  f.out = out.data();
  f.cs = C == Kind::kLstm ? cs.data() : nullptr;
  f.ws = C != Kind::kRnn ? ws.data() : nullptr;
  set_step_geometry(f, packed ? steps.data() : nullptr, T, B, H, units, chunk, reverse, false, sync);
  const int blocks = (H + units - 1) / units, stages = sync == Sync::kClusterDsmem ? 2 : 1;
  emu::launch(&forward_kernel<float, C>, blocks, kPThreads, smem_layout(G * units, H, chunk, 4, stages).total, f);
  auto gout = random_values(N * H), dh = random_values(B * H), dc = random_values(B * H);
  std::vector<float> g_hidden(N * G * H), g_input(N * 3 * H), acc(2 * B * H);
  BackwardArgs<float> b{};
  b.w = w.data();
  b.gout = gout.data();
  b.out = out.data();
  b.cs = f.cs;
  b.ws = f.ws;
  b.h0 = h0.data();
  b.c0 = c0.data();
  b.dh = dh.data();
  b.dc = dc.data();
  b.g_hidden = g_hidden.data();
  b.g_input = g_input.data();
  b.dh_acc = acc.data();
  b.dc_acc = acc.data() + B * H;
  set_step_geometry(b, f.steps, T, B, H, units, chunk, reverse, false, sync);
  emu::launch(&backward_kernel<float, C>, blocks, kPThreads, smem_layout(units, G * H, chunk, 4, stages).total, b);
  std::printf("%s packed=%d reverse=%d units=%d chunk=%d sync=%d: ran\n", name, packed, reverse, units, chunk,
              static_cast<int>(sync));
}

// The stacked forward: L layers (H = 10, B = 3, T = 4), ragged blocks of units[l] units.
template <Kind C>
void run_stack(const char* name, int L, std::vector<int> units) {
  constexpr int G = kGates<C>;
  const int H = 10, B = 3, T = 4;
  StackArgs<float> a{};
  auto x = random_values(int64_t(T) * B * G * H), h0 = random_values(L * B * H), c0 = random_values(L * B * H);
  std::vector<std::vector<float>> w, bias;
  for (int l = 0; l < L; ++l) {
    w.push_back(random_values(G * H * H));
    w.push_back(random_values(G * H * H));
    bias.push_back(random_values(G * H));
    bias.push_back(random_values(G * H));
  }
  for (int l = 0; l < L; ++l) {
    a.w_ih[l] = l > 0 ? w[2 * l].data() : nullptr;
    a.w_hh[l] = w[2 * l + 1].data();
    a.b_ih[l] = bias[2 * l].data();
    a.b_hh[l] = bias[2 * l + 1].data();
    a.plan.units[l] = units[l];
  }
  std::vector<float> out(T * B * H), hn(L * B * H), cn(L * B * H);
  a.x = x.data();
  a.h0 = h0.data();
  a.c0 = c0.data();
  a.out = out.data();
  a.hn = hn.data();
  a.cn = C == Kind::kLstm ? cn.data() : nullptr;
  a.T = T;
  a.B = B;
  a.H = H;
  a.plan.L = L;
  stack_geometry(a.plan, B, H, G, 4);
  emu::launch(&stack_forward_kernel<float, C>, a.plan.blocks, kPThreads, a.plan.smem, a);
  std::printf("%s stack L=%d blocks=%d: ran\n", name, L, a.plan.blocks);
}

}  // namespace

int main() {
  run<Kind::kLstm>("lstm", true, true, 3, 8);
  run<Kind::kLstm>("lstm", false, false, 4, 5);
  run<Kind::kGru>("gru", true, true, 3, 8);
  run<Kind::kGru>("gru", true, false, 10, 16);
  run<Kind::kRnn>("rnn", false, true, 3, 8);
  // the whole grid as one cluster: its barrier, and the operand through peers' shared memory
  run<Kind::kLstm>("lstm", true, false, 3, 16, Sync::kClusterDsmem);
  run<Kind::kGru>("gru", true, true, 3, 11, Sync::kClusterDsmem);
  run<Kind::kRnn>("rnn", false, false, 4, 16, Sync::kClusterDsmem);
  run<Kind::kLstm>("lstm", false, true, 3, 8, Sync::kCluster);
  // every layer of a stack in one kernel (the wavefront through peers' shared memory)
  run_stack<Kind::kLstm>("lstm", 2, {3, 2});
  run_stack<Kind::kGru>("gru", 3, {4, 5, 10});
  run_stack<Kind::kRnn>("rnn", 2, {10, 3});
  std::printf("12 checks, 0 fails\n");
  return 0;
}
