"""Builds the sdrpn._C extension.

Environment:
  SDRPN_CPU_ONLY=1     build without CUDA even where it is available
  SDRPN_FORCE_CUDA=1   build the CUDA kernels even where no GPU is visible
  SDRPN_CUDA_ARCHS     compute capabilities, e.g. "9.0" or "8.0;9.0" (default "8.0;9.0")
  MAX_JOBS             parallel compile jobs (torch's builder reads it)
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvcc_found() -> bool:
    return CUDA_HOME is not None and (
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None
    )


def _want_cuda() -> bool:
    if _flag("SDRPN_CPU_ONLY"):
        return False
    if _flag("SDRPN_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and _nvcc_found()


def _sources(pattern: str) -> list[str]:
    # Paths relative to setup.py: setuptools refuses absolute source paths.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extension():
    with_cuda = _want_cuda()
    archs = os.environ.get("SDRPN_CUDA_ARCHS", "8.0;9.0")
    sources = _sources("csrc/module.cpp") + _sources("csrc/ops/*.cpp") + _sources("csrc/ops/cpu/*.cpp")
    define_macros = [("SDRPN_VERSION", f'"{VERSION}"')]
    cxx_flags = ["-O3", "-std=c++17"]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        # torch's builder reads the architecture list from this variable.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += _sources("csrc/ops/cuda/*.cu")
        define_macros += [("SDRPN_WITH_CUDA", None), ("SDRPN_CUDA_ARCHS", f'"{archs}"')]
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    print(
        f"sdrpn build: version={VERSION} torch={torch.__version__} torch.cuda={torch.version.cuda} "
        f"cuda_home={CUDA_HOME} with_cuda={with_cuda} "
        f"archs={archs if with_cuda else '-'} sources={len(sources)}"
    )
    kind = CUDAExtension if with_cuda else CppExtension
    return kind(
        name="sdrpn._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "include")],
        define_macros=define_macros,
        extra_compile_args=extra,
    )


setup(
    version=VERSION,
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
