"""Stage 2: the Region Proposal Network, its training data and its training."""

from .dataset import LabelBatch, LabelCollator, LabelShardDataset
from .model import RegionProposalNetwork, RPNConfig, rpn_loss
from .train import RPNTrainer, TrainConfig, rpn_for_labels

__all__ = [
    "LabelBatch",
    "LabelCollator",
    "LabelShardDataset",
    "RPNConfig",
    "RPNTrainer",
    "RegionProposalNetwork",
    "TrainConfig",
    "rpn_for_labels",
    "rpn_loss",
]
