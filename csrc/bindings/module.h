// How a binding file adds its kernels to the Python module hotloop._C: one `Kernels` object at namespace scope
// per file, naming the submodule (cpu | cuda) and a function that defs them there. The module's init runs every
// one of them (module.cpp), so adding an op's bindings never touches another file.
// The kernels are plain functions, not torch.library schemas: each op has one schema, the Python custom op
// (python/hotloop/ops/<stem>.py), whose implementation picks the backend per call (hotloop._internal.dispatch).
#pragma once
#include <torch/extension.h>

#include <utility>
#include <vector>

namespace hotloop::bind {

using DefKernels = void (*)(pybind11::module_&);

std::vector<std::pair<const char*, DefKernels>>& kernel_tables();

struct Kernels {
  Kernels(const char* submodule, DefKernels def) { kernel_tables().emplace_back(submodule, def); }
};

// The kernels never touch Python objects: release the GIL while they run (other Python threads keep going).
using NoGil = pybind11::call_guard<pybind11::gil_scoped_release>;

}  // namespace hotloop::bind
