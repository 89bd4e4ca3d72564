"""What users install: the source distribution holds everything the build compiles, and an
install of the ops alone (no `llava` extra) says in one line what the commands need."""

import glob
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# The llava extra's packages made unimportable, as in an environment that never had them.
WITHOUT_EXTRA = (
    "import sys\nfor m in ('transformers', 'accelerate', 'tokenizers', 'huggingface_hub'):\n    sys.modules[m] = None\n"
)


def test_the_source_distribution_holds_every_file_the_build_needs(tmp_path):
    env = dict(os.environ, SDRPN_CPU_ONLY="1")
    cmd = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (archive,) = glob.glob(str(tmp_path / "sdrpn-*.tar.gz"))
    with tarfile.open(archive) as tar:
        held = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = ["CMakeLists.txt", "setup.py", "pyproject.toml", "LICENSE", "README.md", "requirements.txt"]
    for pattern in ("include/**/*.h", "csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.cu", "cmake/*", "python/**/*.py"):
        needed += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)]
    needed += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "python/sdrpn/synth/base_model/*"))]
    needed.append("python/sdrpn/py.typed")
    assert len(needed) > 100 and not sorted(set(needed) - held)
    assert not [name for name in held if name.endswith((".so", ".pyc"))]  # no build of this machine's


def test_an_install_holds_the_typed_marker_and_the_shipped_model(tmp_path):
    # What pip installs from the package folders (a wheel's build_py step): without py.typed,
    # a user's type checker skips sdrpn's annotations and takes every name as Any (PEP 561).
    env = dict(os.environ, SDRPN_CPU_ONLY="1")
    cmd = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "sdrpn" / "py.typed").is_file()
    shipped = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "python/sdrpn/synth/base_model/*"))}
    assert shipped and shipped <= set(os.listdir(tmp_path / "sdrpn" / "synth" / "base_model"))


@pytest.mark.parametrize(
    "module, argv, command",
    [
        ("sdrpn.cli", ["label", "--model", "m", "--data", "d", "--image-folder", ".", "--out", "x"], "sdrpn label"),
        ("sdrpn.cli", ["train", "--model", "m", "--labels", "l", "--out", "x"], "sdrpn train"),
        ("sdrpn.cli", ["infer", "--model", "m", "--rpn", "r", "--image", "i.png", "--question", "q"], "sdrpn infer"),
        ("sdrpn.synth.cli", ["run", "--out", "x"], "sdrpn-synth run"),
    ],
)
def test_without_the_llava_extra_a_command_says_so_in_one_line(tmp_path, module, argv, command):
    code = WITHOUT_EXTRA + f"from {module} import entry\nsys.exit(entry({argv!r}))\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    missing = line.removeprefix(f"{command}: error: this command needs the llava extra (").split(" ")[0]
    assert missing in ("transformers", "huggingface_hub") and "'.[llava]'" in line, line
    assert not os.listdir(tmp_path)  # refused before anything is written
    # --debug shows the traceback; the ops work without the extra.
    debug = subprocess.run([sys.executable, "-c", code.replace(f"{argv!r}", f"{argv + ['--debug']!r}")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ModuleNotFoundError" in debug.stderr


def test_without_the_llava_extra_the_commands_that_load_no_model_work(tmp_path):
    # The parser is built from the stages' option classes: they, and the label folder they
    # read, need torch only, so help and version come out; so do the commands without a model.
    records = [
        {"question_id": q, "image": f"{q}.jpg", "prompt": "what?", "text": "K7",
         "sink_attn": np.full(16, 1e-3, np.float32), "grounding_attn_o2i": np.eye(16, dtype=np.float32)[q][None]}
        for q in range(3)
    ]  # fmt: skip
    with open(tmp_path / "in.pkl", "wb") as f:
        pickle.dump(records, f)
    runs = [
        ["--version"],
        ["--help"],
        ["label", "--help"],
        ["train", "--help"],
        ["infer", "--help"],
        ["label-demo", "--out", "demo", "--batch", "2"],
        ["convert-labels", "in.pkl", "labels"],
        ["viz-labels", "labels", "--out", "pictures", "--num", "2"],
    ]
    code = WITHOUT_EXTRA + (
        "import contextlib, io\nfrom sdrpn.cli import entry\n"
        f"for argv in {runs!r}:\n"
        "    out = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            status = entry(argv)\n"
        "    except SystemExit as done:  # --help and --version exit\n"
        "        status = done.code\n"
        "    print(argv[0], status, repr(out.getvalue()[:60]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and not done.stderr.count("error"), done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [[argv[0], "0"] for argv in runs], done.stdout
    assert "'sdrpn 0.1" in lines[0] and all("'usage: sdrpn" in line for line in lines[1:5])
    assert "labelled 2 maps" in lines[5] and '"labelled": 3' in lines[6] and "wrote 2 pictures" in lines[7]
    assert len(os.listdir(tmp_path / "pictures")) == 2


def test_the_stage_packages_import_without_the_llava_extra():
    code = WITHOUT_EXTRA + "import sdrpn.llava, sdrpn.labels, sdrpn.rpn, sdrpn.infer, sdrpn.synth, sdrpn.infer.viz\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_ops_need_no_llava_extra():
    code = WITHOUT_EXTRA + (
        "import torch, sdrpn\n"
        "labels = sdrpn.ops.pseudo_labels(torch.rand(2, 16), torch.zeros(2, 16), 4, 4)\n"
        "print(tuple(labels.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "(2, 16)", done.stderr[-3000:]


def test_a_missing_module_is_taken_for_the_extras_by_its_package_alone(capsys):
    from sdrpn.cli import run_command

    def outside(argv):
        import sdrpn_no_such_module  # noqa: F401

    def nameless(argv):  # raised by hand, without a module's name
        raise ModuleNotFoundError("something is missing")

    def submodule(argv):  # a transformers without a module these commands import
        raise ModuleNotFoundError("No module named 'transformers.models.llava'", name="transformers.models.llava")

    for main in (outside, nameless):
        with pytest.raises(ModuleNotFoundError):
            run_command(main, "sdrpn", ["label"])
    assert run_command(submodule, "sdrpn", ["label"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sdrpn label: error: this command needs the llava extra (transformers.models.llava is")


def test_a_build_for_another_torch_says_to_rebuild_it():
    def run(code):
        return subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)

    assert run("import sdrpn").returncode == 0  # the build matches the torch it runs in: no warning
    # A build that no longer loads: a torch upgraded under it leaves symbols undefined.
    unlinkable = (
        "import importlib.abc, sys\n"
        "class Unlinkable(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'sdrpn._C':\n"
        "            raise ImportError('sdrpn/_C.so: undefined symbol: _ZN3c104impl')\n"
        "sys.meta_path.insert(0, Unlinkable())\n"
        "import sdrpn\n"
    )
    for code in (unlinkable, "import sys\nsys.modules['sdrpn._C'] = None\nimport sdrpn\n"):
        done = run(code)
        assert done.returncode == 1 and "sdrpn's compiled extension does not load into torch " in done.stderr
        assert "pip install --no-build-isolation . in sdrpn's source folder" in done.stderr
    assert "undefined symbol" in run(unlinkable).stderr
    # One that loads into another version of torch: the warning points at the user's import.
    done = subprocess.run([sys.executable, "-c", "import torch\ntorch.__version__ = '9.9.9+cu999'\nimport sdrpn\n"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stderr.startswith("<string>:3: UserWarning: sdrpn was built against torch 2.")
    assert "runs in torch 9.9.9+cu999" in done.stderr
