// C-linkage launchers of csrc/cuda/elementwise.cu (fused RMSNorm, SwiGLU, rotary embedding).
// Pointers arrive as uintptr_t, validated by fastft/ops/{rms_norm,swiglu,rope}.py. Each returns
// a cudaError_t code (0 = success).
#pragma once
#include <cstdint>

extern "C" int fastft_cuda_rms_norm_fwd(uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows,
                                        int64_t n, float eps, int dt, uintptr_t stream);
// number of blocks (= rows of the fp32 dweight partial buffer) the backward uses for `rows` rows
extern "C" int64_t fastft_cuda_rms_norm_bwd_blocks(int64_t rows);
extern "C" int fastft_cuda_rms_norm_bwd(uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx,
                                        uintptr_t dw_partial, int64_t rows, int64_t n, int dt, uintptr_t stream);
extern "C" int fastft_cuda_swiglu_fwd(uintptr_t g, uintptr_t u, uintptr_t y, int64_t n, int dt, uintptr_t stream);
extern "C" int fastft_cuda_swiglu_bwd(uintptr_t g, uintptr_t u, uintptr_t dy, uintptr_t dg, uintptr_t du, int64_t n,
                                      int dt, uintptr_t stream);
// shape = (B, H, T, D); xs/ys: element strides of B, H, T; cs: strides of cos/sin's B, T
extern "C" int fastft_cuda_rope(uintptr_t x, uintptr_t y, uintptr_t c, uintptr_t s, const int64_t* shape,
                                const int64_t* xs, const int64_t* ys, const int64_t* cs, int backward, int dt,
                                uintptr_t stream);
