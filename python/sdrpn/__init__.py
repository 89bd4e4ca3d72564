"""SD-RPN: self-distilled region proposal networks for fine-grained MLLM perception."""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import _C, ops
from ._C import __version__

__all__ = ["ops", "__version__", "build_info"]


def build_info() -> dict:
    """How the compiled extension was built: version, CUDA support and architectures, and
    whether its CPU kernels run on several threads (OpenMP)."""
    return {
        "version": _C.__version__,
        "with_cuda": bool(_C.with_cuda),
        "with_openmp": bool(_C.with_openmp),
        "cuda_archs": _C.cuda_archs,
        "torch_version": _C.torch_version,
    }
