// pybind11 wrappers of the causal attention CUDA launchers (csrc/cuda/attention.cu). Devices,
// dtypes, shapes and strides are validated by fastft/ops/attention.py; this layer checks the
// shape invariants the kernels rely on, stride list lengths, the dtype code and launch errors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_launchers.h"

namespace py = pybind11;

namespace fastft_cuda {
namespace {

using Strides = std::vector<int64_t>;

void check_strides(const Strides& s, const char* name) {
  if (s.size() != 3)
    throw std::invalid_argument(std::string("attention: ") + name + " strides have " + std::to_string(s.size()) +
                                " entries, expected 3 (batch, head, time)");
}

void check_shape(int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t D, int dtype) {
  const int64_t dmax = fastft_cuda_attention_max_head_dim();
  if (B < 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0 || T < 0 || D <= 0 || D > dmax)
    throw std::invalid_argument("attention: bad shape B=" + std::to_string(B) + " Hq=" + std::to_string(Hq) +
                                " Hkv=" + std::to_string(Hkv) + " T=" + std::to_string(T) + " D=" + std::to_string(D) +
                                " (need Hq % Hkv == 0 and 0 < D <= " + std::to_string(dmax) + ")");
  // one block per (batch * head, 16-row tile) at the smallest tile: the 1-D grid's limit
  if (B * Hq * ((T + 15) / 16) > 0x7fffffffLL || T > 0x7fffffffLL)
    throw std::invalid_argument("attention: B*Hq*T too large for one launch (B=" + std::to_string(B) +
                                " Hq=" + std::to_string(Hq) + " T=" + std::to_string(T) + ")");
  if (dtype < 0 || dtype > 2)
    throw std::invalid_argument("attention: dtype code " + std::to_string(dtype) + ", expected 0, 1 or 2");
}

void check(int err, const char* what) {
  if (err != 0)
    throw std::runtime_error(std::string("fastft CUDA ") + what + " failed (cudaError " + std::to_string(err) + ")");
}

void attention_fwd(uintptr_t q, const Strides& qs, uintptr_t k, const Strides& ks, uintptr_t v, const Strides& vs,
                   uintptr_t out, const Strides& os, uintptr_t lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t T,
                   int64_t D, double scale, int dtype, uintptr_t stream, uintptr_t seg_start) {
  check_shape(B, Hq, Hkv, T, D, dtype);
  check_strides(qs, "q");
  check_strides(ks, "k");
  check_strides(vs, "v");
  check_strides(os, "out");
  check(fastft_cuda_attention_fwd(q, qs.data(), k, ks.data(), v, vs.data(), out, os.data(), lse, B, Hq, Hkv, T, D,
                                  static_cast<float>(scale), dtype, stream, seg_start),
        "attention_fwd");
}

void attention_bwd(uintptr_t q, const Strides& qs, uintptr_t k, const Strides& ks, uintptr_t v, const Strides& vs,
                   uintptr_t out, const Strides& os, uintptr_t dout, const Strides& dos, uintptr_t lse, uintptr_t dq,
                   const Strides& dqs, uintptr_t dk, const Strides& dks, uintptr_t dv, const Strides& dvs, int64_t B,
                   int64_t Hq, int64_t Hkv, int64_t T, int64_t D, double scale, int dtype, uintptr_t stream,
                   uintptr_t seg_start, uintptr_t seg_end) {
  if ((seg_start == 0) != (seg_end == 0))
    throw std::invalid_argument("attention_bwd: packed rows need both seg_start and seg_end (or neither)");
  check_shape(B, Hq, Hkv, T, D, dtype);
  check_strides(qs, "q");
  check_strides(ks, "k");
  check_strides(vs, "v");
  check_strides(os, "out");
  check_strides(dos, "grad_out");
  check_strides(dqs, "dq");
  check_strides(dks, "dk");
  check_strides(dvs, "dv");
  check(fastft_cuda_attention_bwd(q, qs.data(), k, ks.data(), v, vs.data(), out, os.data(), dout, dos.data(), lse, dq,
                                  dqs.data(), dk, dks.data(), dv, dvs.data(), B, Hq, Hkv, T, D,
                                  static_cast<float>(scale), dtype, stream, seg_start, seg_end),
        "attention_bwd");
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention_fwd", &attention_fwd, py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"),
        py::arg("v"), py::arg("v_strides"), py::arg("out"), py::arg("out_strides"), py::arg("lse"), py::arg("B"),
        py::arg("Hq"), py::arg("Hkv"), py::arg("T"), py::arg("D"), py::arg("scale"), py::arg("dtype"),
        py::arg("stream"), py::arg("seg_start") = 0,
        "Causal attention forward; strides (batch, head, time) in elements, last dim contiguous; "
        "lse (B, Hq, T) fp32 contiguous; seg_start: 0 or (B, T) int32 sample starts (packed rows).");
  m.def("attention_bwd", &attention_bwd, py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"),
        py::arg("v"), py::arg("v_strides"), py::arg("out"), py::arg("out_strides"), py::arg("grad_out"),
        py::arg("grad_out_strides"), py::arg("lse"), py::arg("dq"), py::arg("dq_strides"), py::arg("dk"),
        py::arg("dk_strides"), py::arg("dv"), py::arg("dv_strides"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("T"), py::arg("D"), py::arg("scale"), py::arg("dtype"), py::arg("stream"), py::arg("seg_start") = 0,
        py::arg("seg_end") = 0,
        "Causal attention backward (probabilities recomputed from lse); writes dq, dk, dv; seg_start/seg_end: "
        "0 or (B, T) int32 sample starts/ends (packed rows).");
  m.attr("attention_max_head_dim") = fastft_cuda_attention_max_head_dim();
}

}  // namespace fastft_cuda
