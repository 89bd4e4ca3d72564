"""The pipeline's headline figures against their targets, as a markdown table, from the
results.json that scripts/gpu_check.sh writes (each benchmark's JSON under its step name).
A figure whose benchmark did not run (or ran out of time) reads "not measured".

    python benchmarks/figures.py build/gpu_check_out/results.json
"""

from __future__ import annotations

import argparse
import json

ANSWERING_TARGET = 0.85  # throughput relative to generate without RoI
REFERENCE_WAY_TARGET = 5.0  # SD-RPN at the largest batch vs the reference's way, samples/s
LABEL_GIVEN_TARGET = 30.0  # label job vs the reference's way, samples/s
LABEL_SELF_TARGET = 6.0
EPOCH_MINUTES_TARGET = 10.0  # a 10K-sample RPN epoch
CPU_KERNEL_TARGET = 1.0  # vs batched PyTorch


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def verdict(value, target, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    if not _number(value) or not _number(target) or target <= 0:
        return "reported"
    if (value >= target) if higher_is_better else (value <= target):
        return "met"
    return f"missed by {abs(value - target) / target:.0%}"


def _get(tree, *keys):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def answering_rows(infer: dict | None) -> list[tuple]:
    rows = []
    results = (infer or {}).get("results") or []
    if not results:
        return [("answering throughput vs `generate`", None, ANSWERING_TARGET, True)]
    shortest = min(r["answer_tokens"] for r in results)
    for r in results:
        short = r["answer_tokens"] == shortest
        at = f"answering, batch {r['batch']}, {r['answer_tokens']}-token answers"
        for setting in ("bbox_1", "mask_2", "bbox_mixed"):  # the targets are for one RoI
            if setting in r:
                target = ANSWERING_TARGET if short and setting != "bbox_mixed" else None
                rows.append((f"{at}, {setting}, vs `generate`", r[setting]["throughput_vs_baseline"], target, True))
        if "bbox_1" in r:  # what the method costs apart from the decoder
            value = r["bbox_1"]["throughput_vs_baseline_same_decoder"]
            rows.append((f"{at}, bbox_1, vs the same prompts through the pipeline's decoder", value, None, True))
        ops = _get(r, "aten_ops_vs_baseline", "bbox_1")
        if ops is not None:  # the host's work per call, lower is better
            rows.append((f"{at}, bbox_1, ATen ops dispatched vs `generate`'s", ops, None, False))
        for key, what in (("bbox_1_decoders_agree", "the two decoders"), ("bbox_mixed_groups_agree", "pass-2 groups")):
            if key in r:  # the share of answers alike (float16 may part at a near tie)
                rows.append((f"{at}, answers alike through {what} (share)", r[key], None, True))
        ref = r.get("reference_way_bbox_1")
        if ref and short:
            name = f"SD-RPN at batch {r['batch']} vs the reference's way, {r['answer_tokens']}-token answers"
            rows.append((name, ref["sdrpn_speedup_samples_per_s"], REFERENCE_WAY_TARGET, True))
    if not any(r.get("reference_way_bbox_1") for r in results):  # the largest batch's row never came
        rows.append(("SD-RPN at the largest batch vs the reference's way", None, REFERENCE_WAY_TARGET, True))
    return rows


def label_rows(label: dict | None) -> list[tuple]:
    results = (label or {}).get("results") or []
    if not results:
        return [("label job vs the reference's way", None, LABEL_GIVEN_TARGET, True)]
    row = min(results, key=lambda r: r["answer_tokens"])
    tokens = row["answer_tokens"]
    rows = []
    for mode, target in (("given", LABEL_GIVEN_TARGET), ("self", LABEL_SELF_TARGET)):
        value = _get(row, mode, "speedup_best_vs_reference")
        rows.append((f"label job, {mode} answers, {tokens} tokens, vs the reference's way", value, target, True))
    ours = _get(row, "given", "by_batch_size", str(_get(row, "given", "best_batch_size")), "peak_GiB")
    ref = _get(row, "reference_batch1", "peak_GiB")
    rows.append(("label job, given answers, peak GiB (target: the reference's)", ours, ref, False))
    return rows


def train_rows(train: dict | None) -> list[tuple]:
    early = _get(train, "results", "plain")
    return [
        ("RPN training, early exit, samples/s", _get(early, "samples_per_s"), None, True),
        ("RPN training, minutes per 10K-sample epoch", _get(early, "epoch_10k_minutes"), EPOCH_MINUTES_TARGET, False),
    ]


def label_job_rows(job: dict | None) -> list[tuple]:
    """The label job end to end on JPEG files: with the most loader threads measured, its
    gain over loading on the main thread, and the share of its batches' span the main
    thread spent between batches, the device idle (reported; no target)."""
    results = (job or {}).get("results") or {}
    if not results:
        return [("label job end to end on JPEG files, samples/s", None, None, True)]
    by_workers = sorted(results, key=lambda k: int(k.rsplit("_", 1)[-1]))  # workers_N
    most, fewest = results[by_workers[-1]]["samples_per_s"], results[by_workers[0]]["samples_per_s"]
    name = f"label job end to end on JPEG files, {by_workers[-1]}"
    return [
        (f"{name}, samples/s", most, None, True),
        (f"{name} vs {by_workers[0]}", round(most / fewest, 3), None, True),
        (
            f"{name}, share of the batches' span between batches",
            results[by_workers[-1]].get("between_batches_share"),
            None,
            True,
        ),
    ]


def cpu_rows(labels: dict | None, sinks: dict | None) -> list[tuple]:
    threads = _get(labels, "machine", "cpu_threads")
    where = f"CPU ({threads} threads)" if threads else "CPU"
    return [
        (
            f"pseudo_labels, {where}, vs batched PyTorch",
            _get(labels, "speedup_vs_torch_batched"),
            CPU_KERNEL_TARGET,
            True,
        ),
        (
            f"massive_activation_sinks, {where}, {_get(sinks, 'dtype') or 'float16'}, vs PyTorch",
            _get(sinks, "speedup_vs_torch"),
            CPU_KERNEL_TARGET,
            True,
        ),
    ]


def graph_rows(infer: dict | None, label: dict | None) -> list[tuple]:
    """CUDA graph captures that failed: the times beside them were taken without graphs."""
    counts = [c for c in (_get(infer, "graphs") or {}).values()] + [_get(label, "graphs")]
    counts = [c for c in counts if isinstance(c, dict)]
    if not counts:
        return []
    failed = sum(c.get("failed_captures", 0) for c in counts)
    return [("CUDA graph captures that failed in the pipeline benchmarks (0 expected)", failed, None, False)]


def attention_rows(bench: dict | None) -> list[tuple]:
    """cuDNN's attention against the kernels sdrpn runs, where both ran (a GPU)."""
    cases = (bench or {}).get("cases") or {}
    rows = []
    for case, what in (("prefill_causal_b1", "prefill, batch 1"), ("decode_step_b8", "decode step, batch 8")):
        for key, when in (("sdrpn_first_vs_cudnn", "first call at a new shape"), ("sdrpn_warm_vs_cudnn", "warm")):
            if _number(_get(cases, case, key)):
                rows.append(
                    (f"attention, {what}, {when}: sdrpn's kernels vs cuDNN's (speed)", cases[case][key], None, True)
                )
    for side in ("cudnn", "sdrpn"):
        count = _get(cases, "train_backward_bf16", side, "nonfinite_grad_q")
        if _number(count):
            rows.append(
                (
                    f"attention backward, padded bf16 at 64 mod 128 keys, {side}: non-finite query gradients",
                    count,
                    None,
                    False,
                )
            )
    return rows


def figures(results: dict) -> list[tuple[str, float | None, float | None, str]]:
    """(figure, measured, target, verdict) rows. A benchmark's JSON that cannot be read
    (cut short mid-write, or of another shape) gives one row saying so; the rest stand."""
    groups = (
        ("bench_infer_7b", lambda: answering_rows(results.get("bench_infer_7b"))),
        ("bench_label_pipeline_7b", lambda: label_rows(results.get("bench_label_pipeline_7b"))),
        ("bench_train_rpn_7b", lambda: train_rows(results.get("bench_train_rpn_7b"))),
        ("bench_label_job_7b", lambda: label_job_rows(results.get("bench_label_job_7b"))),
        ("bench_labels_cpu", lambda: cpu_rows(results.get("bench_labels_cpu"), results.get("bench_sinks_cpu"))),
        ("bench_attention_backends", lambda: attention_rows(results.get("bench_attention_backends"))),
        ("graphs", lambda: graph_rows(results.get("bench_infer_7b"), results.get("bench_label_pipeline_7b"))),
    )
    out = []
    for step, rows in groups:
        try:
            out += [(name, value, target, verdict(value, target, higher)) for name, value, target, higher in rows()]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            out.append((f"{step}: unreadable ({type(err).__name__}: {err})", None, None, "not measured"))
    return out


def markdown(results: dict) -> str:
    machine = next((r["machine"] for r in results.values() if isinstance(r, dict) and "machine" in r), {})
    head = f"Machine: {machine.get('gpu') or machine.get('device', 'unknown')}, torch {machine.get('torch', '?')}\n\n"
    lines = ["| figure | measured | target | verdict |", "|---|---:|---:|---|"]
    for name, value, target, word in figures(results):
        shown = f"{value:g}" if _number(value) else "-" if value is None else str(value)
        aim = f"{target:g}" if _number(target) else "-"
        lines.append(f"| {name} | {shown} | {aim} | {word} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", help="results.json of scripts/gpu_check.sh")
    args = parser.parse_args()
    with open(args.results) as f:
        print(markdown(json.load(f)), end="")


if __name__ == "__main__":
    main()
