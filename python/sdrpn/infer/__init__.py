"""Stage 3: answering with RoI crops, for batches of images or a whole data file; and the
base model's answers without them (the baseline rows)."""

from ..lazy_exports import lazy_exports

_HOMES = {
    "BaseLlava": ".baseline",
    "RoiPrediction": ".pipeline",
    "SDRPNAnswer": ".pipeline",
    "SDRPNLlava": ".pipeline",
}
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
del lazy_exports  # not a name of the package
__all__ = sorted(_HOMES)
