"""scripts/gpu_check.sh runs on a machine lent for minutes: a flag a benchmark no longer takes
would cost a step of that run. Every Python command line in it is parsed here by the
argument parser it reaches (nothing is run), and its JSON files are the ones figures.py and
test_benchmarks.py read."""

import argparse
import importlib.util
import os
import re
import shlex
import sys

import pytest

from sdrpn.synth import cli as synth_cli

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
# Values for the shell variables the command lines use; their real values do not change
# what the parsers accept.
SHELL_VARS = {"LOGS": "/logs", "OUT": "/out", "ROOT": ROOT, "SDRPN_TRAIN_BASE_STEPS": "100", "budget": "5"}


def shell_arrays(lines: list[str]) -> dict[str, list[str]]:
    """The script's arrays, `NAME=(...)` and `NAME+=(...)` in the order written, each
    addition taken as if its condition held."""
    arrays: dict[str, list[str]] = {}
    for line in lines:
        for name, add, body in re.findall(r"\b(\w+)(\+?)=\(([^)]*)\)", line):
            arrays[name] = (arrays.get(name, []) if add else []) + shlex.split(body)
    return arrays


def expand(text: str, env: dict, arrays: dict) -> str:
    """`"${NAME[@]}"` and `"${NAME[@]/#/PREFIX}"` as the words of the array (each prefixed),
    then `$NAME` and `${NAME}` from env."""
    words = lambda m: " ".join(shlex.quote((m.group(2) or "") + v) for v in arrays[m.group(1)])  # noqa: E731
    text = re.sub(r"\"\$\{(\w+)\[@\](?:/#/([^}]*))?\}\"", words, text)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], text)


def command_lines() -> list[list[str]]:
    """Each `python3 benchmarks/... ` or `python3 -m ...` command of the script, as argv after
    `python3`, with `for NAME in A B; do ... done` loops unrolled."""
    lines = open(SCRIPT).read().replace("\\\n", " ").splitlines()
    arrays = shell_arrays(lines)
    commands, loop = [], None
    for line in lines:
        header = re.match(r"\s*for (\w+) in ([^;]+); do", line)
        if header:
            loop = (header.group(1), header.group(2).split())
            continue
        if re.match(r"\s*done\b", line):
            loop = None
            continue
        if not re.search(r"python3 \"?(benchmarks/|-m sdrpn|-m pytest)", line):
            continue
        for value in loop[1] if loop else [None]:
            env = dict(SHELL_VARS, **({loop[0]: value} if loop else {}))
            text = expand(line[line.index("python3 ") + 8 :], env, arrays)
            argv = []
            for token in shlex.split(text):
                if token[:1] in (">", "&") or token.startswith("2>"):
                    break
                if token:  # an empty array expands to nothing
                    argv.append(token)
            commands.append(argv)
    return commands


COMMANDS = command_lines()


class Parsed(Exception):
    pass


def parse_benchmark(script: str, argv: list[str]) -> argparse.Namespace:
    """The namespace the benchmark's main() parses from argv; main() stops there."""
    sys.path.insert(0, os.path.dirname(script))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check_" + os.path.basename(script)[:-3], script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        original = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, args=None, namespace=None):
            raise Parsed(original(self, args, namespace))

        argparse.ArgumentParser.parse_args = parse_then_stop
        old_argv, sys.argv = sys.argv, [script, *argv]
        try:
            module.main()
        except Parsed as done:
            return done.args[0]
        finally:
            argparse.ArgumentParser.parse_args, sys.argv = original, old_argv
        raise AssertionError(f"{script}'s main() returned without parsing its arguments")
    finally:
        sys.path.remove(os.path.dirname(script))


def test_the_script_has_its_steps():
    scripts = [argv[0] for argv in COMMANDS]
    assert scripts.count("benchmarks/bench_infer.py") == 1 and "benchmarks/bench_rpn_scores.py" in scripts
    assert ["-m", "sdrpn.synth"] in [a[:2] for a in COMMANDS]
    # The graph tests first, then every other test file: between them, each CUDA case once.
    graphs, rest = [a for a in COMMANDS if a[:2] == ["-m", "pytest"]]
    assert scripts.index("-m") < scripts.index("benchmarks/bench_infer.py")
    first = [a for a in graphs[2:] if a.startswith("tests/")]
    assert (
        first
        and rest[2] == "tests/python"
        and [f"--ignore={t}" for t in first] == [a for a in rest if a.startswith("--ignore=")]
    )


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a[:3]) for a in COMMANDS])
def test_every_command_line_parses(argv, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)  # the GPU machine's; some limits scale with it
    if argv[0].startswith("benchmarks/"):
        args = parse_benchmark(os.path.join(ROOT, argv[0]), argv[1:])
        if "--json" in argv:
            assert args.json == argv[argv.index("--json") + 1]
    elif argv[:2] == ["-m", "sdrpn.synth"]:
        synth_cli.build_parser().parse_args(argv[2:])
    elif argv[:2] == ["-m", "pytest"]:
        assert argv[argv.index("-m", 2) + 1] == "cuda", argv  # the CUDA cases only
        paths = [a.removeprefix("--ignore=") for a in argv[2:] if a.startswith(("tests/", "--ignore=tests/"))]
        assert paths and all(os.path.exists(os.path.join(ROOT, p)) for p in paths), argv
    else:
        pytest.fail(f"no parser known for {argv}")


def test_json_names_are_the_ones_figures_reads():
    """figures.py looks results up by step name, which is the JSON file's name."""
    names = {os.path.basename(a[a.index("--json") + 1])[:-5] for a in COMMANDS if "--json" in a}
    figures = open(os.path.join(ROOT, "benchmarks", "figures.py")).read()
    read = set(re.findall(r"\"(bench_\w+|eval_base)\"", figures))
    assert read and read <= names, read - names
