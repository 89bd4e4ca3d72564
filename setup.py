"""Builds the sdrpn._C extension.

Environment:
  SDRPN_CPU_ONLY=1     build without CUDA even where it is available
  SDRPN_FORCE_CUDA=1   build the CUDA kernels or fail (never a quiet CPU-only build)
  SDRPN_CUDA_ARCHS     compute capabilities, e.g. "9.0" or "8.0;9.0" (default "8.0;9.0+PTX": 9.0
                       also as PTX, which newer GPUs compile when loading)
  MAX_JOBS             parallel compile jobs (torch's builder reads it)
"""

import glob
import os
import shutil
import subprocess
import sysconfig
import tempfile

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

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


def _loaded_libstdcxx() -> str | None:
    """The libstdc++ this process (and so torch) runs with, from the loader's map."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return path
    except OSError:
        pass
    return None


def _libstdcxx_link_args() -> list[str]:
    """Some toolchains (a GCC whose library folder holds only libstdc++.a, for one) put a
    private copy of libstdc++ into every shared object. Loaded into a process whose
    libstdc++ came with torch, that copy's locale is never set up, and the first error
    message an op formats (an ostream insertion) crashes the process. A probe library
    shows whether the compiler does that; if it does, the process's own libstdc++.so is
    linked explicitly, ahead of the compiler's implicit one."""
    cxx = (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write(
                "#include <sstream>\nint probe(long v) { std::ostringstream s; s << v; return (int)s.str().size(); }\n"
            )
        try:
            subprocess.run(cxx + ["-shared", "-fPIC", src, "-o", lib], check=True, capture_output=True)
            dynamic = subprocess.run(["readelf", "-d", lib], check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return []  # no probe possible: leave the toolchain's default alone
    if "libstdc++" in dynamic:
        return []
    runtime = _loaded_libstdcxx()
    return [runtime] if runtime else []


def _extension():
    with_cuda = _want_cuda()
    # By default the newest architecture is also kept as PTX, so that newer GPUs compile the
    # kernels at load time instead of failing with "no kernel image is available".
    archs = os.environ.get("SDRPN_CUDA_ARCHS", "8.0;9.0+PTX")
    sources = _sources("csrc/module.cpp") + _sources("csrc/ops/*.cpp") + _sources("csrc/ops/cpu/*.cpp")
    define_macros = [("SDRPN_VERSION", f'"{VERSION}"')]
    # at::parallel_for is OpenMP in torch's builds: without -fopenmp it runs on one thread.
    # No contraction of a * b + c into an FMA (aarch64 compilers would fuse by default): the
    # CPU kernels round one operation at a time, as the CUDA kernels' explicit _rn ones do.
    # -g0: Python's CFLAGS carry -g, whose debug information was 97% of the library (29 MB).
    # No -std: torch's builder adds the standard its headers need where none is given (C++17
    # up to torch 2.11, C++20 after), for nvcc too.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-g0"]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        # torch's builder reads the architecture list from this variable.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += _sources("csrc/ops/cuda/*.cu")
        define_macros += [("SDRPN_WITH_CUDA", None), ("SDRPN_CUDA_ARCHS", f'"{archs}"')]
        # The .cu files' host code too (the blur weights are computed there).
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler=-ffp-contract=off"]
    libstdcxx = _libstdcxx_link_args()
    print(
        f"sdrpn build: version={VERSION} torch={torch.__version__} torch.cuda={torch.version.cuda} "
        f"cuda_home={CUDA_HOME} with_cuda={with_cuda} "
        f"archs={archs if with_cuda else '-'} sources={len(sources)} "
        f"libstdc++={'linked explicitly: ' + libstdcxx[0] if libstdcxx else 'toolchain default'}"
    )
    kind = CUDAExtension if with_cuda else CppExtension
    return kind(
        name="sdrpn._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "include")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=libstdcxx + ["-fopenmp"],
    )


setup(
    version=VERSION,
    # The synthetic task's trained stand-in model (a few MB) ships as package data, so the
    # demo starts at once; its folder is listed as a package of its own for that. py.typed
    # tells type checkers to read the package's annotations (PEP 561).
    packages=find_packages("python") + ["sdrpn.synth.base_model"],
    package_dir={"": "python"},
    package_data={"sdrpn": ["py.typed"], "sdrpn.synth.base_model": ["*.json", "*.safetensors"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
