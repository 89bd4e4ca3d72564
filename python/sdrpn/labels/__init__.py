"""Stage 1: pseudo labels from a model's own attention, and the label folder that holds them."""

from ..lazy_exports import lazy_exports

_HOMES = {
    "LabelFolder": ".folder",
    "LabelFolderConfig": ".folder",
    "LabelJob": ".job",
    "LabelJobConfig": ".job",
    "LabelOptions": ".options",
}
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
del lazy_exports  # not a name of the package
__all__ = sorted(_HOMES)
