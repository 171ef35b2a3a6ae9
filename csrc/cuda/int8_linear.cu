// LoRA linear GEMM on an int8 (or float) frozen base, CUDA. Same structure as the Triton kernel
// (kernels/lora_linear.py): the int8 weight tile is converted (and, for dX, scaled per K) while
// it is staged in shared memory, so no dequantised copy of W exists; the per-N scale, the bias
// and the rank-(r + outliers) product U V are applied in the epilogue from registers.
// Classic 64x64 output tile, 16-deep K slices, 256 threads x (4x4) outputs, fp32 accumulation.
// Per-element maths (dequant, dtype loads) is csrc/include/fastft/int8_linear.h, shared with the
// CPU build. Compile-checked only on the CPU machines (tests/test_cuda_compile.py).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fastft/int8_linear.h"
#include "int8_linear_launchers.h"

namespace {

constexpr int BM = 64, BN = 64, BK = 16, kThreads = 256;

template <int DT>
__device__ __forceinline__ float ld(const void* p, int64_t i) { return fastft::load_as_float(p, DT, i); }

template <int DT>
__device__ __forceinline__ void st(void* p, int64_t i, float v) {
  if (DT == fastft::kFloat32) static_cast<float*>(p)[i] = v;
  else if (DT == fastft::kBFloat16) static_cast<uint16_t*>(p)[i] = fastft::float_to_bf16(v);
  else static_cast<__half*>(p)[i] = __float2half_rn(v);
}

template <int DT, bool INT8, bool SCALE_ON_K>
__global__ void __launch_bounds__(kThreads) lora_mm_kernel(
    const void* __restrict__ a, const void* __restrict__ b, int64_t sbk, int64_t sbn, const void* __restrict__ scale,
    int sdt, const void* __restrict__ u, int64_t k2, const void* __restrict__ v, int64_t svk, int64_t svn,
    const void* __restrict__ bias, void* __restrict__ c, int64_t M, int64_t N, int64_t K) {
  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[BK][BN + 1];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    for (int t = tid; t < BM * BK; t += kThreads) {  // A tile (BM x BK) -> As[k][m]
      const int r = t / BK, kk = t % BK;
      const int64_t m = m0 + r, k = k0 + kk;
      As[kk][r] = (m < M && k < K) ? ld<DT>(a, m * K + k) : 0.f;
    }
    for (int t = tid; t < BK * BN; t += kThreads) {  // B tile (BK x BN), dequantised on the way in
      const int kk = t / BN, cn = t % BN;
      const int64_t k = k0 + kk, n = n0 + cn;
      float val = 0.f;
      if (k < K && n < N) {
        const int64_t off = k * sbk + n * sbn;
        if (INT8) {
          val = fastft::int8_dequant(static_cast<const int8_t*>(b)[off],
                                     SCALE_ON_K ? fastft::load_as_float(scale, sdt, k) : 1.f);
        } else {
          val = ld<DT>(b, off);
        }
      }
      Bs[kk][cn] = val;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float ar[4], br[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) ar[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) br[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n >= N) continue;
      float y = acc[i][j];
      if (INT8 && !SCALE_ON_K) y *= fastft::load_as_float(scale, sdt, n);
      if (bias) y += ld<DT>(bias, n);
      for (int64_t q = 0; q < k2; ++q) y = fmaf(ld<DT>(u, m * k2 + q), ld<DT>(v, q * svk + n * svn), y);
      st<DT>(c, m * N + n, y);
    }
  }
}

template <int DT>
int launch(uintptr_t a, uintptr_t b, int b_is_int8, int64_t sbk, int64_t sbn, uintptr_t scale, int sdt, int scale_on_k,
           uintptr_t u, int64_t k2, uintptr_t v, int64_t svk, int64_t svn, uintptr_t bias, uintptr_t c, int64_t M,
           int64_t N, int64_t K, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>((N + BN - 1) / BN), static_cast<unsigned>((M + BM - 1) / BM));
  const void* ap = reinterpret_cast<const void*>(a);
  const void* bp = reinterpret_cast<const void*>(b);
  const void* sp = reinterpret_cast<const void*>(scale);
  const void* up = reinterpret_cast<const void*>(u);
  const void* vp = reinterpret_cast<const void*>(v);
  const void* biasp = reinterpret_cast<const void*>(bias);
  void* cp = reinterpret_cast<void*>(c);
  if (!u) k2 = 0;
  if (b_is_int8 && scale_on_k)
    lora_mm_kernel<DT, true, true><<<grid, kThreads, 0, st>>>(ap, bp, sbk, sbn, sp, sdt, up, k2, vp, svk, svn, biasp, cp, M, N, K);
  else if (b_is_int8)
    lora_mm_kernel<DT, true, false><<<grid, kThreads, 0, st>>>(ap, bp, sbk, sbn, sp, sdt, up, k2, vp, svk, svn, biasp, cp, M, N, K);
  else
    lora_mm_kernel<DT, false, false><<<grid, kThreads, 0, st>>>(ap, bp, sbk, sbn, sp, sdt, up, k2, vp, svk, svn, biasp, cp, M, N, K);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int fastft_cuda_int8_lora_mm(uintptr_t a, uintptr_t b, int b_is_int8, int64_t sbk, int64_t sbn,
                                        uintptr_t scale, int sdt, int scale_on_k, uintptr_t u, int64_t k2,
                                        uintptr_t v, int64_t svk, int64_t svn, uintptr_t bias, uintptr_t c,
                                        int64_t M, int64_t N, int64_t K, int dt, uintptr_t stream) {
  if (M == 0 || N == 0) return 0;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dt) {
    case fastft::kFloat32:
      return launch<fastft::kFloat32>(a, b, b_is_int8, sbk, sbn, scale, sdt, scale_on_k, u, k2, v, svk, svn, bias, c, M, N, K, st);
    case fastft::kBFloat16:
      return launch<fastft::kBFloat16>(a, b, b_is_int8, sbk, sbn, scale, sdt, scale_on_k, u, k2, v, svk, svn, bias, c, M, N, K, st);
    case fastft::kFloat16:
      return launch<fastft::kFloat16>(a, b, b_is_int8, sbk, sbn, scale, sdt, scale_on_k, u, k2, v, svk, svn, bias, c, M, N, K, st);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
