// Each csrc/cpu/<op>.cpp defines register_<op>(m). They are declared weak in
// bindings.cpp so an op file can be added without touching the others.
#pragma once
#include <pybind11/pybind11.h>

namespace fastft {
void register_adamw(pybind11::module_& m);
void register_cross_entropy(pybind11::module_& m);
void register_int8_linear(pybind11::module_& m);
void register_elementwise(pybind11::module_& m);
void register_attention(pybind11::module_& m);
}  // namespace fastft
