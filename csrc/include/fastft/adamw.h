// AdamW per-element maths, shared by csrc/cpu/adamw.cpp (g++) and csrc/cuda/adamw.cu (nvcc).
//
// The operation order mirrors torch.optim.AdamW's single-tensor path so fp32 results agree
// to ~1 ulp per step (tests: 1e-6 relative after 50+ steps):
//   g  = g * grad_mult                     (clip coefficient / grad scale; sign folds `maximize`)
//   p  = p * (1 - lr*wd)                    param.mul_(1 - lr * weight_decay)
//   m  = lerp(m, g, 1 - beta1)              exp_avg.lerp_(grad, 1 - beta1)
//   v  = v*beta2 + (1 - beta2)*g*g          exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
//   vm = max(vm, v)                         (amsgrad only)
//   p  = p - step_size * m / (sqrt(v or vm) / sqrt(bc2) + eps)
// Host-side scalars (1 - lr*wd, step_size = lr / (1 - beta1^t), sqrt(1 - beta2^t)) are computed in
// double and rounded once to float, as torch does when it passes Python floats to its kernels.
#pragma once
#include <cmath>

#include "fastft/common.h"

// The update must be inlined into the SIMD loops of the CPU kernel (a call per element blocks
// vectorization), so host builds force inlining; nvcc inlines __forceinline__ anyway.
#if defined(__CUDACC__)
#define FASTFT_HDI __host__ __device__ __forceinline__
#else
#define FASTFT_HDI inline __attribute__((always_inline))
#endif

namespace fastft {

// Per-parameter scalars of one AdamW step (fp32, rounded once from double).
struct AdamWScalars {
  float decay;        // 1 - lr * weight_decay
  float w1;           // 1 - beta1 (lerp weight)
  float beta2;
  float omb2;         // 1 - beta2
  float eps;
  float neg_step;     // -lr / (1 - beta1^t)
  float bc2_sqrt;     // sqrt(1 - beta2^t)
  float grad_mult;    // clip_coef / grad_scale, negated when maximize
};

// Correctly rounded sqrt and division on both sides: the CUDA build uses --use_fast_math, whose
// approximate sqrtf and '/' would drift from torch's results by several ulps per step.
FASTFT_HDI float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return sqrtf(x);
#endif
}
FASTFT_HDI float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// IEEE half <-> float by bit manipulation (round to nearest even), usable on host and device.
FASTFT_HDI float f16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: value = man * 2^-24, exact in float
    float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    uint32_t fb;
    memcpy(&fb, &f, sizeof(fb));
    bits = sign | fb;
  }
  float out;
  memcpy(&out, &bits, sizeof(out));
  return out;
}

FASTFT_HDI uint16_t float_to_f16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // nan
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // below the smallest normal half: round to a subnormal (or 0)
    float a;
    memcpy(&a, &abs, sizeof(a));
    // a * 2^24 rounded to nearest even integer = subnormal mantissa
    float scaled = a * 16777216.0f;
    uint32_t m = static_cast<uint32_t>(scaled);
    float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u) - (112u << 23);
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

// Load / store of one element of dtype code DT (common.h: 0=f32, 1=bf16, 2=f16) as float.
template <int DT> struct Elem;
template <> struct Elem<kFloat32> {
  using T = float;
  static FASTFT_HDI float load(const float* p, int64_t i) { return p[i]; }
  static FASTFT_HDI void store(float* p, int64_t i, float x) { p[i] = x; }
};
template <> struct Elem<kBFloat16> {
  using T = uint16_t;
  static FASTFT_HDI float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
  static FASTFT_HDI void store(uint16_t* p, int64_t i, float x) { p[i] = float_to_bf16(x); }
};
template <> struct Elem<kFloat16> {
  using T = uint16_t;
  static FASTFT_HDI float load(const uint16_t* p, int64_t i) { return f16_to_float(p[i]); }
  static FASTFT_HDI void store(uint16_t* p, int64_t i, float x) { p[i] = float_to_f16(x); }
};

// One AdamW element update. p is the fp32 working value of the parameter (the master weight
// when there is one); m, v, vmax are fp32 moments. Returns the new fp32 parameter value.
template <bool AMSGRAD>
FASTFT_HDI float adamw_update(float p, float g, float& m, float& v, float& vmax, const AdamWScalars& s) {
  g = g * s.grad_mult;
  p = p * s.decay;
  // torch lerp: weight < 0.5 ? start + w*(end-start) : end - (end-start)*(1-w)
  float d = g - m;
  m = (s.w1 < 0.5f) ? m + s.w1 * d : g - d * (1.0f - s.w1);
  v = v * s.beta2;
  v = v + s.omb2 * g * g;
  float vv = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;  // torch.maximum: NaN propagates from v
    if (v != v) vmax = v;
    vv = vmax;
  }
  float denom = div_rn(sqrt_rn(vv), s.bc2_sqrt) + s.eps;
  return p + s.neg_step * div_rn(m, denom);
}

// ---- "split" fp32 masters for bf16 params --------------------------------------------------
// A bf16 param already holds the top 16 bits of its fp32 master, so the master only needs its low
// half stored next to it (2 bytes/param instead of 4). For a master with bit pattern b (uint32):
//   hi = (b + 0x8000) >> 16            the bf16 param (round half away from zero on the magnitude:
//                                       round-to-nearest-even except at exact ties, low half 0x8000)
//   lo = int16(b - (hi << 16))          in [-0x8000, 0x7fff]
// and decoding is b = (uint32(hi) << 16) + int32(lo) in uint32 wrap-around arithmetic. Float bit
// patterns of one sign are monotonic in magnitude, so this is exact for every finite value, across
// binade edges, for subnormals and negatives; the round trip is exact for *every* bit pattern
// (mod 2^32), but the bf16 param of a NaN master shows inf when the NaN's mantissa is below 0x8000
// and +-0 (wrap-around) when it is 0x7f8000 or more. Non-finite masters never arise in training:
// a non-finite grad norm skips the step before anything is written.
FASTFT_HDI float split_master_decode(uint16_t hi, int16_t lo) {
  uint32_t b = (static_cast<uint32_t>(hi) << 16) + static_cast<uint32_t>(static_cast<int32_t>(lo));
  float f;
  memcpy(&f, &b, sizeof(f));
  return f;
}

FASTFT_HDI void split_master_encode(float f, uint16_t& hi, int16_t& lo) {
  uint32_t b;
  memcpy(&b, &f, sizeof(b));
  uint32_t h = (b + 0x8000u) >> 16;
  hi = static_cast<uint16_t>(h);
  lo = static_cast<int16_t>(static_cast<uint16_t>(b - (h << 16)));  // two's complement low 16 bits
}

// One AdamW element update of a bf16 param with a split master: decode the fp32 master from
// (hi = bf16 param bits, lo), run exactly adamw_update on it, encode the result back. The master
// (and so the optimizer maths) is bit-identical to the fp32-master path; the bf16 param equals
// that path's round-to-nearest-even except at exact ties (away from zero here).
template <bool AMSGRAD>
FASTFT_HDI void adamw_update_split(uint16_t& hi, int16_t& lo, float g, float& m, float& v, float& vmax,
                                   const AdamWScalars& s) {
  float out = adamw_update<AMSGRAD>(split_master_decode(hi, lo), g, m, v, vmax, s);
  split_master_encode(out, hi, lo);
}

// Host-side computation of the per-parameter scalars from the hyperparameters and the step
// count AFTER its increment (double precision, like torch's Python-float arithmetic).
inline AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double wd,
                                  double step, double grad_mult, bool maximize) {
  AdamWScalars s;
  double bc1 = 1.0 - std::pow(beta1, step);
  double bc2 = 1.0 - std::pow(beta2, step);
  s.decay = static_cast<float>(1.0 - lr * wd);
  s.w1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.omb2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.neg_step = static_cast<float>(-(lr / bc1));
  s.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));
  s.grad_mult = static_cast<float>(maximize ? -grad_mult : grad_mult);
  return s;
}

}  // namespace fastft
