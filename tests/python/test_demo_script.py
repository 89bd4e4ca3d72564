"""scripts/demo.sh passes its flags to `python -m sdrpn.synth run`, and a relative --out
names a folder under the directory it was started from, not under the repository root it
runs from. The script runs here in a copy of the tree's layout, with a stand-in set-up and
a stand-in `python` that records its arguments (the demo itself is run by CI's README test
and by hand)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.fixture
def demo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "demo.sh"), repo / "scripts" / "demo.sh")
    (repo / "scripts" / "setup.sh").write_text("#!/usr/bin/env bash\n")
    (repo / "scripts" / "setup.sh").chmod(0o755)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    record = tmp_path / "argv.txt"
    (venv / "activate").write_text(f'python() {{ printf "%s\\n" "$PWD" "$@" > "{record}"; }}\n')
    caller = tmp_path / "here"
    caller.mkdir()

    def run(*flags):
        done = subprocess.run(
            ["bash", str(repo / "scripts" / "demo.sh"), *flags],
            cwd=caller,
            env=dict(os.environ, SDRPN_VENV=str(tmp_path / "venv")),
            capture_output=True,
            text=True,
            check=True,
        )
        cwd, *argv = record.read_text().splitlines()
        assert os.path.samefile(cwd, repo)  # the run itself starts from the repository root
        return argv, done.stdout.strip()

    return run, str(repo), str(caller)


def test_a_relative_out_lands_where_the_demo_was_started(demo):
    run, repo, caller = demo
    argv, said = run("--out", "mine", "--rpn-epochs", "1")
    assert argv[-4:] == ["--out", f"{caller}/mine", "--rpn-epochs", "1"]
    assert said == f"report: {caller}/mine/report.md (examples.png, metrics.json beside it)"
    argv, said = run("--out=sub/dir")
    assert argv[-1] == f"--out={caller}/sub/dir"
    assert said.startswith(f"report: {caller}/sub/dir/report.md")
    # --model is a folder too; the report's line still names --out's.
    argv, said = run("--model", "base", "--out=o", "--model=b2")
    assert argv[-4:] == ["--model", f"{caller}/base", f"--out={caller}/o", f"--model={caller}/b2"]
    assert said.startswith(f"report: {caller}/o/report.md")


def test_absolute_and_default_outs_are_kept(demo, tmp_path):
    run, repo, caller = demo
    argv, said = run("--out", str(tmp_path / "abs"))
    assert argv[-2:] == ["--out", str(tmp_path / "abs")]
    argv, said = run("--out=/x/y")
    assert argv[-1] == "--out=/x/y"
    for flags in (["--out", "~/x"], ["--out=~/x"]):  # home, which the command expands (a quoted ~ too)
        argv, said = run(*flags)
        assert argv[-len(flags) :] == flags
    argv, said = run()
    assert argv[:5] == ["-m", "sdrpn.synth", "run", "--out", "outputs/demo"]  # the default, in the repository
    report = said.split()[1]  # named whole, so that it is found from wherever the demo was started
    assert os.path.isabs(report) and os.path.realpath(report) == os.path.join(
        os.path.realpath(repo), "outputs/demo/report.md"
    )
