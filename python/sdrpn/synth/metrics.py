"""Scoring on the synthetic task: answer accuracy and localisation against the true box."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Exact match after trimming, lower-casing and dropping a final full stop."""
    if len(predictions) != len(answers):
        raise ValueError(f"predictions and answers must pair up, got {len(predictions)} and {len(answers)}")
    if not answers:
        return 0.0
    return sum(normalise_answer(p) == normalise_answer(a) for p, a in zip(predictions, answers)) / len(answers)


def accuracy_by_kind(samples, answers: Sequence[str]) -> dict:
    """Exact-match accuracy per question kind of the samples, and over all of them ("all")."""
    if len(samples) != len(answers):
        raise ValueError(f"samples and answers must pair up, got {len(samples)} and {len(answers)}")
    right = defaultdict(list)
    for s, a in zip(samples, answers):
        right[s.kind].append(normalise_answer(a) == normalise_answer(s.answer))
    table = {k: round(sum(v) / len(v), 3) for k, v in sorted(right.items())}
    table["all"] = round(sum(sum(v) for v in right.values()) / max(1, len(samples)), 3)
    return table


def answer_changes(samples, before: Sequence[str], after: Sequence[str]) -> dict:
    """Per question kind, how many answers turned right and how many turned wrong from
    `before` to `after`, and the paired standard error of the accuracy's change in points
    (sqrt(changed) / questions): what tells a real change of a kind from chance."""
    if not len(samples) == len(before) == len(after):
        raise ValueError(f"samples and answers must pair up, got {len(samples)}, {len(before)} and {len(after)}")
    table: dict = defaultdict(lambda: {"questions": 0, "to_right": 0, "to_wrong": 0})
    for s, b, a in zip(samples, before, after):
        row = table[s.kind]
        right_before, right_after = (normalise_answer(x) == normalise_answer(s.answer) for x in (b, a))
        row["questions"] += 1
        row["to_right"] += right_after and not right_before
        row["to_wrong"] += right_before and not right_after
    for row in table.values():
        row["paired_se"] = round(100 * (row["to_right"] + row["to_wrong"]) ** 0.5 / row["questions"], 1)
    return dict(sorted(table.items()))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def hit(boxes: Sequence[Sequence[float]], target: Sequence[float]) -> bool:
    """Whether some predicted box contains the whole target."""
    return any(b[0] <= target[0] and b[1] <= target[1] and b[2] >= target[2] and b[3] >= target[3] for b in boxes)
