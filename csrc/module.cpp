// The Python extension sdrpn._C. Importing it loads this shared object, whose static
// initialisers register every sdrpn op with the dispatcher; the module itself only
// reports how it was built.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#ifndef SDRPN_VERSION
#define SDRPN_VERSION "0.0.0"
#endif
#ifndef SDRPN_CUDA_ARCHS
#define SDRPN_CUDA_ARCHS ""
#endif

namespace {

#ifdef SDRPN_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// at::parallel_for splits work across threads only in code compiled with OpenMP; without
// it every CPU kernel silently runs on one thread.
#ifdef _OPENMP
constexpr bool kWithOpenMP = true;
#else
constexpr bool kWithOpenMP = false;
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sdrpn compiled ops (registered under torch.ops.sdrpn)";
  m.attr("__version__") = SDRPN_VERSION;
  m.attr("with_cuda") = kWithCuda;
  m.attr("with_openmp") = kWithOpenMP;
  m.attr("cuda_archs") = std::string(SDRPN_CUDA_ARCHS);
  m.attr("torch_version") = TORCH_VERSION;
}
