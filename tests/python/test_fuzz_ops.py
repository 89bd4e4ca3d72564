"""The op fuzzer, scripts/fuzz_ops.py, in its quick mode on the CPU: no hostile or unlucky
input may crash an op, hang it, or make it return a wrong result instead of an error."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "fuzz_ops.py")
FAILING = ("CRASH", "HANG", "SILENT_WRONG", "FUZZER_ERROR")


def fuzz(tmp_path, *args):
    report = tmp_path / "fuzz.json"
    run = subprocess.run(
        [sys.executable, SCRIPT, "--device", "cpu", "--json", str(report), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.exists(), run.stdout[-2000:] + run.stderr[-3000:]
    return run, json.loads(report.read_text())["cases"]


def test_quick_fuzz_finds_no_crash_hang_or_silent_wrong(tmp_path):
    run, cases = fuzz(tmp_path, "--quick")
    outcomes = Counter(case["outcome"] for case in cases)
    # Both sides must have been exercised: inputs that work and inputs refused by name.
    assert outcomes["OK"] > 200 and outcomes["CLEAN_ERROR"] > 200, outcomes
    assert {case["op"] for case in cases} == {
        "pseudo_labels",
        "massive_activation_sinks",
        "attention_rows",
        "rpn_scores",
        "roi_boxes",
        "roi_crops",
    }
    failing = [
        f"{case['outcome']} {case['id']}\n    args: {case['args']}\n    {case['detail']}"
        for case in cases
        if case["outcome"] in FAILING
    ]
    if failing:
        pytest.fail(f"{len(failing)} failing case(s):\n" + "\n".join(failing), pytrace=False)
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_case_past_its_timeout_is_a_hang_and_fails_the_run(tmp_path):
    run, cases = fuzz(tmp_path, "--case", "roi_boxes/cpu/base.float32", "--random", "0", "--timeout", "0.001")
    assert [case["outcome"] for case in cases] == ["HANG"]
    assert run.returncode == 1
    assert "HANG" in run.stdout and "roi_boxes/cpu/base.float32" in run.stdout
