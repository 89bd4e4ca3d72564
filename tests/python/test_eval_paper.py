"""The paper's evaluation: its task list, the Markdown table of a made-up lmms-eval results
folder, and scripts/eval_paper.sh's commands (dry run)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from sdrpn.integrations.paper import PAPER_TASKS, main, markdown_table, read_scores, task_table
from sdrpn.options import TASK_THRESHOLDS

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "eval_paper.sh")


def write_results(folder, date: str, results: dict) -> None:
    """A results file where lmms-eval puts one: OUTPUT_PATH/<model>/<date>_results.json."""
    path = folder / "model_name" / f"{date}_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "config": {"model": "sdrpn_llava"}}))


def test_the_reference_tasks_with_their_thresholds():
    tasks = {t.task: t for t in PAPER_TASKS}
    spec = ("textvqa_val", "docvqa_val", "vstar_bench", "pope", "infovqa_val", "chartqa", "ocrbench")
    assert set(spec) <= set(tasks) and {"hrbench4k", "hrbench8k"} <= set(tasks)
    assert {t.benchmark for t in PAPER_TASKS} == set(TASK_THRESHOLDS)
    assert (tasks["textvqa_val"].threshold, tasks["docvqa_val"].threshold, tasks["ocrbench"].threshold) == (
        0.15,
        0.10,
        0.05,
    )
    assert task_table().splitlines()[0] == "textvqa_val textvqa 0.15 exact_match"


def test_markdown_table_of_a_results_folder(tmp_path):
    write_results(tmp_path / "baseline" / "textvqa_val", "20260101_100000", {"textvqa_val": {"exact_match,none": 0.5}})
    write_results(tmp_path / "baseline" / "pope", "20260101_100000", {"pope": {"pope_f1_score,none": 0.85}})
    sdrpn = tmp_path / "sdrpn"
    write_results(sdrpn / "textvqa_val", "20260101_090000", {"textvqa_val": {"exact_match,none": 0.1}})
    write_results(
        sdrpn / "textvqa_val",
        "20260102_090000",  # a later rerun replaces the score
        {"textvqa_val": {"alias": "textvqa_val", "exact_match,none": 0.585, "exact_match_stderr,none": 0.004}},
    )
    write_results(sdrpn / "vstar_bench", "20260101_100000", {"vstar_bench": {"vstar_overall_acc,none": 55.0}})
    assert read_scores(str(sdrpn)) == {"textvqa_val": pytest.approx(58.5), "vstar_bench": 55.0}
    lines = markdown_table(str(tmp_path)).splitlines()
    assert lines[0].startswith("| | TextVQA | DocVQA | V* Bench | POPE (F1) |")
    assert lines[2] == "| LLaVA-1.5 (no RoI) | 50.0 | - | - | 85.0 | - | - | - | - | - |"
    assert lines[3] == "| SD-RPN | 58.5 | - | 55.0 | - | - | - | - | - | - |"
    assert lines[4] == "| gain | +8.5 | - | - | - | - | - | - | - | - |"
    assert "TextVQA 0.15" in lines[-1] and "OCRBench 0.05" in lines[-1]
    out = tmp_path / "results.md"
    assert main(["table", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_text().splitlines()[3] == lines[3]


def test_a_bad_results_folder_is_named(tmp_path, capsys):
    assert main(["table", str(tmp_path / "none")]) == 2
    assert "results must be a folder of rows" in capsys.readouterr().err
    broken = tmp_path / "sdrpn" / "pope" / "m" / "20260101_000000_results.json"
    broken.parent.mkdir(parents=True)
    # Each had been a traceback, or a message without the file.
    for text in ("{not json", '{"results": [1]}', '{"results": null}', '{"results": {"pope": 5}}', "[" * 100_000):
        broken.write_text(text)
        assert main(["table", str(tmp_path)]) == 2
        assert f"{broken} is not an lmms-eval results file" in capsys.readouterr().err
    # A score of true or NaN is no score (true had shown as 100.0).
    for value in ("true", "NaN"):
        broken.write_text('{"results": {"pope": {"pope_f1_score,none": ' + value + "}}}")
        assert main(["table", str(tmp_path)]) == 0
        assert "| SD-RPN | - | - | - | - |" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed")
def test_each_score_is_one_lmms_eval_reports_for_its_task():
    tasks_dir = os.path.join(os.path.dirname(importlib.util.find_spec("lmms_eval").origin), "tasks")
    texts = {}
    for folder, _, files in os.walk(tasks_dir):
        for name in files:
            if name.endswith(".yaml") or "yaml" in name:
                texts[os.path.join(folder, name)] = open(os.path.join(folder, name), errors="replace").read()
    for task in PAPER_TASKS:
        defining = [p for p, t in texts.items() if f"task: {task.task}\n" in t or f'task: "{task.task}"' in t]
        assert defining, f"lmms-eval defines no task {task.task}"
        folder = os.path.dirname(defining[0])
        assert any(f"metric: {task.metric}" in t for p, t in texts.items() if os.path.dirname(p) == folder), task


def run_script(*args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120)


def test_eval_paper_runs_both_rows_of_every_task_with_its_threshold(tmp_path):
    result = run_script("--rpn", "RPN", "--out", str(tmp_path), "--dry-run", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if " -m lmms_eval " in line]
    assert len(commands) == 2 * len(PAPER_TASKS)
    for task in PAPER_TASKS:
        ours = next(c for c in commands if f"sdrpn {task.task}:" in c)
        base = next(c for c in commands if f"baseline {task.task}:" in c)
        assert f"rpn=RPN,dtype=fp16,task_preset={task.benchmark} --tasks {task.task} --batch_size 4" in ours
        assert "roi=false" in base and "task_preset" not in base
    # A (row, task) with results is not run again.
    write_results(tmp_path / "sdrpn" / "pope", "20260101_100000", {"pope": {"pope_f1_score,none": 0.8}})
    again = run_script("--rpn", "RPN", "--out", str(tmp_path), "--dry-run", "--tasks", "pope")
    assert "sdrpn pope: done already" in again.stdout and "baseline pope: " in again.stdout


def test_eval_paper_help_and_bad_arguments():
    help_text = run_script("--help")
    assert help_text.returncode == 0 and "OPENAI_API_KEY" in help_text.stdout
    assert "textvqa_val textvqa 0.15 exact_match" in help_text.stdout
    assert "--rpn is required" in run_script().stderr
    bad = run_script("--rpn", "R", "--tasks", "mmmu_val")
    assert bad.returncode == 2 and "mmmu_val is not one of the paper's tasks" in bad.stderr
