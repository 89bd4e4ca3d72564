"""sdrpn is typed (PEP 561's py.typed): a user's type checker reads its signatures from the
installed package. The README's answering example checks clean under mypy, and misspelt
names and wrong arguments in calls to the public API are flagged."""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from test_readme_example import examples

pytest.importorskip("mypy")

# Each "# error:" line is a run-time error that the type checker now sees first; each
# reveal_type, what it takes the value for.
USER_CODE = """\
from PIL import Image
from sdrpn.infer import SDRPNLlava
from sdrpn.llava.loading import load_llava
from sdrpn.rpn import rpn_for_labels
from sdrpn.infer import SDRPNLlavaa  # error: Module "sdrpn.infer" has no attribute "SDRPNLlavaa"
import sdrpn.rpn
llava, tokenizer = load_llava("m")
reveal_type(llava)  # note: LlavaForConditionalGeneration
reveal_type(tokenizer)  # note: PreTrainedTokenizerBase
rpn = rpn_for_labels(llava, "labels", brach_layer=2)  # error: Unexpected keyword argument "brach_layer"
pipe = SDRPNLlava(llava, tokenizer, rpn)
pipe.generate(Image.new("RGB", (8, 8)), ["q"])  # error: Argument 1 to "generate" of "SDRPNLlava" has incompatible
trainer = sdrpn.rpn.RPNTrainr  # error: Module has no attribute "RPNTrainr"
"""


def mypy_messages(stdout: str, file: str) -> dict[int, list[str]]:
    """line -> mypy's errors and notes there"""
    found: dict[int, list[str]] = {}
    for match in re.finditer(rf"^{file}:(\d+): (.*)$", stdout, re.M):
        found.setdefault(int(match[1]), []).append(match[2])
    return found


def test_a_type_checker_holds_calls_to_sdrpns_signatures(tmp_path):
    try:
        importlib.metadata.distribution("sdrpn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sdrpn is not installed (pip install -e .): a type checker finds installed packages")
    (tmp_path / "answer.py").write_text(examples()["answer"][1])
    (tmp_path / "user.py").write_text(USER_CODE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}  # as the user's
    # The cache kept in build/: mypy reads all of torch (a minute) on its first run only.
    cache = os.path.join(os.path.dirname(__file__), "..", "..", "build", "mypy_cache")
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", os.path.abspath(cache), "--python-executable", sys.executable]
    done = subprocess.run(
        [*cmd, "answer.py", "user.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert mypy_messages(done.stdout, r"answer\.py") == {}, done.stdout  # the README's example is clean
    found = mypy_messages(done.stdout, r"user\.py")
    wanted = {n: line.split("  # ")[1] for n, line in enumerate(USER_CODE.splitlines(), 1) if "  # " in line}
    assert sorted(found) == sorted(wanted), done.stdout
    for line, message in wanted.items():
        kind, text = message.split(": ", 1)
        assert any(m.startswith(kind) and text in m for m in found[line]), (line, found[line])
