// C-linkage launcher of the fused linear cross-entropy chunk pass (csrc/cuda/cross_entropy.cu).
#pragma once
#include <cstdint>

// buf: (rows, V) logits with row stride ld (dtype code 0/1/2), overwritten by dloss/dlogits when
// write_grad; labels int64[rows]; scale fp32[rows]; loss, zterm fp32[rows]; correct uint8[rows].
extern "C" int fastft_cuda_cross_entropy_chunk(uintptr_t buf, int dtype, int64_t rows, int64_t V,
                                               int64_t ld, uintptr_t labels, uintptr_t scale,
                                               uintptr_t loss, uintptr_t zterm, uintptr_t correct,
                                               float smoothing, float z_loss, float softcap,
                                               int write_grad, uintptr_t stream);
