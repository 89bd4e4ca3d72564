"""Package names imported on first use.

The stage packages export their main classes at the top (``from sdrpn.labels import
LabelJob``), but most of them need transformers. Importing them eagerly in ``__init__``
would make every module of the package need it too, the option classes and file formats
the command line's parser is built from included, so ``sdrpn --help`` would fail on an
install without the `llava` extra. The names are looked up in their module when first asked
for instead (PEP 562).

A package lists its names once, as the imports of an ``if TYPE_CHECKING:`` block: type
checkers and editors read them there, and ``lazy_exports`` reads the block's source to know
where each name lives. The package calls it in the block's ``else:`` branch, out of type
checkers' sight: to them a module ``__getattr__`` would make every name exist, a misspelt one
too.
"""

from __future__ import annotations

import ast
import importlib
import sys


def lazy_exports(package: str, init_file: str):
    """``__getattr__``, ``__dir__`` and the names of ``package``, whose ``__init__`` source
    (``init_file``) imports them from its submodules under ``if TYPE_CHECKING:``. A name is
    imported from its module the first time it is asked for, then kept in the package like
    an eagerly imported one."""
    homes = _type_checking_imports(init_file)

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return __getattr__, __dir__, sorted(homes)


def _type_checking_imports(init_file: str) -> dict[str, str]:
    """name -> ".module" of each relative import under the file's ``if TYPE_CHECKING:``."""
    with open(init_file, encoding="utf-8") as f:
        tree = ast.parse(f.read(), init_file)
    homes = {}
    for block in tree.body:
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING":
            for node in block.body:
                if not (isinstance(node, ast.ImportFrom) and node.level == 1 and node.module):
                    raise ImportError(f"{init_file}:{node.lineno}: only 'from .module import name' goes here")
                homes.update({alias.asname or alias.name: "." + node.module for alias in node.names})
    if not homes:
        raise ImportError(f"{init_file} imports no names under 'if TYPE_CHECKING:'")
    return homes
