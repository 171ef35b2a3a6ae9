// fastft._C_cuda: host-side pybind11 wrappers around the launchers that the .cu files
// export with C linkage (declared in csrc/cuda/launchers.h). Compiled by g++; the
// .cu files by nvcc. Pointers arrive as uintptr_t, validated in Python.
#include <pybind11/pybind11.h>

#include "launchers.h"

namespace py = pybind11;

namespace fastft_cuda {
__attribute__((weak)) void register_adamw(py::module_& m);
__attribute__((weak)) void register_cross_entropy(py::module_& m);
__attribute__((weak)) void register_int8_linear(py::module_& m);
__attribute__((weak)) void register_elementwise(py::module_& m);
__attribute__((weak)) void register_attention(py::module_& m);
}  // namespace fastft_cuda

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastft CUDA kernels (raw-pointer interface)";
  py::list ops;
  if (fastft_cuda::register_adamw) { fastft_cuda::register_adamw(m); ops.append("adamw"); }
  if (fastft_cuda::register_cross_entropy) { fastft_cuda::register_cross_entropy(m); ops.append("cross_entropy"); }
  if (fastft_cuda::register_int8_linear) { fastft_cuda::register_int8_linear(m); ops.append("int8_linear"); }
  if (fastft_cuda::register_elementwise) {  // one file, three op keys (fastft/_backend.py OP_BACKENDS)
    fastft_cuda::register_elementwise(m);
    for (const char* k : {"elementwise", "rms_norm", "swiglu", "rope"}) ops.append(k);
  }
  if (fastft_cuda::register_attention) { fastft_cuda::register_attention(m); ops.append("attention"); }
  m.attr("ops") = ops;
}
