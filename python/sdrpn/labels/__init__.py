"""Stage 1: pseudo labels from a model's own attention, and the label folder that holds them."""

from .folder import LabelFolder, LabelFolderConfig
from .job import LabelJob, LabelJobConfig
from .options import LabelOptions

__all__ = ["LabelFolder", "LabelFolderConfig", "LabelJob", "LabelJobConfig", "LabelOptions"]
