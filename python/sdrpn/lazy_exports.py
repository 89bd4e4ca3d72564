"""Package names imported on first use.

The stage packages export their main classes at the top (``from sdrpn.labels import
LabelJob``), but most of them need transformers. Importing them eagerly in ``__init__``
would make every module of the package need it too, the option classes and file formats
the command line's parser is built from included, so ``sdrpn --help`` would fail on an
install without the `llava` extra. The names are looked up in their module when first asked
for instead (PEP 562).
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, homes: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for ``package``, whose names live in its submodules
    (``homes``: name -> ".module"). A name is imported from its module the first time it is
    asked for, then kept in the package like an eagerly imported one."""

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return __getattr__, __dir__
