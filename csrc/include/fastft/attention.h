// Causal attention per-element maths, shared by csrc/cpu/attention.cpp (g++) and
// csrc/cuda/attention.cu (nvcc). fastft/ops/attention.py has the formulas:
//   s_ij = scale * q_i . k_j  (j <= i);  lse_i = logsumexp_j s_ij;  p_ij = exp(s_ij - lse_i)
//   o_i = sum_j p_ij v_j;  delta_i = do_i . o_i
//   ds_ij = scale * p_ij * (dp_ij - delta_i)  with dp_ij = do_i . v_j
//   dq_i = sum_j ds_ij k_j;  dk_j = sum_i ds_ij q_i;  dv_j = sum_i p_ij do_i
// (the gradient of the scaled score folds `scale` into ds, so dq and dk use unscaled q and k).
#pragma once
#include <cmath>

#include "fastft/cross_entropy.h"  // ce_exp: vectorisable exp on the host, expf on the device

#if defined(__CUDACC__)
#define FASTFT_ATTN_HDI __host__ __device__ __forceinline__
#else
#define FASTFT_ATTN_HDI inline __attribute__((always_inline))
#endif

namespace fastft {

// Probability of one causal score: exp(scale * qk - lse). `qk` is the unscaled dot product.
FASTFT_ATTN_HDI float attn_prob(float qk, float scale, float lse) { return ce_exp(qk * scale - lse); }

// Score gradient: d(loss)/d(qk) for the unscaled dot product qk (scale folded in).
FASTFT_ATTN_HDI float attn_dscore(float p, float dp, float delta, float scale) {
  return scale * p * (dp - delta);
}

// Finish a row's online softmax: running max m (of scaled scores) and sum of exp(s - m).
FASTFT_ATTN_HDI float attn_lse(float m, float sum) { return m + logf(sum); }

}  // namespace fastft
