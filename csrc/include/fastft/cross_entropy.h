// Cross-entropy per-element maths, shared by csrc/cpu/cross_entropy.cpp (g++) and
// csrc/cuda/cross_entropy.cu (nvcc). fastft/ops/fused_linear_cross_entropy.py has the formulas:
//   z = softcap ? cap * tanh(x / cap) : x;  lse = logsumexp(z);  p = exp(z - lse)
//   loss = lse - (1 - eps) z_y - eps/V sum(z) + zl lse^2
//   dz_j = scale * (p_j (1 + 2 zl lse) - eps/V - (1 - eps)[j == y]) * (softcap ? 1 - (z_j/cap)^2 : 1)
#pragma once
#include <cmath>

#include "fastft/common.h"

#if defined(__CUDACC__)
#define FASTFT_CE_HDI __host__ __device__ __forceinline__
#else
#define FASTFT_CE_HDI inline __attribute__((always_inline))
#endif

namespace fastft {

// exp(x) for x <= ~88, written so GCC vectorises it (no libm call): 2^n * p(r) with
// r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial (|rel err| < 2e-7, i.e.
// ~2 ulp, against expf: checked by tests/test_fused_linear_cross_entropy.py through the loss).
// Inputs below -87 are clamped (exp(-87) = 1.6e-38: nothing next to the softmax sum's >= 1).
// On the GPU expf is as fast and exact.
FASTFT_CE_HDI float ce_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // round to nearest by the 1.5*2^23 trick (roundevenf would be a libm call in the loop)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693145751953125f;     // ln2 split: hi part exact in 16 bits
  r = r - n * 1.428606765330187e-06f;       // lo part
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  memcpy(&s, &e, sizeof(s));
  return p * s;
#endif
}

// Soft-capped logit and its derivative factor: t = tanh(x / cap), z = cap * t, dz/dx = 1 - t^2.
// tanh(u) = 1 - 2 / (exp(2u) + 1): saturates correctly at both ends with the clamped exp.
FASTFT_CE_HDI float ce_tanh(float u) { return 1.0f - 2.0f / (ce_exp(2.0f * u) + 1.0f); }

// fp32 -> bf16, round to nearest even, branch-free so the CPU gradient loops vectorise
// (common.h's float_to_bf16 has an early return for NaN, which kept the bf16 pass scalar:
// 2.0 vs 0.7 ns per element). NaNs produced by arithmetic are quiet (mantissa bit 22 set), so
// the rounding carry cannot turn them into infinities: they stay NaN without the special case.
FASTFT_CE_HDI uint16_t ce_float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

struct CEParams {
  float smoothing;  // eps
  float z_loss;     // zl
  float softcap;    // 0 = off
  float inv_softcap;
  int64_t vocab;
};

// Capped logit (call only when p.softcap > 0).
FASTFT_CE_HDI float ce_capped(float x, const CEParams& p) { return p.softcap * ce_tanh(x * p.inv_softcap); }

// Row coefficients once lse is known: dz_j = (exp(z_j - lse) * a - b) * capfactor_j, and the
// label element additionally gets -scale * (1 - eps).
struct CERowCoef {
  float lse, a, b, c_label;
};

FASTFT_CE_HDI CERowCoef ce_row_coef(float lse, float scale, const CEParams& p) {
  CERowCoef k;
  k.lse = lse;
  k.a = scale * (1.0f + 2.0f * p.z_loss * lse);
  k.b = scale * p.smoothing / static_cast<float>(p.vocab);
  k.c_label = scale * (1.0f - p.smoothing);
  return k;
}

// Gradient of one element from its capped logit z (with t = z / cap when capping). CAP is a
// template argument so the CPU loops carry no branch (a runtime test kept them scalar).
template <bool CAP>
FASTFT_CE_HDI float ce_grad(float z, const CERowCoef& k, const CEParams& p) {
  float g = ce_exp(z - k.lse) * k.a - k.b;
  if (CAP) {
    float t = z * p.inv_softcap;
    g *= 1.0f - t * t;
  }
  return g;
}

// Gradient of the label element: as ce_grad, minus scale * (1 - eps) before the cap factor.
FASTFT_CE_HDI float ce_grad_label(float z, const CERowCoef& k, const CEParams& p) {
  float g = ce_exp(z - k.lse) * k.a - k.b - k.c_label;
  if (p.softcap > 0.0f) {
    float t = z * p.inv_softcap;
    g *= 1.0f - t * t;
  }
  return g;
}

// Token loss from lse, the label's capped logit and the sum of the capped logits.
FASTFT_CE_HDI float ce_row_loss(float lse, float z_label, float sum_z, const CEParams& p) {
  float l = lse - (1.0f - p.smoothing) * z_label;
  if (p.smoothing != 0.0f) l -= p.smoothing / static_cast<float>(p.vocab) * sum_z;
  return l + p.z_loss * lse * lse;
}

}  // namespace fastft
