// C-linkage launchers implemented in csrc/cuda/*.cu. Each op's .cu file adds its
// declarations here and a register_<op>(py::module_&) in a csrc/cuda/<op>_bind.cpp.
#pragma once
#include <cstdint>
