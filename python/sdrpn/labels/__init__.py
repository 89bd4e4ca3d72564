"""Stage 1: pseudo labels from a model's own attention, and the label folder that holds them."""

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:  # the package's names, imported on first use (sdrpn.lazy_exports)
    from .folder import LabelFolder as LabelFolder
    from .folder import LabelFolderConfig as LabelFolderConfig
    from .job import LabelJob as LabelJob
    from .job import LabelJobConfig as LabelJobConfig
    from .options import LabelOptions as LabelOptions
else:  # hidden from type checkers, which would take any name through __getattr__
    __getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
del lazy_exports, TYPE_CHECKING  # not names of the package
