// A small CUDA emulation for running kernel source on the CPU: a std::thread per CUDA thread,
// a barrier per block for __syncthreads, one for the grid for cooperative_groups' grid.sync()
// (and for the cluster barrier, the grid being one cluster; cluster_peer maps shared memory),
// a per-warp exchange for __shfl_xor_sync and barrier for __syncwarp, __ldcg as a plain load,
// float fma as the host's fused multiply-add, and NaN-filled (0xFF bytes) dynamic shared
// memory.  Static `__shared__` arrays become function statics, shared by every thread of the
// process: kernels that declare them run one block at a time (emu::launch_blocks_in_turn).
// Enough for csrc/cuda/rnn_persistent.cuh and the conv2d GEMM kernels (with wmma_emulation.h);
// include it after the project's host headers and cuda_fp16.h / cuda_bf16.h (it defines
// __global__, __device__, ... as macros) and before the kernels.  For checking index logic and barrier placement (under -fsanitize=thread a missing
// barrier is a reported data race), not timing or the GPU memory model.
#pragma once

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))  // GNU: also after `static` (see __shared__)
#define __shared__ static

#if !defined(__VECTOR_TYPES_H__)  // not from cuda_fp16.h's vector_types.h
struct uint4 {
  unsigned int x, y, z, w;
};
#endif

namespace emu {

// A reusable barrier for n threads (C++17 has no std::barrier).  The emulation runs far more
// threads than cores (a 256-thread block is 256 threads), so a barrier's cost is the wake-ups:
// with C++20's atomic wait the last arrival bumps a generation word and wakes its waiters on it
// (a futex on Linux), after a few yields that let an almost-complete barrier finish without
// sleeping.  A mutex and condition variable (the fallback) wakes them all onto the mutex one after
// the other: 256 threads x 200 barriers took 1.04 s that way against 0.11 s, a 32-thread warp
// barrier 3-4x longer (2-core machine).  The arrivals and the generation are acquire-release
// atomics: what a thread wrote before the barrier happens before what any thread reads after it,
// so ThreadSanitizer still reports only a missing barrier.
#if defined(__cpp_lib_atomic_wait)
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      generation_.notify_all();
      return;
    }
    for (int i = 0; i < kSpins; ++i) {
      if (generation_.load(std::memory_order_acquire) != generation) return;
      std::this_thread::yield();
    }
    while (generation_.load(std::memory_order_acquire) == generation) {
      generation_.wait(generation, std::memory_order_acquire);
    }
  }

 private:
  static constexpr int kSpins = 4;
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<uint32_t> generation_{0};
};
#else
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t generation = generation_;
    if (++count_ == n_) {
      count_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  uint64_t generation_ = 0;
};
#endif

struct Block {
  Block(int threads, size_t smem_bytes) : bar(threads), smem(smem_bytes + 16, 0xFF), shuffle(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(new Barrier(32));
  }
  unsigned char* shared() {  // 16-byte aligned, NaN-filled (0xFF bytes: NaN in every float type)
    return smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
  }
  Barrier bar;
  std::vector<unsigned char> smem;
  std::vector<double> shuffle;  // exact for float and double values
  std::vector<std::unique_ptr<Barrier>> warps;
};

struct Context {
  Block* block = nullptr;
  Barrier* grid = nullptr;
  std::vector<std::unique_ptr<Block>>* blocks = nullptr;  // the grid's blocks (one cluster)
};
inline thread_local Context ctx;

struct Dim {
  unsigned int x = 0, y = 0, z = 0;
};

}  // namespace emu

inline thread_local emu::Dim threadIdx, blockIdx;
inline emu::Dim blockDim, gridDim;

inline void __syncthreads() {
  emu::ctx.block->bar.wait();
}

namespace emu {
// Every lane of the calling thread's warp posts v and reads the value of lane source(lane)
// (exact for float and double through the double buffer); the two warp barriers make it a
// shuffle.
template <typename T, typename Source>
inline T warp_exchange(T v, Source source) {
  Block& b = *ctx.block;
  const int t = static_cast<int>(threadIdx.x);
  b.shuffle[t] = static_cast<double>(v);
  b.warps[t / 32]->wait();
  const T r = static_cast<T>(b.shuffle[(t & ~31) | source(t & 31)]);
  b.warps[t / 32]->wait();
  return r;
}
}  // namespace emu

template <typename T>
inline T __shfl_xor_sync(unsigned int, T v, int lane_mask) {
  return emu::warp_exchange(v, [lane_mask](int lane) { return lane ^ lane_mask; });
}

inline void __syncwarp(unsigned int = 0xffffffffu) {
  emu::ctx.block->warps[threadIdx.x / 32]->wait();
}

using std::fma;  // the float overload, as CUDA's fma(float, float, float)

template <typename T>
inline T __shfl_down_sync(unsigned int, T v, int delta) {
  return emu::warp_exchange(v, [delta](int lane) { return lane + delta < 32 ? lane + delta : lane; });
}

template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

inline int min(int a, int b) {
  return a < b ? a : b;
}
inline int max(int a, int b) {
  return a > b ? a : b;
}
inline int64_t min(int64_t a, int64_t b) {
  return a < b ? a : b;
}
inline int64_t max(int64_t a, int64_t b) {
  return a > b ? a : b;
}

namespace cooperative_groups {
struct grid_group {
  void sync() { emu::ctx.grid->wait(); }
};
inline grid_group this_grid() {
  return {};
}
}  // namespace cooperative_groups

// The whole grid as one thread-block cluster: its barrier is the grid's, and a shared-memory
// address maps to the same offset in another block's shared memory.
inline void cluster_sync() {
  emu::ctx.grid->wait();
}

template <typename T>
inline T* cluster_peer(T* p, int rank) {
  unsigned char* own = emu::ctx.block->shared();
  const std::ptrdiff_t offset = reinterpret_cast<unsigned char*>(p) - own;
  return reinterpret_cast<T*>((*emu::ctx.blocks)[rank]->shared() + offset);
}

#define CONVRNN_PERSISTENT_SMEM(name) unsigned char* name = emu::ctx.block->shared()

namespace emu {

// Runs kernel(args) on blocks x threads CPU threads with smem bytes of shared memory a block.
template <typename Args>
void launch(void (*kernel)(Args), int blocks, int threads, int64_t smem, const Args& args) {
  Barrier grid(blocks * threads);
  std::vector<std::unique_ptr<Block>> block;
  for (int b = 0; b < blocks; ++b) block.emplace_back(new Block(threads, static_cast<size_t>(smem)));
  std::vector<std::thread> pool;
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        ctx.block = block[b].get();
        ctx.grid = &grid;
        ctx.blocks = &block;
        blockIdx.x = b;
        threadIdx.x = t;
        kernel(args);
      });
    }
  }
  for (auto& th : pool) th.join();
}

// One block's worth of threads kept for every launch of that block size: the checks make
// thousands of small launches, and starting a block's 128-256 threads for each took most of their
// run time (conv2d_gemm_check: 52 s on 2 cores, 74 s of it system time).  run(job) has every
// worker call job() as thread threadIdx.x of the pool's block and returns when all are done; the
// two barriers around it order the launcher's writes before the job and the job's after it.
class BlockPool {
 public:
  explicit BlockPool(int threads) : block_(threads, 0), start_(threads + 1), done_(threads + 1) {
    for (int t = 0; t < threads; ++t) {
      workers_.emplace_back([this, t] {
        ctx.block = &block_;
        threadIdx.x = static_cast<unsigned int>(t);
        for (;;) {
          start_.wait();
          if (job_ == nullptr) return;
          (*job_)();
          done_.wait();
        }
      });
    }
  }
  ~BlockPool() {
    job_ = nullptr;
    start_.wait();
    for (auto& w : workers_) w.join();
  }
  Block& block() { return block_; }
  void run(const std::function<void()>& job) {
    job_ = &job;
    start_.wait();
    done_.wait();
  }

 private:
  Block block_;
  Barrier start_, done_;
  const std::function<void()>* job_ = nullptr;
  std::vector<std::thread> workers_;
};

inline BlockPool& block_pool(int threads) {
  static std::map<int, std::unique_ptr<BlockPool>> pools;  // joined at exit
  auto& p = pools[threads];
  if (!p) p.reset(new BlockPool(threads));
  return *p;
}

// Runs kernel(args...) one block at a time (kernels with static __shared__ arrays): the block's
// threads take the blocks in turn, meeting at the block barrier after each; blockDim and
// gridDim are set for kernels that read them.  From the launching thread only.
template <typename... Args>
void launch_blocks_in_turn(void (*kernel)(Args...), int64_t blocks, int threads, Args... args) {
  blockDim.x = static_cast<unsigned int>(threads);
  gridDim.x = static_cast<unsigned int>(blocks);
  BlockPool& pool = block_pool(threads);
  pool.run([&] {
    for (int64_t b = 0; b < blocks; ++b) {
      blockIdx.x = static_cast<unsigned int>(b);
      kernel(args...);
      pool.block().bar.wait();  // every thread is done with the shared arrays before the next block
    }
  });
}

}  // namespace emu
