// A tiny CPU stand-in for the parts of the CUDA runtime that csrc/cuda/attention.cu uses, so its
// kernels can run (slowly) on this GPU-less machine: tests/test_attention_cuda_emulated.py
// rewrites `kernel<<<grid, block, smem, stream>>>(args)` into `emu_launch(kernel, grid, block,
// smem, stream, args)` and `extern __shared__ float sm[];` into a pointer to the launch's shared
// buffer, then compiles the .cu with g++ and this header first on the include path.
//
// Model: one OS thread per CUDA thread of a block; blocks of a 1-D grid run one after another.
// __syncthreads is a block-wide barrier. __shfl_xor_sync exchanges through a block-wide buffer
// between two barriers, so it is only valid when every thread of the block calls it the same
// number of times (uniform control flow), which the attention kernels guarantee (and the
// emulation deadlocks rather than answering wrongly otherwise).
// Checks a GPU would do: dynamic shared memory above 48 KB needs cudaFuncSetAttribute, and the
// opt-in is capped at the 99 KB of sm_86/89. The shared buffer is filled with a NaN before every block and
// followed by a guard zone of the same NaN whose bytes must still be intact after the launch, so a
// read of shared memory nobody wrote (NaN in the results) or a write past the requested size shows up.
//
// Serial mode (emu_set_serial(1), tests/test_cross_entropy_cuda_emulated.py): one CUDA thread runs
// at a time and, between two barriers, the threads run one after the other from the highest
// threadIdx down, each until its next barrier (__syncthreads for the block, __shfl_xor_sync for its
// warp) or its end. The interleaving is thus fixed and adversarial for thread 0: a read by a low
// thread after the last barrier sees every write the higher threads make after that barrier, so a
// missing barrier (a data race) gives a wrong result every run instead of once in a while.
#pragma once
#include <algorithm>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <semaphore>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// a kernel's static shared array: one per kernel instantiation, shared by the OS threads of a
// block (blocks run one after another); not poisoned between blocks, unlike dynamic shared memory
#define __shared__ static

using std::max;
using std::min;

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx, blockIdx, blockDim, gridDim;  // 1-D launches: .x only

namespace emu {
// opt-in cap: 99 KB on sm_86/89, which run the sm_80 binary (sm_80 itself allows 163 KB)
constexpr size_t kDefaultSmem = 48 * 1024, kMaxOptIn = 99 * 1024, kGuard = 4096;
inline cudaError_t last_error = cudaSuccess;
inline std::map<const void*, size_t> smem_limit;  // per kernel, set by cudaFuncSetAttribute
inline std::barrier<>* bar = nullptr;
inline float* smem = nullptr;
inline std::vector<float> xchg;  // __shfl_xor_sync exchange, one slot per thread
// A quiet NaN with a payload no arithmetic produces: what unwritten shared memory reads as.
inline float poison() {
  const uint32_t bits = 0x7fc0dead;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
}  // namespace emu

inline cudaError_t cudaGetLastError() {
  cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || static_cast<size_t>(value) > emu::kMaxOptIn)
    return cudaErrorInvalidValue;
  emu::smem_limit[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

namespace emu {
// ---- serial mode (see the top of this file) ----
struct Serial {
  int n = 0, done = 0, block_arrived = 0;
  std::mutex mu;
  std::vector<std::unique_ptr<std::binary_semaphore>> go;  // one per thread: its turn to run
  std::vector<char> ready;                                  // runnable, not running
  std::vector<int> warp_arrived;
};
inline bool serial_mode = false;
inline Serial* sched = nullptr;
inline std::vector<long long> xchg64;

// Hands the turn to the highest ready thread; called with sched->mu held by the thread giving it up.
inline void run_next_locked() {
  for (int t = sched->n - 1; t >= 0; --t)
    if (sched->ready[t]) {
      sched->ready[t] = 0;
      sched->go[t]->release();
      return;
    }
  if (sched->done < sched->n) {
    std::fprintf(stderr, "cuda_emu: deadlock (threads wait at different barriers)\n");
    std::abort();
  }
}
inline void serial_barrier(bool warp_only) {
  const int t = static_cast<int>(threadIdx.x);
  {
    std::lock_guard<std::mutex> lk(sched->mu);
    if (warp_only) {
      const int w = t / 32, lo = w * 32, hi = std::min(sched->n, lo + 32);
      if (++sched->warp_arrived[w] == hi - lo) {
        sched->warp_arrived[w] = 0;
        for (int u = lo; u < hi; ++u) sched->ready[u] = 1;
      }
    } else if (++sched->block_arrived == sched->n) {
      sched->block_arrived = 0;
      for (int u = 0; u < sched->n; ++u) sched->ready[u] = 1;
    }
    run_next_locked();
  }
  sched->go[t]->acquire();
}
}  // namespace emu

// not inline, so the library exports it (the header goes into one translation unit per library)
extern "C" void emu_set_serial(int on) { emu::serial_mode = on != 0; }

inline void __syncthreads() {
  if (emu::serial_mode)
    emu::serial_barrier(false);
  else
    emu::bar->arrive_and_wait();
}

template <typename T>
T emu_shfl_xor(T v, int lane_mask, std::vector<T>& buf) {
  // serial mode: a warp-wide exchange (a shuffle by part of a block, e.g. `if (tid < 32)`, works);
  // concurrent mode: block-wide barriers, so every thread must call it (uniform control flow)
  auto sync = [] {
    if (emu::serial_mode)
      emu::serial_barrier(true);
    else
      emu::bar->arrive_and_wait();
  };
  buf[threadIdx.x] = v;
  sync();
  // lanes exchange within their warp of 32
  const unsigned src = (threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ static_cast<unsigned>(lane_mask));
  const T r = buf[src];
  sync();
  return r;
}
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return emu_shfl_xor(v, lane_mask, emu::xchg); }
inline long long __shfl_xor_sync(unsigned, long long v, int lane_mask) {
  return emu_shfl_xor(v, lane_mask, emu::xchg64);
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

template <typename K, typename... A>
void emu_launch_serial(K kernel, unsigned grid, int block, std::vector<float>& buf, size_t n, A... args) {
  for (unsigned b = 0; b < grid; ++b) {
    std::fill(buf.begin(), buf.begin() + n, emu::poison());
    emu::Serial s;
    s.n = block;
    for (int t = 0; t < block; ++t) s.go.push_back(std::make_unique<std::binary_semaphore>(0));
    s.ready.assign(block, 1);
    s.warp_arrived.assign((block + 31) / 32, 0);
    emu::sched = &s;
    std::vector<std::thread> threads;
    for (int t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        threadIdx.x = static_cast<unsigned>(t);
        blockIdx.x = b;
        blockDim.x = static_cast<unsigned>(block);
        gridDim.x = grid;
        s.go[t]->acquire();
        kernel(args...);
        std::lock_guard<std::mutex> lk(s.mu);
        ++s.done;
        emu::run_next_locked();
      });
    }
    {
      std::lock_guard<std::mutex> lk(s.mu);
      emu::run_next_locked();
    }
    for (auto& th : threads) th.join();
    emu::sched = nullptr;
  }
}

template <typename K, typename... A>
void emu_launch(K kernel, unsigned grid, int block, size_t smem_bytes, cudaStream_t, A... args) {
  auto it = emu::smem_limit.find(reinterpret_cast<const void*>(kernel));
  const size_t limit = it == emu::smem_limit.end() ? emu::kDefaultSmem : std::max(emu::kDefaultSmem, it->second);
  if (smem_bytes > limit || block <= 0 || block > 1024 || block % 32 != 0) {
    emu::last_error = cudaErrorInvalidValue;
    return;
  }
  const size_t n = smem_bytes / sizeof(float), guard = emu::kGuard / sizeof(float);
  std::vector<float> buf(n + guard, emu::poison());
  emu::xchg.assign(block, 0.0f);
  emu::xchg64.assign(block, 0);
  if (emu::serial_mode) {
    emu::smem = buf.data();
    emu_launch_serial(kernel, grid, block, buf, n, args...);
  } else {
  std::barrier<> bar(block);
  emu::bar = &bar;
  emu::smem = buf.data();
  std::vector<std::thread> threads;
  for (int t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      threadIdx.x = static_cast<unsigned>(t);
      blockDim.x = static_cast<unsigned>(block);
      gridDim.x = grid;
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        if (t == 0) std::fill(buf.begin(), buf.begin() + n, emu::poison());
        bar.arrive_and_wait();
        kernel(args...);
        bar.arrive_and_wait();
      }
    });
  }
  for (auto& th : threads) th.join();
  }
  const float p = emu::poison();
  for (size_t i = n; i < n + guard; ++i)  // written past the requested shared size?
    if (std::memcmp(&buf[i], &p, sizeof(float)) != 0) emu::last_error = cudaErrorLaunchFailure;
}
