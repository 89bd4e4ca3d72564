#!/usr/bin/env python3
"""Fails when a module of the sdrpn package imports from a layer above its own.

The package is stacked in the order the data flows; a module may import its own layer
and the layers below it, never one above:

  0  foundation  ops, options, io_utils, optim_state, pictures, subsets, distributed (and the compiled _C)
  1  llava       everything that knows Hugging Face LLaVA
  2  labels      Stage 1
  3  rpn         Stage 2
  4  infer       Stage 3
  5  cli         the command line (and __main__)
  6  integrations  adapters to other tools (lmms-eval): consumers of the stages, as cli is
  -  synth       the synthetic task may use every layer; no layer may use it

Usage: check_imports.py [PACKAGE_DIR]   (default: python/sdrpn beside this script)
"""

from __future__ import annotations

import ast
import os
import sys

LAYERS = {"llava": 1, "labels": 2, "rpn": 3, "infer": 4, "cli": 5, "__main__": 5, "integrations": 6, "synth": 7}
FOUNDATION = 0


def layer_of(parts: list[str]) -> int:
    """The layer of a module given as its path inside the package (["rpn", "model"])."""
    return LAYERS.get(parts[0], FOUNDATION) if parts else FOUNDATION


def imported_modules(tree: ast.Module, parts: list[str], is_package: bool) -> list[tuple[int, list[str]]]:
    """(line, path inside sdrpn) of every sdrpn module the file imports."""
    found = []
    here = parts if is_package else parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "sdrpn":
                    found.append((node.lineno, names[1:]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else list(here)
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "sdrpn":
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.append((node.lineno, target))
            else:  # "from . import x" at the package root: x is the module
                found += [(node.lineno, [alias.name]) for alias in node.names]
    return found


def check(package_dir: str) -> list[str]:
    problems = []
    for root, _, files in os.walk(package_dir):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, package_dir)[: -len(".py")].split(os.sep)
            is_package = rel[-1] == "__init__"
            parts = rel[:-1] if is_package else rel
            own = layer_of(parts)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for line, target in imported_modules(tree, parts, is_package):
                if layer_of(target) > own:
                    problems.append(
                        f"{path}:{line}: {'.'.join(['sdrpn', *parts])} (layer {own}) imports "
                        f"{'.'.join(['sdrpn', *target])} (layer {layer_of(target)}), a layer above"
                    )
    return problems


def main(argv: list[str]) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    package_dir = argv[1] if len(argv) > 1 else os.path.join(here, "..", "python", "sdrpn")
    problems = check(package_dir)
    for line in problems:
        print(line)
    print(f"import direction: {len(problems)} upward import(s)" if problems else "import direction: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
