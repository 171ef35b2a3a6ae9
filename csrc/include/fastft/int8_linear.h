// Per-element maths of the int8 LoRA linear (fastft/ops/lora_linear.py), shared by the CPU
// (csrc/cpu/int8_linear.cpp) and CUDA (csrc/cuda/int8_linear.cu) builds.
//
// W[o, j] ~= q[o, j] * scale[o]: symmetric per-output-channel absmax quantisation, q in
// [-127, 127]. Dequantisation is one fp32 multiply, rounded once into the GEMM dtype, exactly
// as the torch path (q.float() * scale.float()).to(dtype) does, so every backend sees the same
// tile values.
#pragma once
#include <cstdint>

#include "fastft/common.h"

namespace fastft {

FASTFT_HD float int8_dequant(int8_t q, float scale) { return static_cast<float>(q) * scale; }

// IEEE half -> fp32 by bit manipulation (exact; the outlier columns of an fp32/fp16 weight are fp16).
FASTFT_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    float f = static_cast<float>(mant) * 5.9604644775390625e-08f;
    memcpy(&bits, &f, sizeof(bits));
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float out;
  memcpy(&out, &bits, sizeof(out));
  return out;
}

// Element i of a float array of dtype code `dt` (kFloat32 / kBFloat16 / kFloat16), as fp32.
FASTFT_HD float load_as_float(const void* p, int dt, int64_t i) {
  if (dt == kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  if (dt == kFloat16) return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

}  // namespace fastft
