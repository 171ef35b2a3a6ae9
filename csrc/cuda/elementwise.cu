// Fused RMSNorm, SwiGLU and rotary embedding on CUDA (compile-checked here; no GPU on the build
// machine). Per-element maths: csrc/include/fastft/elementwise.h, shared with the CPU kernels.
//   RMSNorm forward: one block per row (block-wide sum of squares), y and fp32 rstd written.
//   RMSNorm backward: a grid of at most kBwdBlocks blocks, each owning rows b, b+grid, ... and one
//     fp32 row of the dweight partial buffer (summed by the host code: deterministic, no atomics).
//   SwiGLU: grid-stride elementwise.  RoPE: one block per (b*T + t, head), threads over D/2.
#include <cuda_runtime.h>

#include <cstdint>

#include "elementwise_launchers.h"
#include "fastft/elementwise.h"

namespace {

using fastft::Elem;

constexpr int kThreads = 256;
constexpr int64_t kBwdBlocks = 1024;

__device__ float block_sum(float v, float* red) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (threadIdx.x == 0) red[0] = v;
  }
  __syncthreads();
  v = red[0];
  __syncthreads();  // red is reused by the next call
  return v;
}

template <int DT>
__global__ void __launch_bounds__(kThreads)
rms_fwd_kernel(const void* xp, const void* wp, void* yp, float* rstd, int64_t n, float eps) {
  using E = Elem<DT>;
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const auto* x = static_cast<const typename E::T*>(xp) + row * n;
  const auto* w = static_cast<const typename E::T*>(wp);
  auto* y = static_cast<typename E::T*>(yp) + row * n;
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    float v = E::load(x, i);
    acc += v * v;
  }
  const float rs = fastft::rms_rstd(block_sum(acc, red), n, eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    E::store(y, i, fastft::round_to<DT>(E::load(x, i) * rs) * E::load(w, i));
}

template <int DT>
__global__ void __launch_bounds__(kThreads)
rms_bwd_kernel(const void* dyp, const void* xp, const void* wp, const float* rstd, void* dxp, float* part,
               int64_t rows, int64_t n) {
  using E = Elem<DT>;
  __shared__ float red[32];
  const auto* w = static_cast<const typename E::T*>(wp);
  float* dw = part + static_cast<int64_t>(blockIdx.x) * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dw[i] = 0.0f;
  const float inv_n = 1.0f / static_cast<float>(n);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const auto* x = static_cast<const typename E::T*>(xp) + r * n;
    const auto* dy = static_cast<const typename E::T*>(dyp) + r * n;
    auto* dx = static_cast<typename E::T*>(dxp) + r * n;
    const float rs = rstd[r];
    float dot = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {  // each thread owns its dw columns
      float nh = E::load(x, i) * rs;
      float g = E::load(dy, i);
      dw[i] += g * fastft::round_to<DT>(nh);
      dot += g * E::load(w, i) * nh;
    }
    const float c = block_sum(dot, red) * inv_n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      float nh = E::load(x, i) * rs;
      E::store(dx, i, rs * (E::load(dy, i) * E::load(w, i) - nh * c));
    }
  }
}

template <int DT>
__global__ void swiglu_fwd_kernel(const void* gp, const void* up, void* yp, int64_t n) {
  using E = Elem<DT>;
  const auto* g = static_cast<const typename E::T*>(gp);
  const auto* u = static_cast<const typename E::T*>(up);
  auto* y = static_cast<typename E::T*>(yp);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    E::store(y, i, fastft::swiglu_fwd(E::load(g, i), E::load(u, i)));
}

template <int DT>
__global__ void swiglu_bwd_kernel(const void* gp, const void* up, const void* dyp, void* dgp, void* dup, int64_t n) {
  using E = Elem<DT>;
  const auto* g = static_cast<const typename E::T*>(gp);
  const auto* u = static_cast<const typename E::T*>(up);
  const auto* dy = static_cast<const typename E::T*>(dyp);
  auto* dg = static_cast<typename E::T*>(dgp);
  auto* du = static_cast<typename E::T*>(dup);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float a, b;
    fastft::swiglu_bwd(E::load(g, i), E::load(u, i), E::load(dy, i), a, b);
    E::store(dg, i, a);
    E::store(du, i, b);
  }
}

struct RopeArgs {
  int64_t T, half;
  int64_t xs[3], ys[3], cs[2];
};

template <int DT, bool BWD>
__global__ void rope_kernel(const void* xp, void* yp, const void* cp, const void* sp, RopeArgs a) {
  using E = Elem<DT>;
  using T = typename E::T;
  const int64_t row = blockIdx.x, h = blockIdx.y;
  const int64_t b = row / a.T, t = row % a.T;
  const T* x = static_cast<const T*>(xp) + b * a.xs[0] + h * a.xs[1] + t * a.xs[2];
  T* y = static_cast<T*>(yp) + b * a.ys[0] + h * a.ys[1] + t * a.ys[2];
  const T* c = static_cast<const T*>(cp) + b * a.cs[0] + t * a.cs[1];
  const T* s = static_cast<const T*>(sp) + b * a.cs[0] + t * a.cs[1];
  for (int64_t j = threadIdx.x; j < a.half; j += blockDim.x) {
    float lo, hi;
    const int64_t k = j + a.half;
    if (BWD)
      fastft::rope_pair_bwd(E::load(x, j), E::load(x, k), E::load(c, j), E::load(s, j), E::load(c, k), E::load(s, k),
                            lo, hi);
    else
      fastft::rope_pair_fwd(E::load(x, j), E::load(x, k), E::load(c, j), E::load(s, j), E::load(c, k), E::load(s, k),
                            lo, hi);
    E::store(y, j, lo);
    E::store(y, k, hi);
  }
}

int grid_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 ? (b < 1 ? 1 : b) : 65535);
}

#define FASTFT_DT_DISPATCH(dt, ...)                 \
  switch (dt) {                                     \
    case fastft::kFloat32: { constexpr int DT = fastft::kFloat32; __VA_ARGS__; break; }   \
    case fastft::kBFloat16: { constexpr int DT = fastft::kBFloat16; __VA_ARGS__; break; } \
    default: { constexpr int DT = fastft::kFloat16; __VA_ARGS__; break; }                \
  }

}  // namespace

extern "C" int fastft_cuda_rms_norm_fwd(uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows,
                                        int64_t n, float eps, int dt, uintptr_t stream) {
  if (rows <= 0 || n <= 0) return 0;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  FASTFT_DT_DISPATCH(dt, (rms_fwd_kernel<DT><<<static_cast<unsigned>(rows), kThreads, 0, st>>>(
                              reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(w),
                              reinterpret_cast<void*>(y), reinterpret_cast<float*>(rstd), n, eps)))
  return static_cast<int>(cudaGetLastError());
}

extern "C" int64_t fastft_cuda_rms_norm_bwd_blocks(int64_t rows) {
  return rows < 1 ? 1 : (rows < kBwdBlocks ? rows : kBwdBlocks);
}

extern "C" int fastft_cuda_rms_norm_bwd(uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx,
                                        uintptr_t dw_partial, int64_t rows, int64_t n, int dt, uintptr_t stream) {
  if (n <= 0) return 0;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const unsigned blocks = static_cast<unsigned>(fastft_cuda_rms_norm_bwd_blocks(rows));
  FASTFT_DT_DISPATCH(dt, (rms_bwd_kernel<DT><<<blocks, kThreads, 0, st>>>(
                              reinterpret_cast<const void*>(dy), reinterpret_cast<const void*>(x),
                              reinterpret_cast<const void*>(w), reinterpret_cast<const float*>(rstd),
                              reinterpret_cast<void*>(dx), reinterpret_cast<float*>(dw_partial), rows, n)))
  return static_cast<int>(cudaGetLastError());
}

extern "C" int fastft_cuda_swiglu_fwd(uintptr_t g, uintptr_t u, uintptr_t y, int64_t n, int dt, uintptr_t stream) {
  if (n <= 0) return 0;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  FASTFT_DT_DISPATCH(dt, (swiglu_fwd_kernel<DT><<<grid_for(n), kThreads, 0, st>>>(
                              reinterpret_cast<const void*>(g), reinterpret_cast<const void*>(u),
                              reinterpret_cast<void*>(y), n)))
  return static_cast<int>(cudaGetLastError());
}

extern "C" int fastft_cuda_swiglu_bwd(uintptr_t g, uintptr_t u, uintptr_t dy, uintptr_t dg, uintptr_t du, int64_t n,
                                      int dt, uintptr_t stream) {
  if (n <= 0) return 0;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  FASTFT_DT_DISPATCH(dt, (swiglu_bwd_kernel<DT><<<grid_for(n), kThreads, 0, st>>>(
                              reinterpret_cast<const void*>(g), reinterpret_cast<const void*>(u),
                              reinterpret_cast<const void*>(dy), reinterpret_cast<void*>(dg),
                              reinterpret_cast<void*>(du), n)))
  return static_cast<int>(cudaGetLastError());
}

extern "C" int fastft_cuda_rope(uintptr_t x, uintptr_t y, uintptr_t c, uintptr_t s, const int64_t* shape,
                                const int64_t* xs, const int64_t* ys, const int64_t* cs, int backward, int dt,
                                uintptr_t stream) {
  const int64_t B = shape[0], H = shape[1], T = shape[2], D = shape[3];
  if (B * T <= 0 || H <= 0 || D <= 0) return 0;
  RopeArgs a{T, D / 2, {xs[0], xs[1], xs[2]}, {ys[0], ys[1], ys[2]}, {cs[0], cs[1]}};
  dim3 grid(static_cast<unsigned>(B * T), static_cast<unsigned>(H));
  const int threads = D / 2 < 128 ? 64 : 128;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const void* xp = reinterpret_cast<const void*>(x);
  void* yp = reinterpret_cast<void*>(y);
  const void* cp = reinterpret_cast<const void*>(c);
  const void* sp = reinterpret_cast<const void*>(s);
  if (backward) {
    FASTFT_DT_DISPATCH(dt, (rope_kernel<DT, true><<<grid, threads, 0, st>>>(xp, yp, cp, sp, a)))
  } else {
    FASTFT_DT_DISPATCH(dt, (rope_kernel<DT, false><<<grid, threads, 0, st>>>(xp, yp, cp, sp, a)))
  }
  return static_cast<int>(cudaGetLastError());
}
