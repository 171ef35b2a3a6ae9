// pybind11 wrappers of the fused elementwise CUDA launchers (csrc/cuda/elementwise.cu). Pointers
// and shapes are validated by fastft/ops/{rms_norm,swiglu,rope}.py; this layer checks list
// lengths, dtype codes and launch errors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "elementwise_launchers.h"

namespace py = pybind11;

namespace fastft_cuda {
namespace {

void check(int err, const char* what) {
  if (err != 0) throw std::runtime_error(std::string("fastft CUDA ") + what + " failed (cudaError " + std::to_string(err) + ")");
}

void check_dt(int dt, const char* what) {
  if (dt < 0 || dt > 2) throw std::invalid_argument(std::string(what) + ": dtype code " + std::to_string(dt) + ", expected 0, 1 or 2");
}

void rms_norm_fwd(uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t n, double eps, int dt,
                  uintptr_t stream) {
  check_dt(dt, "rms_norm_fwd");
  check(fastft_cuda_rms_norm_fwd(x, w, y, rstd, rows, n, static_cast<float>(eps), dt, stream), "rms_norm_fwd");
}

void rms_norm_bwd(uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx, uintptr_t part, int64_t rows,
                  int64_t n, int dt, uintptr_t stream) {
  check_dt(dt, "rms_norm_bwd");
  check(fastft_cuda_rms_norm_bwd(dy, x, w, rstd, dx, part, rows, n, dt, stream), "rms_norm_bwd");
}

void swiglu_fwd(uintptr_t g, uintptr_t u, uintptr_t y, int64_t n, int dt, uintptr_t stream) {
  check_dt(dt, "swiglu_fwd");
  check(fastft_cuda_swiglu_fwd(g, u, y, n, dt, stream), "swiglu_fwd");
}

void swiglu_bwd(uintptr_t g, uintptr_t u, uintptr_t dy, uintptr_t dg, uintptr_t du, int64_t n, int dt,
                uintptr_t stream) {
  check_dt(dt, "swiglu_bwd");
  check(fastft_cuda_swiglu_bwd(g, u, dy, dg, du, n, dt, stream), "swiglu_bwd");
}

void rope(uintptr_t x, uintptr_t y, uintptr_t c, uintptr_t s, const std::vector<int64_t>& shape,
          const std::vector<int64_t>& xs, const std::vector<int64_t>& ys, const std::vector<int64_t>& cs, bool backward,
          int dt, uintptr_t stream) {
  check_dt(dt, "rope");
  if (shape.size() != 4 || xs.size() != 3 || ys.size() != 3 || cs.size() != 2)
    throw std::invalid_argument("rope: expected shape (B, H, T, D), 3 x/y strides and 2 cos/sin strides");
  if (shape[3] % 2 != 0) throw std::invalid_argument("rope: head dim must be even, got " + std::to_string(shape[3]));
  check(fastft_cuda_rope(x, y, c, s, shape.data(), xs.data(), ys.data(), cs.data(), backward, dt, stream), "rope");
}

}  // namespace

void register_elementwise(py::module_& m) {
  m.def("rms_norm_fwd", &rms_norm_fwd, py::arg("x"), py::arg("weight"), py::arg("y"), py::arg("rstd"), py::arg("rows"),
        py::arg("n"), py::arg("eps"), py::arg("dtype"), py::arg("stream"), "RMSNorm forward (one block per row).");
  m.def("rms_norm_bwd_blocks", &fastft_cuda_rms_norm_bwd_blocks, py::arg("rows"),
        "Rows of the fp32 dweight partial buffer rms_norm_bwd needs.");
  m.def("rms_norm_bwd", &rms_norm_bwd, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("rstd"), py::arg("dx"),
        py::arg("dweight_partial"), py::arg("rows"), py::arg("n"), py::arg("dtype"), py::arg("stream"),
        "RMSNorm backward; dweight partials (blocks, n) fp32 to be summed over blocks.");
  m.def("swiglu_fwd", &swiglu_fwd, py::arg("gate"), py::arg("up"), py::arg("y"), py::arg("numel"), py::arg("dtype"),
        py::arg("stream"));
  m.def("swiglu_bwd", &swiglu_bwd, py::arg("gate"), py::arg("up"), py::arg("dy"), py::arg("dgate"), py::arg("dup"),
        py::arg("numel"), py::arg("dtype"), py::arg("stream"));
  m.def("rope", &rope, py::arg("x"), py::arg("y"), py::arg("cos"), py::arg("sin"), py::arg("shape"),
        py::arg("x_strides"), py::arg("y_strides"), py::arg("cs_strides"), py::arg("backward"), py::arg("dtype"),
        py::arg("stream"));
}

}  // namespace fastft_cuda
