// C-linkage launchers implemented in csrc/cuda/*.cu. Each op's .cu file adds its
// declarations here and a register_<op>(py::module_&) in a csrc/cuda/<op>_bind.cpp.
#pragma once
#include <cstdint>

// --- adamw (csrc/cuda/adamw.cu) ---
extern "C" int64_t fastft_cuda_adamw_chunk_size();
extern "C" int fastft_cuda_adamw_sumsq(int n, const uintptr_t* g, const int64_t* numel, const int* gdt,
                                       uintptr_t partial, uintptr_t stream);
extern "C" int fastft_cuda_adamw_step(int n, const uintptr_t* p, const uintptr_t* g, const uintptr_t* m,
                                      const uintptr_t* v, const uintptr_t* vmax, const uintptr_t* w,
                                      const int64_t* numel, const int* pdt, const int* gdt,
                                      uintptr_t table, uintptr_t ctrl, float w1, float beta2, float eps,
                                      int amsgrad, int maximize, uintptr_t stream,
                                      const int* master_split);  // per param: w[i] is a split low half
