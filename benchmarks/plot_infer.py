"""Throughput of SD-RPN relative to plain generate against the number of RoI tokens it
adds, from bench_infer.py's JSON: one line per (batch, answer length).

    python benchmarks/plot_infer.py infer.json infer.png
"""

from __future__ import annotations

import argparse
import json


def series(result: dict) -> list[tuple[str, list[int], list[float]]]:
    """(label, RoI tokens fed, throughput ratio) per row, by tokens; 0 tokens is the
    baseline itself (1.0). Each setting's tokens are those its crops fed per sample."""
    out = []
    for row in result["results"]:
        points = [(0, 1.0)]
        for name, value in row.items():
            # one point per crop setting as the pipeline runs it (not its comparison runs)
            variant = name.endswith(("_hf_decoder", "_one_pass2_forward"))
            if isinstance(value, dict) and "throughput_vs_baseline" in value and not variant:
                tokens = value["crop_tokens"]
                points.append((round(sum(tokens) / len(tokens)), value["throughput_vs_baseline"]))
        points.sort()
        out.append(
            (
                f"batch {row['batch']}, {row['answer_tokens']} answer tokens",
                [x for x, _ in points],
                [y for _, y in points],
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.json) as f:
        result = json.load(f)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, xs, ys in series(result):
        ax.plot(xs, ys, marker="o", label=label)
    machine = result.get("machine", {})
    ax.set_title(f"SD-RPN throughput vs generate ({result.get('size')}, {machine.get('gpu') or machine.get('device')})")
    ax.set_xlabel("RoI tokens added")
    ax.set_ylabel("throughput relative to generate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
