"""Stage 3: answering with RoI crops, for batches of images or a whole data file; and the
base model's answers without them (the baseline rows)."""

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:  # the package's names, imported on first use (sdrpn.lazy_exports)
    from .baseline import BaseLlava as BaseLlava
    from .pipeline import RoiPrediction as RoiPrediction
    from .pipeline import SDRPNAnswer as SDRPNAnswer
    from .pipeline import SDRPNLlava as SDRPNLlava
else:  # hidden from type checkers, which would take any name through __getattr__
    __getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
del lazy_exports, TYPE_CHECKING  # not names of the package
