"""The paper's evaluation (SPEC "Evaluation protocol"): the lmms-eval tasks the reference
reports, the benchmark whose RoI threshold each is answered with, the score each is read by,
and one Markdown table of a results folder as scripts/eval_paper.sh fills it:
RESULTS/<row>/<task>/.../<date>_results.json, the rows "baseline" (roi=false) and "sdrpn".

    python -m sdrpn.integrations.paper tasks          # task, benchmark, threshold, score
    python -m sdrpn.integrations.paper table RESULTS [--out TABLE.md]
"""

from __future__ import annotations

import glob
import math
import os
import sys
from dataclasses import dataclass

from ..cli import Parser, path_arg
from ..io_utils import read_json, write_text
from ..options import TASK_THRESHOLDS


@dataclass(frozen=True)
class PaperTask:
    task: str  # the lmms-eval task
    benchmark: str  # the threshold preset it is answered with (sdrpn.options.TASK_THRESHOLDS)
    metric: str  # the score lmms-eval reports for it
    label: str  # its column in the table
    scale: float = 100.0  # reported as a fraction: shown in percent

    @property
    def threshold(self) -> float:
        return TASK_THRESHOLDS[self.benchmark]

    def score(self, task_results: dict) -> float | None:
        """The task's score in a results file's "results" entry (any filter), scaled."""
        for key, value in task_results.items():
            # A number only: JSON's true is no score, and NaN (a failed metric) none either.
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if key.split(",")[0] == self.metric and number:
                return value * self.scale
        return None


PAPER_TASKS = (
    PaperTask("textvqa_val", "textvqa", "exact_match", "TextVQA"),  # VQA accuracy
    PaperTask("docvqa_val", "docvqa", "anls", "DocVQA"),
    PaperTask("vstar_bench", "vstar", "vstar_overall_acc", "V* Bench", scale=1.0),  # lmms-eval reports percent
    PaperTask("pope", "pope", "pope_f1_score", "POPE (F1)"),
    PaperTask("infovqa_val", "infovqa", "anls", "InfoVQA"),
    PaperTask("chartqa", "chartqa", "relaxed_overall", "ChartQA"),
    PaperTask("ocrbench", "ocrbench", "ocrbench_accuracy", "OCRBench"),
    PaperTask("hrbench4k", "hrbench", "average", "HR-Bench 4K"),
    PaperTask("hrbench8k", "hrbench", "average", "HR-Bench 8K"),
)
# The rows eval_paper.sh writes, in the table's order; other subfolders follow, by name.
ROW_LABELS = {"baseline": "LLaVA-1.5 (no RoI)", "sdrpn": "SD-RPN"}


def task_table() -> str:
    """One line per task: task, benchmark, threshold, score (what eval_paper.sh runs)."""
    return "\n".join(f"{t.task} {t.benchmark} {t.threshold:g} {t.metric}" for t in PAPER_TASKS)


def read_scores(folder: str, tasks=PAPER_TASKS) -> dict[str, float]:
    """Per task, its score in the newest results file under `folder` that has one (a rerun
    of a task replaces its score). Files are named by lmms-eval after their start time."""
    scores: dict[str, float] = {}
    paths = glob.glob(os.path.join(folder, "**", "*_results.json"), recursive=True)
    for path in sorted(paths, key=os.path.basename):
        try:
            results = read_json(path).get("results", {})
        except (OSError, ValueError, AttributeError) as err:  # read_json names the file itself
            raise ValueError(f"{path} is not an lmms-eval results file: {err}") from None
        if not isinstance(results, dict) or not all(isinstance(v, dict) for v in results.values()):
            raise ValueError(f"{path} is not an lmms-eval results file: its results must map tasks to metrics")
        for task in tasks:
            score = task.score(results.get(task.task, {}))
            if score is not None:
                scores[task.task] = score
    return scores


def _rows(results: str) -> list[str]:
    if not os.path.isdir(results):
        raise FileNotFoundError(f"results must be a folder of rows (baseline/, sdrpn/), got {results!r}")
    found = sorted(d for d in os.listdir(results) if os.path.isdir(os.path.join(results, d)))
    return [r for r in ROW_LABELS if r in found] + [r for r in found if r not in ROW_LABELS]


def markdown_table(results: str, tasks=PAPER_TASKS) -> str:
    """One row per row folder, one column per task; "-" where a task has no score yet, and
    the gain of SD-RPN over the baseline where both are there."""
    rows = {row: read_scores(os.path.join(results, row), tasks) for row in _rows(results)}
    head = "| | " + " | ".join(t.label for t in tasks) + " |"
    lines = [head, "|---" * (len(tasks) + 1) + "|"]

    def cells(values) -> str:
        return " | ".join("-" if v is None else v for v in values)

    for row, scores in rows.items():
        values = [None if t.task not in scores else f"{scores[t.task]:.1f}" for t in tasks]
        lines.append(f"| {ROW_LABELS.get(row, row)} | {cells(values)} |")
    if "baseline" in rows and "sdrpn" in rows:
        base, ours = rows["baseline"], rows["sdrpn"]
        gains = [f"{ours[t.task] - base[t.task]:+.1f}" if t.task in base and t.task in ours else None for t in tasks]
        lines.append(f"| gain | {cells(gains)} |")
    thresholds = ", ".join(f"{t.label} {t.threshold:g}" for t in tasks)
    return "\n".join(lines) + f"\n\nRoI thresholds: {thresholds}. Scores in percent.\n"


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m sdrpn.integrations.paper", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks", help="the tasks: lmms-eval task, benchmark, RoI threshold, score")
    table = sub.add_parser("table", help="the Markdown table of a results folder")
    table.add_argument("results", type=path_arg, help="the folder eval_paper.sh writes (one subfolder per row)")
    table.add_argument("--out", type=path_arg, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.command == "tasks":
        print(task_table())
        return 0
    try:
        text = markdown_table(args.results)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        write_text(args.out, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
