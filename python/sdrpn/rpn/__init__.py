"""Stage 2: the Region Proposal Network, its training data and its training."""

from .dataset import LabelBatch, LabelCollator, LabelShardDataset
from .for_labels import rpn_for_labels
from .model import RegionProposalNetwork, RPNConfig, rpn_loss
from .train import RPNTrainer
from .train_config import TrainConfig

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
