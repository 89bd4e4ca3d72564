"""Stage 2: the Region Proposal Network, its training data and its training."""

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:  # the package's names, imported on first use (sdrpn.lazy_exports)
    from .dataset import LabelBatch, LabelCollator, LabelShardDataset  # noqa: F401
    from .for_labels import rpn_for_labels  # noqa: F401
    from .model import RegionProposalNetwork, RPNConfig, rpn_loss  # noqa: F401
    from .train import RPNTrainer  # noqa: F401
    from .train_config import TrainConfig  # noqa: F401

__getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
del lazy_exports, TYPE_CHECKING  # not names of the package
