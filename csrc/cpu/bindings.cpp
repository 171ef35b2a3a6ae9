// fastft._C: the CPU backend. Every entry point takes raw data pointers (uintptr_t)
// and sizes that fastft/_backend.py has validated (device, dtype, contiguity, shape),
// so this binary does not depend on torch's C++ ABI.
#include <omp.h>

#include "ops.h"

namespace py = pybind11;

namespace fastft {
__attribute__((weak)) void register_adamw(py::module_& m);
__attribute__((weak)) void register_cross_entropy(py::module_& m);
__attribute__((weak)) void register_int8_linear(py::module_& m);
__attribute__((weak)) void register_elementwise(py::module_& m);
__attribute__((weak)) void register_attention(py::module_& m);
}  // namespace fastft

static py::dict cpu_features() {
  py::dict d;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  d["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  d["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
  d["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  d["avx512bw"] = static_cast<bool>(__builtin_cpu_supports("avx512bw"));
  d["avx512vnni"] = static_cast<bool>(__builtin_cpu_supports("avx512vnni"));
  d["avx512bf16"] = static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
#endif
  d["omp_max_threads"] = omp_get_max_threads();
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastft CPU kernels (raw-pointer interface; see fastft/_backend.py)";
  m.def("cpu_features", &cpu_features, "CPU SIMD features detected at run time");
  py::list ops;
  if (fastft::register_adamw) { fastft::register_adamw(m); ops.append("adamw"); }
  if (fastft::register_cross_entropy) { fastft::register_cross_entropy(m); ops.append("cross_entropy"); }
  if (fastft::register_int8_linear) { fastft::register_int8_linear(m); ops.append("int8_linear"); }
  if (fastft::register_elementwise) {  // one file, three op keys (fastft/_backend.py OP_BACKENDS)
    fastft::register_elementwise(m);
    for (const char* k : {"elementwise", "rms_norm", "swiglu", "rope"}) ops.append(k);
  }
  if (fastft::register_attention) { fastft::register_attention(m); ops.append("attention"); }
  m.attr("ops") = ops;
}
