"""Stage 2: the Region Proposal Network, its training data and its training."""

from ..lazy_exports import lazy_exports

_HOMES = {
    "LabelBatch": ".dataset",
    "LabelCollator": ".dataset",
    "LabelShardDataset": ".dataset",
    "rpn_for_labels": ".for_labels",
    "RPNConfig": ".model",
    "RegionProposalNetwork": ".model",
    "rpn_loss": ".model",
    "RPNTrainer": ".train",
    "TrainConfig": ".train_config",
}
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
del lazy_exports  # not a name of the package
__all__ = sorted(_HOMES)
