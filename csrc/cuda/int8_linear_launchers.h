// C-linkage launcher of csrc/cuda/int8_linear.cu (the LoRA linear GEMM on an int8 or float base).
#pragma once
#include <cstdint>

// C[M, N] = A[M, K] @ deq(B)[K, N] (+ bias[N]) + U[M, K2] @ V[K2, N], see kernels/lora_linear.py.
// a: (M, K) contiguous, dtype `dt`; b: element (k, n) at k*sbk + n*sbn, int8 when b_is_int8 else
// dtype `dt`; scale: (N,) or (K,) (scale_on_k), dtype code `sdt` (fp32/bf16); u: (M, K2)
// contiguous, dtype `dt`; v: element (k2, n) at k2*svk + n*svn, dtype `dt`; bias: (N,) or 0;
// c: (M, N) contiguous, dtype `dt`. Returns a cudaError_t value (0 = success).
extern "C" int fastft_cuda_int8_lora_mm(uintptr_t a, uintptr_t b, int b_is_int8, int64_t sbk, int64_t sbn,
                                        uintptr_t scale, int sdt, int scale_on_k, uintptr_t u, int64_t k2,
                                        uintptr_t v, int64_t svk, int64_t svn, uintptr_t bias, uintptr_t c,
                                        int64_t M, int64_t N, int64_t K, int dt, uintptr_t stream);
