// Per-chunk softmax / loss / gradient pass of the fused linear cross-entropy on CUDA.
// One block per row: sweep 1 computes the max (block reduction), sweep 2 the sum-exp, the sum of
// the capped logits and the first argmax, sweep 3 overwrites the logits with the gradient.
// The logits GEMMs are cuBLAS calls made by fastft/ops/fused_linear_cross_entropy.py; the
// per-element maths is csrc/include/fastft/cross_entropy.h (shared with the CPU build).
// A label outside [0, V) gives a NaN loss (fastft/ops/fused_linear_cross_entropy.py checks labels
// on the device first and raises at the next check_labels(); the CPU path raises at once).
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>

#include "cross_entropy_launchers.h"
#include "fastft/adamw.h"  // Elem<>
#include "fastft/cross_entropy.h"

namespace {

using fastft::CEParams;
using fastft::CERowCoef;
using fastft::Elem;

constexpr int kThreads = 512;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ long long warp_min(long long v) {
  for (int o = 16; o > 0; o >>= 1) {
    long long w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}

// Block-wide reductions through shared memory; every thread gets the result.
__device__ float block_max(float v, float* sh) {
  v = warp_max(v);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? sh[threadIdx.x] : -FLT_MAX;
  if (threadIdx.x < 32) v = warp_max(v);
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  v = sh[0];
  __syncthreads();
  return v;
}
__device__ float block_sum(float v, float* sh) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? sh[threadIdx.x] : 0.0f;
  if (threadIdx.x < 32) v = warp_sum(v);
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  v = sh[0];
  __syncthreads();
  return v;
}
__device__ long long block_min(long long v, long long* sh) {
  v = warp_min(v);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? sh[threadIdx.x] : LLONG_MAX;
  if (threadIdx.x < 32) v = warp_min(v);
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  v = sh[0];
  __syncthreads();
  return v;
}

template <int DT, bool CAP>
__global__ void __launch_bounds__(kThreads)
ce_chunk_kernel(typename Elem<DT>::T* __restrict__ buf, int64_t V, int64_t ld,
                const int64_t* __restrict__ labels, const float* __restrict__ scale,
                float* __restrict__ loss, float* __restrict__ zterm, uint8_t* __restrict__ correct,
                CEParams p, bool write_grad) {
  using E = Elem<DT>;
  __shared__ float shf[kThreads / 32];
  __shared__ long long shi[kThreads / 32];
  const int64_t row = blockIdx.x;
  auto* x = buf + row * ld;
  const int64_t y = labels[row];
  // The label's logit is read here, before the first barrier: sweep 3 overwrites the row in place,
  // and a read after the last barrier raced the warp that owns x[y] (it could already hold the
  // gradient). A label outside [0, V) reads nothing and gives a NaN loss (the op wrapper checks
  // labels on the device and never passes one; no __trap, which would poison the CUDA context).
  const bool y_ok = y >= 0 && y < V;
  const float x_label = y_ok ? E::load(x, y) : __int_as_float(0x7fc00000);
  float mx = -FLT_MAX;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, E::load(x, j));
  mx = block_max(mx, shf);
  const float zmax = CAP ? fastft::ce_capped(mx, p) : mx;
  float s = 0.0f, sz = 0.0f;
  long long am = V;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    float v = E::load(x, j);
    float z = CAP ? fastft::ce_capped(v, p) : v;
    s += fastft::ce_exp(z - zmax);
    sz += z;
    if (v == mx && j < am) am = j;
  }
  s = block_sum(s, shf);
  sz = block_sum(sz, shf);
  am = block_min(am, shi);
  const float lse = zmax + logf(s);
  const float z_label = CAP ? fastft::ce_capped(x_label, p) : x_label;
  if (threadIdx.x == 0) {
    loss[row] = fastft::ce_row_loss(lse, z_label, sz, p);
    zterm[row] = p.z_loss * lse * lse;
    correct[row] = am == y ? 1 : 0;
  }
  if (!write_grad) return;
  const CERowCoef k = fastft::ce_row_coef(lse, scale[row], p);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    float v = E::load(x, j);
    float z = CAP ? fastft::ce_capped(v, p) : v;
    float g = j == y ? fastft::ce_grad_label(z, k, p) : fastft::ce_grad<CAP>(z, k, p);
    E::store(x, j, g);
  }
}

template <int DT>
int launch(uintptr_t buf, int64_t rows, int64_t V, int64_t ld, uintptr_t labels, uintptr_t scale,
           uintptr_t loss, uintptr_t zterm, uintptr_t correct, const CEParams& p, bool wg,
           cudaStream_t st) {
  auto* b = reinterpret_cast<typename Elem<DT>::T*>(buf);
  auto* y = reinterpret_cast<const int64_t*>(labels);
  auto* sc = reinterpret_cast<const float*>(scale);
  auto* lo = reinterpret_cast<float*>(loss);
  auto* zo = reinterpret_cast<float*>(zterm);
  auto* co = reinterpret_cast<uint8_t*>(correct);
  if (p.softcap > 0.0f)
    ce_chunk_kernel<DT, true><<<static_cast<unsigned>(rows), kThreads, 0, st>>>(b, V, ld, y, sc, lo, zo, co, p, wg);
  else
    ce_chunk_kernel<DT, false><<<static_cast<unsigned>(rows), kThreads, 0, st>>>(b, V, ld, y, sc, lo, zo, co, p, wg);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int fastft_cuda_cross_entropy_chunk(uintptr_t buf, int dtype, int64_t rows, int64_t V,
                                               int64_t ld, uintptr_t labels, uintptr_t scale,
                                               uintptr_t loss, uintptr_t zterm, uintptr_t correct,
                                               float smoothing, float z_loss, float softcap,
                                               int write_grad, uintptr_t stream) {
  if (rows == 0) return 0;
  CEParams p;
  p.smoothing = smoothing;
  p.z_loss = z_loss;
  p.softcap = softcap;
  p.inv_softcap = softcap > 0.0f ? 1.0f / softcap : 0.0f;
  p.vocab = V;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const bool wg = write_grad != 0;
  switch (dtype) {
    case fastft::kFloat32: return launch<fastft::kFloat32>(buf, rows, V, ld, labels, scale, loss, zterm, correct, p, wg, st);
    case fastft::kBFloat16: return launch<fastft::kBFloat16>(buf, rows, V, ld, labels, scale, loss, zterm, correct, p, wg, st);
    case fastft::kFloat16: return launch<fastft::kFloat16>(buf, rows, V, ld, labels, scale, loss, zterm, correct, p, wg, st);
    default: return -1;
  }
}
