"""Stage 3: answering with RoI crops, for batches of images or a whole data file; and the
base model's answers without them (the baseline rows)."""

from .baseline import BaseLlava
from .pipeline import RoiPrediction, SDRPNAnswer, SDRPNLlava

__all__ = ["BaseLlava", "RoiPrediction", "SDRPNAnswer", "SDRPNLlava"]
