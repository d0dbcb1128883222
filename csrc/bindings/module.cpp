// The Python module hotloop._C: the submodules cpu (C++ kernels) and, in a CUDA build, cuda (CUDA C++ kernels),
// each filled by the binding files' `Kernels` tables (module.h). Argument contracts are in each binding file.
#include "module.h"

#include <string>

namespace hotloop::bind {

std::vector<std::pair<const char*, DefKernels>>& kernel_tables() {
  static std::vector<std::pair<const char*, DefKernels>> tables;  // filled by static initialisers, before init
  return tables;
}

}  // namespace hotloop::bind

static bool built_with_cuda() {
#ifdef HOTLOOP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hotloop compiled kernels: hotloop._C.cpu.<op> (C++), hotloop._C.cuda.<op> (CUDA C++, CUDA builds)";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
  pybind11::module_ cpu = m.def_submodule("cpu", "C++ CPU kernels (OpenMP + SIMD)");
  pybind11::module_ cuda;
  if (built_with_cuda()) cuda = m.def_submodule("cuda", "CUDA C++ kernels");
  for (const auto& [submodule, def] : hotloop::bind::kernel_tables()) {
    def(std::string(submodule) == "cuda" ? cuda : cpu);
  }
}
