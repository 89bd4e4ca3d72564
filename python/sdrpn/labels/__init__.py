"""Stage 1: pseudo labels from a model's own attention, and the label folder that holds them."""

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:  # the package's names, imported on first use (sdrpn.lazy_exports)
    from .folder import LabelFolder, LabelFolderConfig  # noqa: F401
    from .job import LabelJob, LabelJobConfig  # noqa: F401
    from .options import LabelOptions  # noqa: F401

__getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
del lazy_exports, TYPE_CHECKING  # not names of the package
