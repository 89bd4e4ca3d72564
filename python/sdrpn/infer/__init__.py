"""Stage 3: answering with RoI crops, for batches of images or a whole data file."""

from .pipeline import RoiPrediction, SDRPNAnswer, SDRPNLlava

__all__ = ["RoiPrediction", "SDRPNAnswer", "SDRPNLlava"]
