// Shared by the CPU (g++) and CUDA (nvcc) builds: per-element maths lives in
// FASTFT_HD inline functions so the CPU tests exercise the same code the GPU runs.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTFT_HD __host__ __device__ __forceinline__
#else
#define FASTFT_HD inline
#endif

namespace fastft {

// dtype codes passed from Python (fastft/_backend.py: DTYPE_CODES).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// bf16 <-> fp32 by bit manipulation, round-to-nearest-even (matches torch's conversion).
FASTFT_HD float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

FASTFT_HD uint16_t float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN stays NaN
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

}  // namespace fastft
