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
#pragma once
#include <algorithm>
#include <barrier>
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

using std::max;
using std::min;

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx, blockIdx;

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

inline void __syncthreads() { emu::bar->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu::xchg[threadIdx.x] = v;
  emu::bar->arrive_and_wait();
  // lanes exchange within their warp of 32
  const unsigned src = (threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ static_cast<unsigned>(lane_mask));
  const float r = emu::xchg[src];
  emu::bar->arrive_and_wait();
  return r;
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
  std::barrier<> bar(block);
  emu::bar = &bar;
  emu::smem = buf.data();
  emu::xchg.assign(block, 0.0f);
  std::vector<std::thread> threads;
  for (int t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      threadIdx.x = static_cast<unsigned>(t);
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
  const float p = emu::poison();
  for (size_t i = n; i < n + guard; ++i)  // written past the requested shared size?
    if (std::memcmp(&buf[i], &p, sizeof(float)) != 0) emu::last_error = cudaErrorLaunchFailure;
}
