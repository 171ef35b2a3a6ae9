// pybind11 wrapper of the cross-entropy chunk launcher (csrc/cuda/cross_entropy.cu). Pointers and
// shapes are validated by fastft/ops/fused_linear_cross_entropy.py; this layer checks sizes and
// launch errors.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cross_entropy_launchers.h"

namespace py = pybind11;

namespace fastft_cuda {
namespace {

void cross_entropy_chunk(uintptr_t buf, int dtype, int64_t rows, int64_t V, int64_t ld, uintptr_t labels,
                         uintptr_t scale, uintptr_t loss, uintptr_t zterm, uintptr_t correct,
                         double smoothing, double z_loss, double softcap, bool write_grad, uintptr_t stream) {
  if (rows < 0 || V <= 0 || ld < V || rows > 0x7fffffff)
    throw std::invalid_argument("cross_entropy_chunk: need 0 <= rows < 2^31, V > 0, ld >= V");
  int err = fastft_cuda_cross_entropy_chunk(buf, dtype, rows, V, ld, labels, scale, loss, zterm, correct,
                                            static_cast<float>(smoothing), static_cast<float>(z_loss),
                                            static_cast<float>(softcap), write_grad ? 1 : 0, stream);
  if (err != 0)
    throw std::runtime_error("fastft CUDA cross_entropy_chunk failed (cudaError " + std::to_string(err) + ")");
}

}  // namespace

void register_cross_entropy(py::module_& m) {
  m.def("cross_entropy_chunk", &cross_entropy_chunk, py::arg("buf"), py::arg("dtype"), py::arg("rows"),
        py::arg("vocab"), py::arg("ld"), py::arg("labels"), py::arg("scale"), py::arg("loss"), py::arg("zterm"),
        py::arg("correct"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"),
        py::arg("write_grad"), py::arg("stream"),
        "Per-row softmax/loss/argmax of a (rows, V) logits buffer on the GPU; overwrites it with the gradient.");
}

}  // namespace fastft_cuda
