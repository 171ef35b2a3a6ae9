// Per-element maths of the fused Llama-block ops (RMSNorm, SwiGLU, rotary embedding), shared by
// csrc/cpu/elementwise.cpp (g++) and csrc/cuda/elementwise.cu (nvcc). Everything is fp32; the
// kernels load bf16/fp16/fp32 and round once on store (Elem<> from adamw.h).
//
//   RMSNorm  r = 1/sqrt(mean(x^2) + eps);  n = round_x(x*r);  y = n * w
//            (n is rounded to x's dtype before the weight multiply, as HF's LlamaRMSNorm does)
//            dx = r * (dy*w - (x*r) * mean(dy*w * x*r));  dw = sum_rows dy * n
//   SwiGLU   y = silu(g) * u;  du = dy * silu(g);  dg = dy * u * s * (1 + g * (1 - s)),  s = sigmoid(g)
//   RoPE     for j < D/2:  y[j] = x[j]*c[j] - x[j+D/2]*s[j];  y[j+D/2] = x[j+D/2]*c[j+D/2] + x[j]*s[j+D/2]
//            (= x*cos + rotate_half(x)*sin);  the backward is the transposed rotation:
//            dx[j] = dy[j]*c[j] + dy[j+D/2]*s[j+D/2];  dx[j+D/2] = dy[j+D/2]*c[j+D/2] - dy[j]*s[j]
#pragma once
#include <cstdint>

#include "fastft/adamw.h"  // Elem<> load/store per dtype code, FASTFT_HDI, f16 conversions

namespace fastft {

// exp(x) for fp32 that the CPU compiler can vectorise: glibc only exposes its SIMD expf under
// -ffast-math, and a scalar libm call per element left SwiGLU compute-bound. Cody-Waite range
// reduction x = n*ln2 + r, |r| <= ln2/2, and a degree-6 polynomial (Cephes expf coefficients,
// ~1 ulp over the range). Inputs are clamped to [-87.3, 88.3]: exp(88.3) < FLT_MAX and below
// -87.3 the true result is < 2^-126 and we return 0 (sigmoid/silu are then exactly 0 or g).
// nvcc uses the device expf (correctly handled there, no vectorisation concern).
FASTFT_HDI float exp_f(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x > 88.3f ? 88.3f : x;
  const bool tiny = x < -87.3f;
  x = x < -87.3f ? -87.3f : x;
  // round(x / ln2) by the 1.5*2^23 trick (exact for |x/ln2| < 2^22, vectorises without SSE4.1)
  const float magic = 12582912.0f;
  float fn = (x * 1.44269504088896341f + magic) - magic;
  float r = x - fn * 0.693359375f;   // ln2 split in a hi part exact in 8 bits ...
  r = r - fn * -2.12194440e-4f;      // ... and the remainder
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(fn) + 127;  // in [1, 254] after the clamp
  uint32_t bits = static_cast<uint32_t>(e) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0f : p * scale;
#endif
}

// x rounded to dtype code DT and back (identity for fp32): the kernels reproduce HF's
// intermediate casts where they are part of the model's maths (RMSNorm's x.to(dtype)).
template <int DT>
FASTFT_HDI float round_to(float x) {
  if (DT == kBFloat16) return bf16_to_float(float_to_bf16(x));
  if (DT == kFloat16) return f16_to_float(float_to_f16(x));
  return x;
}

FASTFT_HDI float sigmoid_f(float g) { return 1.0f / (1.0f + exp_f(-g)); }

FASTFT_HDI float swiglu_fwd(float g, float u) { return g * sigmoid_f(g) * u; }

FASTFT_HDI void swiglu_bwd(float g, float u, float dy, float& dg, float& du) {
  const float s = sigmoid_f(g);
  du = dy * g * s;
  dg = dy * u * s * (1.0f + g * (1.0f - s));
}

// 1 / sqrt(sumsq / n + eps), correctly rounded steps (torch: rsqrt(mean + eps) = 1/sqrt(.)).
FASTFT_HDI float rms_rstd(float sumsq, int64_t n, float eps) {
  return div_rn(1.0f, sqrt_rn(div_rn(sumsq, static_cast<float>(n)) + eps));
}

// One rotated pair (lo = x[j], hi = x[j + D/2]) with the cos/sin at both positions.
FASTFT_HDI void rope_pair_fwd(float lo, float hi, float c_lo, float s_lo, float c_hi, float s_hi,
                              float& y_lo, float& y_hi) {
  y_lo = lo * c_lo - hi * s_lo;
  y_hi = hi * c_hi + lo * s_hi;
}

FASTFT_HDI void rope_pair_bwd(float d_lo, float d_hi, float c_lo, float s_lo, float c_hi, float s_hi,
                              float& dx_lo, float& dx_hi) {
  dx_lo = d_lo * c_lo + d_hi * s_hi;
  dx_hi = d_hi * c_hi - d_lo * s_lo;
}

}  // namespace fastft
