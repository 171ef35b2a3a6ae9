// C-linkage launchers of the causal GQA attention (csrc/cuda/attention.cu).
#pragma once
#include <cstdint>

// Tensors are raw device pointers with (batch, head, time) element strides (3 entries each) and
// a contiguous last dim of D elements, dtype code 0/1/2 (fp32/bf16/fp16) for all of them:
// q, out, dout, dq (B, Hq, T, D); k, v, dk, dv (B, Hkv, T, D); lse (B, Hq, T) fp32 contiguous.
// Shapes are checked by csrc/cuda/attention_bind.cpp (0 < D <= fastft_cuda_attention_max_head_dim(),
// Hq % Hkv == 0). seg_start / seg_end: 0, or (B, T) int32 contiguous device tables of each token's
// sample start / end for packed rows (fastft/ops/segments.py); both or neither in the backward.
// Returns a cudaError_t value (0 = success).
extern "C" int fastft_cuda_attention_max_head_dim();

extern "C" int fastft_cuda_attention_fwd(uintptr_t q, const int64_t* qs, uintptr_t k, const int64_t* ks, uintptr_t v,
                                         const int64_t* vs, uintptr_t out, const int64_t* os, uintptr_t lse, int64_t B,
                                         int64_t Hq, int64_t Hkv, int64_t T, int64_t D, float scale, int dtype,
                                         uintptr_t stream, uintptr_t seg_start);

extern "C" int fastft_cuda_attention_bwd(uintptr_t q, const int64_t* qs, uintptr_t k, const int64_t* ks, uintptr_t v,
                                         const int64_t* vs, uintptr_t out, const int64_t* os, uintptr_t dout,
                                         const int64_t* dos, uintptr_t lse, uintptr_t dq, const int64_t* dqs,
                                         uintptr_t dk, const int64_t* dks, uintptr_t dv, const int64_t* dvs, int64_t B,
                                         int64_t Hq, int64_t Hkv, int64_t T, int64_t D, float scale, int dtype,
                                         uintptr_t stream, uintptr_t seg_start, uintptr_t seg_end);
