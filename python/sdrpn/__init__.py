"""SD-RPN: self-distilled region proposal networks for fine-grained MLLM perception."""

import warnings

import torch  # loads libtorch before the extension that links against it

_REBUILD = "rebuild it against this torch: pip install --no-build-isolation . in sdrpn's source folder"

try:
    from . import _C
except ImportError as err:  # most often a torch upgraded under a build made for another
    raise ImportError(
        f"sdrpn's compiled extension does not load into torch {torch.__version__} ({err}): {_REBUILD}"
    ) from err
# Loaded, but built for another torch whose ABI may differ (the build records no local part, +cu130).
if _C.torch_version != torch.__version__.split("+")[0]:
    warnings.warn(
        f"sdrpn was built against torch {_C.torch_version} and runs in torch {torch.__version__}: {_REBUILD}",
        stacklevel=2,
    )

from . import ops  # noqa: E402  (after the extension: its ops are registered by loading it)
from ._C import __version__  # noqa: E402

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
