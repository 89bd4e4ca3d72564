"""The package's layers: no module imports from a layer above its own."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "check_imports.py")


def check(package_dir):
    return subprocess.run([sys.executable, SCRIPT, str(package_dir)], capture_output=True, text=True)


def test_the_package_imports_only_downwards():
    result = check(os.path.join(ROOT, "python", "sdrpn"))
    assert result.returncode == 0, result.stdout


def test_an_upward_import_fails(tmp_path):
    for folder in ("llava", "labels", "rpn"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "ops.py").write_text("import torch\n")
    (tmp_path / "llava" / "maps.py").write_text("from .. import ops\nfrom ..labels import folder\n")
    (tmp_path / "labels" / "job.py").write_text("from sdrpn.llava import maps\nimport sdrpn.rpn.model\n")
    (tmp_path / "rpn" / "model.py").write_text("from ..labels.job import x\nfrom ..synth import task\n")
    result = check(tmp_path)
    assert result.returncode == 1
    assert "llava/maps.py:2" in result.stdout and "labels/job.py:2" in result.stdout
    assert "rpn/model.py:2" in result.stdout and "3 upward import(s)" in result.stdout


# The stage packages' public names: a name dropped from a package's TYPE_CHECKING block would
# leave its __all__ as well, so the list is written out here.
EXPORTS = {
    "sdrpn.llava": ["AttentionMaps", "AttentionProbe", "EarlyExit", "HeadSelection", "LLAVA15_13B", "LLAVA15_7B",
                    "LlavaPreset", "PRESETS", "TeacherForcedBatch", "attention_maps", "get_preset",
                    "given_answer_maps", "probe_once", "model_turn"],
    "sdrpn.labels": ["LabelFolder", "LabelFolderConfig", "LabelJob", "LabelJobConfig", "LabelOptions"],
    "sdrpn.rpn": ["LabelBatch", "LabelCollator", "LabelShardDataset", "RPNConfig", "RPNTrainer",
                  "RegionProposalNetwork", "TrainConfig", "rpn_for_labels", "rpn_loss"],
    "sdrpn.infer": ["BaseLlava", "RoiPrediction", "SDRPNAnswer", "SDRPNLlava"],
    "sdrpn.synth": ["COLOURS", "SynthSample", "TinyLlavaSpec", "accuracy", "box_iou", "build_tiny_llava", "hit",
                    "make_char_tokenizer", "make_sample", "split_seeds", "write_dataset"],
}  # fmt: skip


def test_every_name_a_stage_package_exports_is_found_where_it_says():
    # The stage packages import their names on first use (sdrpn.lazy_exports): each must be
    # found in the module it names, and be listed by dir() before it is.
    import importlib

    for package, names in EXPORTS.items():
        module = importlib.import_module(package)
        assert sorted(module.__all__) == sorted(names), package
        assert set(names) <= set(dir(module)) and not {"lazy_exports", "TYPE_CHECKING"} & set(dir(module)), package
        for name in module.__all__:
            value = getattr(module, name)
            assert vars(module)[name] is value  # kept after the first lookup
        with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nothing_here'"):
            _ = module.nothing_here


def test_type_checkers_see_each_stage_packages_names_and_no_module_getattr():
    # What mypy and pyright read: a module-level __getattr__ would make any name, a misspelt
    # one too, type as Any, so it sits in the TYPE_CHECKING block's else branch; the names
    # they may import are the block's "import X as X" ones (PEP 484's explicit re-export)
    # or a literal __all__'s.
    import ast

    for package, names in EXPORTS.items():
        path = os.path.join(ROOT, "python", *package.split("."), "__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        seen_by_checkers, exported = [], set()
        for node in tree.body:
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                seen_by_checkers += node.body
                exported |= {a.name for n in node.body for a in n.names if a.asname == a.name}
            else:
                seen_by_checkers.append(node)
            if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__":
                exported |= set(ast.literal_eval(node.value))
        bound = {ast.unparse(t) for n in seen_by_checkers if isinstance(n, ast.Assign) for t in n.targets}
        assert not any("__getattr__" in b for b in bound), package
        assert exported == set(names), package


def test_a_stage_package_imports_none_of_its_modules_until_a_name_is_asked_for():
    code = (
        "import sys, sdrpn.llava, sdrpn.labels, sdrpn.rpn, sdrpn.infer\n"
        "stages = ('llava', 'labels', 'rpn', 'infer')\n"
        "loaded = [m for m in sys.modules if m.count('.') == 2 and m.split('.')[1] in stages]\n"
        "assert not loaded, loaded\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_lazy_name_is_imported_only_when_asked_for(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    init = (
        "from typing import TYPE_CHECKING\n"
        "from sdrpn.lazy_exports import lazy_exports\n"
        "if TYPE_CHECKING:\n"
        "    from .heavy import VALUE, other as renamed\n"
        "__getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)\n"
    )
    (package / "__init__.py").write_text(init)
    (package / "heavy.py").write_text("VALUE = 7\nother = 8\n")
    code = (
        "import sys, pkg\n"
        "assert 'pkg.heavy' not in sys.modules and {'VALUE', 'renamed'} <= set(dir(pkg))\n"
        "assert pkg.__all__ == ['VALUE', 'renamed']\n"
        "from pkg import VALUE\n"
        "assert VALUE == 7 and 'pkg.heavy' in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.path.join(ROOT, "python")]))

    def run():
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)

    done = run()
    assert done.returncode == 0, done.stderr
    # Anything but "from .module import names" in the block, or no names at all, is refused.
    for block, message in [
        ("    import os\n", "__init__.py:4: only 'from .module import name' goes here"),
        ("    from os import path\n", "__init__.py:4: only 'from .module import name' goes here"),
        ("    pass\n", "__init__.py:4: only 'from .module import name' goes here"),
        ("    from . import heavy\n", "__init__.py:4: only 'from .module import name' goes here"),
    ]:
        (package / "__init__.py").write_text(init.replace("    from .heavy import VALUE, other as renamed\n", block))
        done = run()
        assert done.returncode == 1 and message in done.stderr, done.stderr
    # A parent package's module would be looked up as the package's own.
    (package / "__init__.py").write_text(init.replace("from .heavy", "from ..heavy"))
    done = run()
    assert done.returncode == 1 and "__init__.py:4: only 'from .module import name' goes here" in done.stderr
    # Only the top-level block lists names: one inside a function lists none.
    nested = init.replace("if TYPE_CHECKING:\n    from", "def f():\n  if TYPE_CHECKING:\n    from")
    for text in (init.replace("if TYPE_CHECKING:", "if False:"), nested):
        (package / "__init__.py").write_text(text)
        done = run()
        assert done.returncode == 1 and "imports no names under 'if TYPE_CHECKING:'" in done.stderr, done.stderr
