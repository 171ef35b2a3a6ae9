// int8 LoRA linear, CPU: dequantise one tile of an int8 weight (a block of output rows for the
// forward GEMM, a block of input columns for dX) into the GEMM dtype. The caller
// (fastft/ops/lora_linear.py) runs oneDNN's GEMM on each cache-resident tile, so a full
// dequantised copy of W never exists.
//
// Why not a hand-written dequant-GEMM or torch._weight_int8pack_mm: measured on the 2-core EPYC
// (N=4096, in=out=2048, bf16, torch 2.13): the plain bf16 GEMM 0.17 s, _weight_int8pack_mm
// 0.44 s (2.7x slower), tile dequant + oneDNN GEMM with 512-row tiles 0.08-0.09 s vs 0.08-0.09 s
// for the bf16 GEMM in the same run (dequantising all tiles costs 0.7 ms). oneDNN's bf16 GEMM
// (AVX-512 BF16) is the fastest matmul here; the dequant is what must not cost a pass over W.
//
// Pointers arrive as uintptr_t, validated by fastft/ops/lora_linear.py (CPU, dtypes, strides).
#include <omp.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "fastft/int8_linear.h"
#include "ops.h"

namespace py = pybind11;

namespace fastft {
namespace {

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline uint16_t from_float<uint16_t>(float v) { return float_to_bf16(v); }

// One row of the tile: out[c] = q[c] * s. Vectorised by the compiler per target clone.
template <typename T>
__attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
void dequant_row(const int8_t* __restrict q, float s, T* __restrict out, int64_t cols) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) out[c] = from_float<T>(int8_dequant(q[c], s));
}

template <typename T>
void dequant_tile(const int8_t* q, int64_t ldq, const void* scale, int scale_dt, T* out, int64_t rows,
                  int64_t cols, const int64_t* idx, int64_t k, const void* ow, int ow_dt, int64_t c0) {
  // rows are independent; a 512 x 2048 tile is 1M elements, worth 2 threads
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * cols;
    dequant_row<T>(q + r * ldq, load_as_float(scale, scale_dt, r), o, cols);
    for (int64_t kk = 0; kk < k; ++kk) {  // 16-bit outlier columns overwrite their (zero) q column
      const int64_t j = idx[kk] - c0;
      if (j < 0 || j >= cols) continue;
      o[j] = from_float<T>(load_as_float(ow, ow_dt, r * k + kk));
    }
  }
}

void int8_dequant_tile(uintptr_t q, int64_t ldq, uintptr_t scale, int scale_dt, uintptr_t out, int out_dt,
                       int64_t rows, int64_t cols, uintptr_t idx, int64_t k, uintptr_t ow, int ow_dt,
                       int64_t c0) {
  if (out_dt != kFloat32 && out_dt != kBFloat16)
    throw std::invalid_argument("int8_dequant_tile: out dtype code " + std::to_string(out_dt) + ", expected fp32 or bf16");
  if (scale_dt != kFloat32 && scale_dt != kBFloat16)
    throw std::invalid_argument("int8_dequant_tile: scale dtype code " + std::to_string(scale_dt) + ", expected fp32 or bf16");
  if (k > 0 && ow_dt != kFloat32 && ow_dt != kBFloat16 && ow_dt != kFloat16)
    throw std::invalid_argument("int8_dequant_tile: outlier dtype code " + std::to_string(ow_dt) + ", expected fp32/bf16/fp16");
  const auto* qp = reinterpret_cast<const int8_t*>(q);
  const auto* ip = reinterpret_cast<const int64_t*>(idx);
  const void* sp = reinterpret_cast<const void*>(scale);
  const void* op = reinterpret_cast<const void*>(ow);
  if (out_dt == kFloat32)
    dequant_tile<float>(qp, ldq, sp, scale_dt, reinterpret_cast<float*>(out), rows, cols, ip, k, op, ow_dt, c0);
  else
    dequant_tile<uint16_t>(qp, ldq, sp, scale_dt, reinterpret_cast<uint16_t*>(out), rows, cols, ip, k, op, ow_dt, c0);
}

}  // namespace

void register_int8_linear(py::module_& m) {
  m.def("int8_dequant_tile", &int8_dequant_tile, py::arg("q"), py::arg("ldq"), py::arg("scale"),
        py::arg("scale_dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("rows"), py::arg("cols"),
        py::arg("outlier_idx"), py::arg("num_outliers"), py::arg("outlier_w"), py::arg("outlier_dtype"),
        py::arg("col0"), py::call_guard<py::gil_scoped_release>(),
        "out[rows, cols] = q[r, c] * scale[r] (row stride ldq), then the 16-bit outlier columns "
        "idx[k] - col0 that fall in [0, cols) are overwritten with outlier_w[r, k].");
}

}  // namespace fastft
