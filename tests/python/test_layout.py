"""The package's layers: no module imports from a layer above its own."""

import os
import subprocess
import sys

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
