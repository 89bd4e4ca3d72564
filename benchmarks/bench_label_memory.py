"""Peak memory of the label job's teacher-forced pass (given answers) at LLaVA-1.5-7B's
widths: sdrpn's pass (each probed layer's q and k reduced to the maps' sums as the layer
runs, a batch beyond PASS_TOKENS tokens in slices of whole samples) against the same pass
holding every probed layer's q and k to its end, the whole batch in one forward, side by
side in one run.

On CUDA the peak is the allocator's; on the CPU the process's peak resident memory (Linux),
with glibc's mmap threshold fixed low so that a freed tensor leaves it at once. A sample's
share is the slope between the smallest and the largest batch (with slices, the largest
batches stop growing). ``--text-layers`` shortens the text model to fit a CPU's memory: the
widths stay 7B's, the sink heads stay at layer 2 and the grounding heads move to the last
layer (the peak a sample is a layer's working set and the probed layers' q and k, whatever
the depth).

    python benchmarks/bench_label_memory.py --text-layers 6 --batch-sizes 1 8 16   # CPU: fp32, 10 GB
    python benchmarks/bench_label_memory.py --device cuda --text-layers 32 --batch-sizes 1 32
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_label_pipeline import build_model, make_prompts
from sdrpn.llava import HeadSelection, LlavaPreset
from sdrpn.llava.inputs import left_pad, position_ids_from_mask
from sdrpn.llava.maps import PASS_TOKENS, given_answer_maps
from sdrpn.llava.probe import probe_once
from timing import emit, machine, save, sync

NUM_CELLS = 576


class PeakMemory:
    """Peak memory above the start of a measured call, in MiB."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if not self.cuda:
            if not os.path.exists("/proc/self/clear_refs"):
                raise SystemExit("the CPU's peak memory is read from Linux's /proc/self; use --device cuda")
            # M_MMAP_THRESHOLD (-3): every block above 64 KiB is its own mapping, returned
            # when freed, rather than glibc raising the threshold after the first large free.
            try:
                self.exact = ctypes.CDLL("libc.so.6").mallopt(-3, 65536) == 1
            except OSError:  # not glibc: freed memory may stay resident, peaks read high
                self.exact = False

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak resident set restarts from the current one
            if self._status("VmHWM") > self._status("VmRSS") + 2**20:
                raise SystemExit("this kernel did not reset the peak resident set (/proc/self/clear_refs)")

    def peak_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (self._status("VmHWM") - self.base) / 2**20

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")


def held_pass(model, preset, prompts, answers, pixels) -> None:
    """The pass as it ran before: every probed layer's q and k held until the pass ends, the
    whole batch in one forward."""
    ids, mask = left_pad([p + a for p, a in zip(prompts, answers)], 0, pixels.device)
    position_ids = position_ids_from_mask(mask)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "position_ids": position_ids}
    probe_once(model, preset.probed_layers, **inputs)


def sdrpn_pass(model, preset, prompts, answers, pixels) -> None:
    given_answer_maps(model, prompts, answers, pixels, preset, NUM_CELLS, pad_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None)
    parser.add_argument("--text-layers", type=int, default=6)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--question-tokens", type=int, default=15)
    parser.add_argument("--size", choices=["7b", "tiny"], default="7b", help="tiny: a smoke run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if len(set(args.batch_sizes)) < 2:
        parser.error(f"--batch-sizes needs two sizes or more for a slope, got {args.batch_sizes}")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    ]
    memory = PeakMemory(args.device)
    model, preset = build_model(args.size, args.device, dtype, text_layers=args.text_layers)
    if max(preset.probed_layers) >= args.text_layers:
        last = args.text_layers - 1
        grounding = HeadSelection(tuple((last, head) for _, head in preset.grounding.pairs))
        name = f"{preset.name}, grounding at layer {last}"
        preset = LlavaPreset(name, grounding, preset.sink, branch_layer=1, depth=1)
    gen = torch.Generator().manual_seed(0)
    n = max(args.batch_sizes)
    prompts = make_prompts(n, args.question_tokens, gen)
    answers = [torch.randint(100, 30000, (args.answer_tokens,), generator=gen).tolist() for _ in prompts]
    pixels = torch.randn(n, 3, 336, 336, generator=gen).to(args.device, dtype)
    report = {
        "benchmark": "label_memory",
        "machine": machine(args.device),
        "size": args.size,
        "text_layers": args.text_layers,
        "dtype": str(dtype).replace("torch.", ""),
        "sequence_tokens": len(prompts[0]) + args.answer_tokens,
        "probed_layers": list(preset.probed_layers),
        "pass_tokens": PASS_TOKENS,
        "cpu_peaks_exact": None if memory.cuda else memory.exact,
        "peak_MiB": {},
        "seconds": {},
    }
    ways = {"held_qk_one_forward": held_pass, "sdrpn": sdrpn_pass}
    for run in ways.values():  # warm-up: first calls allocate libraries' workspaces
        run(model, preset, prompts[:1], answers[:1], pixels[:1])
    for bs in sorted(set(args.batch_sizes)):
        for name, run in ways.items():  # in turns, the same batch each way
            memory.start()
            start = time.perf_counter()
            run(model, preset, prompts[:bs], answers[:bs], pixels[:bs])
            sync(args.device)
            report["seconds"].setdefault(name, {})[bs] = round(time.perf_counter() - start, 3)
            report["peak_MiB"].setdefault(name, {})[bs] = round(memory.peak_mib(), 1)
            save(report, args.json)
    small, large = min(args.batch_sizes), max(args.batch_sizes)
    per_sample = {
        name: round((peaks[large] - peaks[small]) / (large - small), 1) for name, peaks in report["peak_MiB"].items()
    }
    report["MiB_per_sample"] = per_sample
    held = per_sample["held_qk_one_forward"]  # a tiny model's may round to nothing
    report["sdrpn_vs_held_per_sample"] = round(per_sample["sdrpn"] / held, 3) if held > 0 else None
    emit(report, args.json)


if __name__ == "__main__":
    main()
