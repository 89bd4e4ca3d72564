"""Stage 2: the Region Proposal Network, its training data and its training."""

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:  # the package's names, imported on first use (sdrpn.lazy_exports)
    from .dataset import LabelBatch as LabelBatch
    from .dataset import LabelCollator as LabelCollator
    from .dataset import LabelShardDataset as LabelShardDataset
    from .for_labels import rpn_for_labels as rpn_for_labels
    from .model import RegionProposalNetwork as RegionProposalNetwork
    from .model import RPNConfig as RPNConfig
    from .model import rpn_loss as rpn_loss
    from .train import RPNTrainer as RPNTrainer
    from .train_config import TrainConfig as TrainConfig
else:  # hidden from type checkers, which would take any name through __getattr__
    __getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
del lazy_exports, TYPE_CHECKING  # not names of the package
