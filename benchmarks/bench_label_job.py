"""The label job end to end (JPEG files decoded and preprocessed, the teacher-forced pass,
the labels, the shards written) with its images loaded by threads ahead of the model
against on the main thread, measured side by side in one run (settings in turns, medians).
Each setting also reports the share of the batches' span (the first batch's start to the
last one's end) that the main thread spent between batches: tokenising, building rows,
writing shards, waiting for images. A batch ends reading its results back, so on a GPU
that share is time the device sat idle, what overlapping the host's work with the next
batch could win at most.

    python benchmarks/bench_label_job.py --size 7b --device cuda --images 128 --batch-size 16
    python benchmarks/bench_label_job.py --size tiny            # a quick CPU run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_infer import TEMPLATE, IdTokenizer
from bench_label_pipeline import IMAGE_TOKEN, SIZES, build_model
from sdrpn.labels.job import LabelJob, LabelJobConfig
from sdrpn.labels.options import LabelOptions
from sdrpn.prefetch import DEFAULT_WORKERS
from timing import emit, machine, save, sync


class LabelTokenizer(IdTokenizer):
    eos_token_id = 2  # appended to every given answer: a real id


def write_images(folder: str, count: int, width: int, height: int, seed: int = 0) -> list[dict]:
    """Photo-like JPEGs (smooth shapes plus grain, quality 90) and their given-answer entries."""
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
        name = f"{i:05d}.jpg"
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(os.path.join(folder, name), quality=90)
        ask = "<image>\nwhat is written on the small red tag in the corner of the picture ?"
        entries.append(
            {
                "id": str(i),
                "image": name,
                "conversations": [{"from": "human", "value": ask}, {"from": "gpt", "value": "the tag says sale"}],
            }
        )
    return entries


class BatchClock:
    """Wall time inside a job's batch calls and the span from the first one's start to the
    last one's end: the rest of the span is the main thread's work between batches."""

    def __init__(self, job: LabelJob):
        self.inside = 0.0
        self.first = self.last = None
        label_batch = job._label_batch

        def timed(*args):
            start = time.perf_counter()
            label_batch(*args)
            self.last = time.perf_counter()
            self.first = start if self.first is None else self.first
            self.inside += self.last - start

        job._label_batch = timed

    def between_share(self) -> float:
        span = (self.last - self.first) if self.first is not None else 0.0
        return (span - self.inside) / span if span > 0 else 0.0


def summarize(times: dict[int, list[float]], between: dict[int, list[float]], images: int, base_workers: int) -> dict:
    """Median seconds, samples/s and share of the batches' span between batches, and the
    gain over ``base_workers``, of each setting timed."""
    timed = {w: statistics.median(t) for w, t in times.items() if t}
    base = timed.get(base_workers)
    return {
        f"workers_{w}": {
            "seconds": round(t, 4),
            "samples_per_s": round(images / t, 2),
            f"speedup_vs_workers_{base_workers}": round(base / t, 3) if base else None,
            "between_batches_share": round(statistics.median(between[w]), 4),
        }
        for w, t in timed.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--image-size", type=int, nargs=2, default=[1024, 768], metavar=("W", "H"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, DEFAULT_WORKERS])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per setting (median)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.workers = list(dict.fromkeys(args.workers))  # each setting once
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    model, preset = build_model(args.size, args.device, dtype)
    model.config.image_token_id = IMAGE_TOKEN
    root = tempfile.mkdtemp(prefix="sdrpn-bench-label-job-")
    report = {
        "benchmark": "label_job",
        "machine": machine(args.device),
        "size": args.size,
        "dtype": str(dtype).replace("torch.", ""),
        "images": args.images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
    }
    try:
        images = os.path.join(root, "images")
        os.makedirs(images)
        data = os.path.join(root, "data.json")
        with open(data, "w") as f:
            json.dump(write_images(images, args.images, *args.image_size), f)
        options = LabelOptions(answers="given", prompt_template=TEMPLATE)

        def run(workers: int, tag: str) -> tuple[float, float]:
            out = os.path.join(root, f"labels-{workers}-{tag}")
            cfg = LabelJobConfig(data, images, out, options, batch_size=args.batch_size, workers=workers)
            job = LabelJob(cfg, model, LabelTokenizer(), preset)
            clock = BatchClock(job)
            sync(args.device)
            start = time.perf_counter()
            summary = job.run()
            sync(args.device)
            seconds = time.perf_counter() - start
            if summary["labelled"] != args.images:
                raise RuntimeError(f"labelled {summary['labelled']} of {args.images} images: {summary}")
            shutil.rmtree(out)
            return seconds, clock.between_share()

        run(args.workers[0], "warmup")
        times = {w: [] for w in args.workers}
        between = {w: [] for w in args.workers}
        for r in range(args.repeats):
            for workers in args.workers:
                seconds, share = run(workers, str(r))
                times[workers].append(seconds)
                between[workers].append(share)
                report["results"] = summarize(times, between, args.images, args.workers[0])
                save(report, args.json)  # a run cut short keeps what it measured
    finally:
        shutil.rmtree(root, ignore_errors=True)
    emit(report, args.json)


if __name__ == "__main__":
    main()
