// pybind11 wrappers of the AdamW CUDA launchers (csrc/cuda/adamw.cu). Pointers and sizes are
// validated by fastft/ops/adamw.py; this layer checks list lengths and launch errors only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "launchers.h"

namespace py = pybind11;

namespace fastft_cuda {
namespace {

void check(int err, const char* what) {
  if (err != 0) throw std::runtime_error(std::string("fastft CUDA ") + what + " failed (cudaError " + std::to_string(err) + ")");
}

void check_len(size_t n, size_t got, const char* name) {
  if (got != n) throw std::invalid_argument(std::string("adamw: list '") + name + "' has " + std::to_string(got) +
                                            " entries, expected " + std::to_string(n));
}

void adamw_sumsq(const std::vector<uintptr_t>& g, const std::vector<int64_t>& numel, const std::vector<int>& gdt,
                 uintptr_t partial, uintptr_t stream) {
  check_len(g.size(), numel.size(), "numel");
  check_len(g.size(), gdt.size(), "grad_dtype");
  check(fastft_cuda_adamw_sumsq(static_cast<int>(g.size()), g.data(), numel.data(), gdt.data(), partial, stream),
        "adamw_sumsq");
}

void adamw_step(const std::vector<uintptr_t>& p, const std::vector<uintptr_t>& g, const std::vector<uintptr_t>& m,
                const std::vector<uintptr_t>& v, const std::vector<uintptr_t>& vmax,
                const std::vector<uintptr_t>& w, const std::vector<int64_t>& numel, const std::vector<int>& pdt,
                const std::vector<int>& gdt, uintptr_t table, uintptr_t ctrl, double w1, double beta2, double eps,
                bool amsgrad, bool maximize, uintptr_t stream, const std::vector<int>& master_split) {
  const size_t n = p.size();
  check_len(n, g.size(), "grads");
  check_len(n, m.size(), "exp_avg");
  check_len(n, v.size(), "exp_avg_sq");
  check_len(n, vmax.size(), "max_exp_avg_sq");
  check_len(n, w.size(), "master");
  check_len(n, numel.size(), "numel");
  check_len(n, pdt.size(), "param_dtype");
  check_len(n, gdt.size(), "grad_dtype");
  if (!master_split.empty()) check_len(n, master_split.size(), "master_split");
  for (size_t i = 0; i < master_split.size(); ++i)
    if (master_split[i] && (pdt[i] != 1 || (w[i] == 0 && numel[i] != 0)))  // 1 = bf16 (fastft/_backend.py DTYPE_CODES)
      throw std::invalid_argument("adamw: parameter " + std::to_string(i) +
                                  " has a split master but is not bf16 or has no master pointer");
  check(fastft_cuda_adamw_step(static_cast<int>(n), p.data(), g.data(), m.data(), v.data(), vmax.data(), w.data(),
                               numel.data(), pdt.data(), gdt.data(), table, ctrl, static_cast<float>(w1),
                               static_cast<float>(beta2), static_cast<float>(eps), amsgrad, maximize, stream,
                               master_split.empty() ? nullptr : master_split.data()),
        "adamw_step");
}

}  // namespace

void register_adamw(py::module_& m) {
  m.def("adamw_chunk_size", &fastft_cuda_adamw_chunk_size, "Elements per block of the multi-tensor kernels.");
  m.def("adamw_sumsq", &adamw_sumsq, py::arg("grads"), py::arg("numel"), py::arg("grad_dtype"), py::arg("partial"),
        py::arg("stream"), "Per-block fp64 sums of squares of all grads into partial[] (multi-tensor).");
  m.def("adamw_step", &adamw_step, py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("max_exp_avg_sq"), py::arg("master"), py::arg("numel"), py::arg("param_dtype"),
        py::arg("grad_dtype"), py::arg("table"), py::arg("ctrl"), py::arg("w1"), py::arg("beta2"), py::arg("eps"),
        py::arg("amsgrad"), py::arg("maximize"), py::arg("stream"),
        py::arg("master_split") = std::vector<int>{},
        "Multi-tensor AdamW update of one group; scalars on the device (table, ctrl).");
}

}  // namespace fastft_cuda
