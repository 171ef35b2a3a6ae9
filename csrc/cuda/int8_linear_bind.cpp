// pybind11 wrapper of the int8 LoRA linear CUDA launcher (csrc/cuda/int8_linear.cu). Pointers,
// dtypes and shapes are validated by fastft/ops/lora_linear.py; this layer checks sizes and the
// launch error only.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "int8_linear_launchers.h"

namespace py = pybind11;

namespace fastft_cuda {
namespace {

void int8_lora_mm(uintptr_t a, uintptr_t b, bool b_is_int8, int64_t sbk, int64_t sbn, uintptr_t scale, int sdt,
                  bool scale_on_k, uintptr_t u, int64_t k2, uintptr_t v, int64_t svk, int64_t svn, uintptr_t bias,
                  uintptr_t c, int64_t M, int64_t N, int64_t K, int dt, uintptr_t stream) {
  if (M < 0 || N < 0 || K < 0 || k2 < 0)
    throw std::invalid_argument("int8_lora_mm: negative size (M=" + std::to_string(M) + ", N=" + std::to_string(N) +
                                ", K=" + std::to_string(K) + ", K2=" + std::to_string(k2) + ")");
  if (b_is_int8 && scale == 0) throw std::invalid_argument("int8_lora_mm: int8 weight without scales");
  const int err = fastft_cuda_int8_lora_mm(a, b, b_is_int8, sbk, sbn, scale, sdt, scale_on_k, u, k2, v, svk, svn,
                                           bias, c, M, N, K, dt, stream);
  if (err != 0) throw std::runtime_error("fastft CUDA int8_lora_mm failed (cudaError " + std::to_string(err) + ")");
}

}  // namespace

void register_int8_linear(py::module_& m) {
  m.def("int8_lora_mm", &int8_lora_mm, py::arg("a"), py::arg("b"), py::arg("b_is_int8"), py::arg("sbk"),
        py::arg("sbn"), py::arg("scale"), py::arg("scale_dtype"), py::arg("scale_on_k"), py::arg("u"), py::arg("k2"),
        py::arg("v"), py::arg("svk"), py::arg("svn"), py::arg("bias"), py::arg("c"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("dtype"), py::arg("stream"),
        "C = A @ deq(B) (+ bias) + U @ V on the current stream (see kernels/lora_linear.py).");
}

}  // namespace fastft_cuda
