#!/usr/bin/env python3
"""Fuzzes the ops under ``torch.ops.sdrpn`` with hostile and unlucky inputs.

For every argument of every op: wrong dtypes, wrong ranks, empty and zero sizes, huge and
negative values, NaN/Inf scalars and tensor entries, strided, expanded and offset tensors,
tensors on another device; then a seeded random sweep of valid-ish arguments.

What an input should do comes from each op's documented contract (``contract_<op>``): a
valid input must return a right result, an invalid one must raise naming the argument, and
an input at the edge (a size an implementation may refuse) may do either.

Every case runs in a child process: each worker imports torch once and forks a runner that
takes the cases one by one, so a segfault or an abort costs one case and a fork, not the
run; a runner past ``--timeout`` is killed. CPU runners cap their address space
(``--memory-gb`` above what they map at start), so a giant allocation fails at once instead
of swapping the machine. Each case ends as one of:

  OK            returned, and the result keeps the op's invariants and matches the plain
                PyTorch reference of tests/python/reference.py where that applies
  CLEAN_ERROR   raised, naming the offending argument
  BAD_ERROR     raised without naming it (an allocation failure, a message about something
                else), or refused an input the docs accept
  CRASH         the worker died (signal, abort) or the CUDA context broke
  HANG          the case outlived its timeout
  SILENT_WRONG  returned for an input the docs refuse, or a result that breaks an invariant
                or disagrees with the reference
  FUZZER_ERROR  the fuzzer itself failed to build or to check the case

Usage:
  python scripts/fuzz_ops.py [--device cpu|cuda|all] [--random N] [--seed S] [--timeout T]
                             [--json PATH] [--quick] [--jobs J] [--case TEXT] [--memory-gb G]

Prints a count table per op and outcome, then every case that is neither OK nor
CLEAN_ERROR with its arguments and a command that reruns it. Exits 1 on any CRASH, HANG,
SILENT_WRONG or FUZZER_ERROR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)

OUTCOMES = ["OK", "CLEAN_ERROR", "BAD_ERROR", "CRASH", "HANG", "SILENT_WRONG", "FUZZER_ERROR"]
FAILING = {"CRASH", "HANG", "SILENT_WRONG", "FUZZER_ERROR"}

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
# Expanded tensors reach this many elements without memory; past it, refusing is fair.
GIANT = 2**31
# Above this many input elements the slow references are not run, only the invariants.
REFERENCE_LIMIT = 1 << 20

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
}
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------
# Contracts: what each op's docs say about an input.


class Refused(Exception):
    """An input the docs refuse; ends the walk when later rules could not be read."""


@dataclass(frozen=True)
class Verdict:
    kind: str  # "valid", "edge" (may be refused) or "invalid"
    names: tuple[str, ...] = ()  # the arguments a refusal must name
    why: str = ""
    loose: bool = False  # the reference cannot judge this input: check invariants only


class Rules:
    """Collects an op's documented rules over one set of arguments."""

    def __init__(self, args: dict[str, Any]):
        self.args = args
        self.refusals: list[tuple[tuple[str, ...], str]] = []
        self.edges: list[tuple[tuple[str, ...], str]] = []
        self.loose_reasons: list[str] = []

    def need(self, ok: bool, names: str | tuple[str, ...], why: str) -> bool:
        if not ok:
            self.refusals.append(((names,) if isinstance(names, str) else names, why))
        return ok

    def require(self, ok: bool, names: str | tuple[str, ...], why: str) -> None:
        """A rule the rest of the contract reads through (a rank, a type): stop when broken."""
        if not self.need(ok, names, why):
            raise Refused()

    def edge(self, hit: bool, names: str | tuple[str, ...], why: str) -> None:
        if hit:
            self.edges.append(((names,) if isinstance(names, str) else names, why))

    def loose(self, hit: bool, why: str) -> None:
        if hit:
            self.loose_reasons.append(why)

    def tensor(self, name: str, rank: int, optional: bool = False) -> torch.Tensor | None:
        t = self.args[name]
        if optional and t is None:
            return None
        self.require(isinstance(t, torch.Tensor), name, f"{name} must be a tensor")
        self.require(t.dim() == rank, name, f"{name} must have {rank} dims, got {list(t.shape)}")
        self.edge(t.numel() >= GIANT, name, f"{name} has {t.numel()} elements")
        return t

    def floating(self, name: str, rank: int) -> torch.Tensor:
        t = self.tensor(name, rank)
        self.require(t.dtype in FLOATS, name, f"{name} must be floating, got {t.dtype}")
        return t

    def like(self, name: str, rank: int, ref: torch.Tensor, optional: bool = False) -> torch.Tensor | None:
        """A floating tensor with the dtype and device of ``ref``."""
        t = self.tensor(name, rank, optional)
        if t is not None:
            self.need(t.dtype == ref.dtype, name, f"{name} must have dtype {ref.dtype}, got {t.dtype}")
            self.need(t.device == ref.device, name, f"{name} must be on {ref.device}, got {t.device}")
        return t

    def typed(
        self, name: str, rank: int, dtype: torch.dtype, device: torch.device, optional: bool = False
    ) -> torch.Tensor | None:
        t = self.tensor(name, rank, optional)
        if t is not None:
            self.need(t.dtype == dtype, name, f"{name} must be {dtype}, got {t.dtype}")
            self.need(t.device == device, name, f"{name} must be on {device}, got {t.device}")
        return t

    def integer(self, name: str) -> int:
        v = self.args[name]
        self.require(isinstance(v, int), name, f"{name} must be an int, got {type(v).__name__}")
        self.require(INT64_MIN <= v <= INT64_MAX, name, f"{name} must fit in int64, got {v}")
        return int(v)

    def real(self, name: str, optional: bool = False) -> float | None:
        v = self.args[name]
        if optional and v is None:
            return None
        self.require(isinstance(v, (int, float)), name, f"{name} must be a number, got {type(v).__name__}")
        return float(v)

    def finite(self, name: str, low: float | None = None, strict: bool = False, optional: bool = False):
        """A finite number, optionally >= low (> low when strict)."""
        v = self.real(name, optional)
        if v is None:
            return None
        ok = math.isfinite(v) and (low is None or (v > low if strict else v >= low))
        bound = "" if low is None else f" {'>' if strict else '>='} {low}"
        self.need(ok, name, f"{name} must be finite{bound}, got {v}")
        return v

    def verdict(self) -> Verdict:
        loose = bool(self.loose_reasons)
        if self.refusals:
            names = tuple(dict.fromkeys(n for names, _ in self.refusals for n in names))
            return Verdict("invalid", names, "; ".join(why for _, why in self.refusals), loose)
        if self.edges:
            names = tuple(dict.fromkeys(n for names, _ in self.edges for n in names))
            return Verdict("edge", names, "; ".join(why for _, why in self.edges), loose)
        return Verdict("valid", why="; ".join(self.loose_reasons), loose=loose)


def judge(contract: Callable[[Rules], None], args: dict[str, Any]) -> Verdict:
    rules = Rules(args)
    try:
        contract(rules)
    except Refused:
        pass
    return rules.verdict()


def non_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds NaN or Inf; giant (expanded) tensors are not scanned."""
    return 0 < t.numel() <= REFERENCE_LIMIT and not bool(torch.isfinite(t).all())


def contract_pseudo_labels(r: Rules) -> None:
    g = r.floating("grounding", 2)
    s = r.like("sink", 2, g)
    r.need(s.shape == g.shape, "sink", f"sink must have the shape of grounding {list(g.shape)}")
    grid_h, grid_w = r.integer("grid_h"), r.integer("grid_w")
    r.need(grid_h >= 1, "grid_h", "grid_h must be >= 1")
    r.need(grid_w >= 1, "grid_w", "grid_w must be >= 1")
    cells = g.shape[1]
    r.need(
        grid_h * grid_w == cells,
        ("grounding", "grid_h", "grid_w"),
        f"grid_h * grid_w = {grid_h * grid_w} differs from N = {cells}",
    )
    r.finite("sink_threshold")
    r.finite("fg_ratio", 0.0)
    r.finite("bg_ratio", 0.0)
    r.finite("max_box_fraction", 0.0, strict=True)
    ignore = r.integer("ignore_index")
    r.need(ignore not in (0, 1), "ignore_index", f"ignore_index {ignore} is also a label")


# The kernels take the probed dims as launch arguments (kMaxSinkDims in
# csrc/ops/massive_activation_sinks_impl.h).
MAX_SINK_DIMS = 64


def contract_massive_activation_sinks(r: Rules) -> None:
    h = r.floating("hidden", 3)
    dims = r.args["dims"]
    r.require(isinstance(dims, (list, tuple)), "dims", "dims must be a list of ints")
    r.require(all(isinstance(d, int) and INT64_MIN <= d <= INT64_MAX for d in dims), "dims", "dims must be int64s")
    r.need(len(dims) > 0, "dims", "dims must name at least one dimension")
    r.need(len(dims) <= MAX_SINK_DIMS, "dims", f"dims may name at most {MAX_SINK_DIMS} dimensions")
    r.need(all(0 <= d < h.shape[2] for d in dims), "dims", f"dims must lie in [0, {h.shape[2]})")
    r.finite("tau", 0.0)
    r.finite("eps", 0.0)


def contract_attention_rows(r: Rules) -> None:
    query = r.floating("query", 4)
    key = r.like("key", 4, query)
    batch, heads, rows, head_dim = query.shape
    r.need(key.shape[0] == batch, "key", "key must have the batch size of query")
    r.need(key.shape[3] == head_dim, "key", "key must have the head dim of query")
    r.need(key.shape[1] >= 1 and heads % key.shape[1] == 0, "key", "key heads must divide query heads")
    seq_len = key.shape[2]
    positions = r.typed("query_positions", 2, torch.int64, query.device)
    r.need(tuple(positions.shape) == (batch, rows), "query_positions", "query_positions must be (B, Q)")
    start = r.typed("key_start", 1, torch.int64, query.device)
    start_ok = r.need(tuple(start.shape) == (batch,), "key_start", "key_start must be (B,)")
    length = r.integer("key_length")
    r.need(0 <= length <= seq_len, "key_length", f"key_length must lie in [0, {seq_len}]")
    mask = r.typed("key_padding_mask", 2, torch.bool, query.device, optional=True)
    if mask is not None:
        r.need(tuple(mask.shape) == (batch, seq_len), "key_padding_mask", "key_padding_mask must be (B, L)")
    scale = r.finite("scale", optional=True)
    if scale is not None and query.dtype != torch.float64:
        r.need(abs(scale) <= torch.finfo(torch.float32).max, "scale", "scale must lie within float32's range")
    if start_ok and start.dtype == torch.int64 and batch > 0:
        lo, hi = int(start.min()), int(start.max())
        r.need(
            lo >= 0 and hi + length <= seq_len,
            ("key_start", "key_length"),
            f"key_start in [{lo}, {hi}] + key_length {length} leaves [0, {seq_len}]",
        )
    # float32 scores cannot follow a float64 reference that far.
    r.loose(scale is not None and abs(scale) > 1e4, f"scale {scale} overflows float32 scores")


def contract_rpn_scores(r: Rules) -> None:
    query = r.floating("query_states", 2)
    batch, hidden = query.shape
    visual = r.like("visual_states", 3, query)
    r.need(visual.shape[0] == batch and visual.shape[2] == hidden, "visual_states", "visual_states must be (B, N, D)")
    heads = r.integer("num_heads")
    r.require(heads >= 1, "num_heads", "num_heads must be >= 1")
    q_weight = r.like("q_weight", 2, query)
    q_rows = q_weight.shape[0]
    r.require(
        q_weight.shape[1] == hidden and q_rows >= heads and q_rows % heads == 0,
        "q_weight",
        "q_weight must be (num_heads * d, D) with d >= 1",
    )
    head_dim = q_rows // heads
    k_weight = r.like("k_weight", 2, query)
    k_rows = k_weight.shape[0]
    kv_heads = k_rows // head_dim
    r.need(
        k_weight.shape[1] == hidden and kv_heads >= 1 and k_rows % head_dim == 0 and heads % kv_heads == 0,
        "k_weight",
        "k_weight must be (kv_heads * d, D) with kv_heads dividing num_heads",
    )
    for name, rows in (("q_bias", q_rows), ("k_bias", k_rows)):
        bias = r.like(name, 1, query, optional=True)
        if bias is not None:
            r.need(bias.shape[0] == rows, name, f"{name} must be ({rows},)")
    mask = r.typed("visual_mask", 2, torch.bool, query.device, optional=True)
    if mask is not None:
        r.need(tuple(mask.shape) == tuple(visual.shape[:2]), "visual_mask", "visual_mask must be (B, N)")


def contract_roi_boxes(r: Rules) -> None:
    prob = r.floating("prob", 3)
    _, height, width = prob.shape
    r.need(height >= 1 and width >= 1, "prob", "prob's grid must be at least 1x1")
    r.edge(height * width >= GIANT, "prob", f"a grid of {height * width} cells")
    r.finite("threshold")
    r.finite("sigma", 0.0, strict=True)
    r.need(r.integer("min_area") >= 0, "min_area", "min_area must be >= 0")
    r.need(r.integer("max_area") >= 1, "max_area", "max_area must be >= 1")
    max_boxes = r.integer("max_boxes")
    r.need(max_boxes >= 1, "max_boxes", "max_boxes must be >= 1")
    # No grid the ops serve has 2^24 cells, so a cap that refuses more boxes is fair.
    r.edge(max_boxes > 2**24, "max_boxes", f"max_boxes {max_boxes} is larger than any grid")
    for name in ("drop_singletons", "reference_clamp"):
        r.need(isinstance(r.args[name], bool), name, f"{name} must be a bool")
    # The docs say nothing of NaN or Inf probabilities: only the invariants hold there.
    r.loose(non_finite(prob), "prob holds NaN or Inf")


def contract_roi_crops(r: Rules) -> None:
    contract_roi_boxes(r)
    mode = r.args["mode"]
    r.need(mode in ("mask", "bbox"), "mode", f"mode must be 'mask' or 'bbox', got {mode!r:.40}")


# ---------------------------------------------------------------------------------------
# Result checks: None when the result is right, else what is wrong.


def reference_module():
    """tests/python/reference.py: the slow, obvious references the op tests use."""
    path = os.path.join(ROOT, "tests", "python")
    if path not in sys.path:
        sys.path.insert(0, path)
    import reference

    return reference


def small(args: dict[str, Any]) -> bool:
    return sum(v.numel() for v in args.values() if isinstance(v, torch.Tensor)) <= REFERENCE_LIMIT


def expect_tensor(t: Any, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> str | None:
    if not isinstance(t, torch.Tensor):
        return f"{name} is a {type(t).__name__}, not a tensor"
    if tuple(t.shape) != tuple(shape):
        return f"{name} has shape {list(t.shape)}, expected {list(shape)}"
    if t.dtype != dtype:
        return f"{name} is {t.dtype}, expected {dtype}"
    if t.device != device:
        return f"{name} is on {t.device}, expected {device}"
    return None


def first_difference(got: torch.Tensor, want: torch.Tensor, differs: torch.Tensor, what: str) -> str | None:
    if not bool(differs.any()):
        return None
    where = tuple(int(i) for i in differs.nonzero()[0])
    count = int(differs.sum())
    return (
        f"{what}: {count} element(s) differ, first at {list(where)}: got {got[where].item()}, want {want[where].item()}"
    )


def close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, what: str) -> str | None:
    """NaN must meet NaN and infinities must match exactly; finite values within tolerance."""
    got, want = got.double(), want.double()
    both_nan = got.isnan() & want.isnan()
    differs = ~both_nan & ~((got - want).abs() <= atol + rtol * want.abs())
    differs &= ~(got == want)  # equal infinities
    return first_difference(got, want, differs, what)


def check_pseudo_labels(args: dict[str, Any], out: Any, verdict: Verdict) -> str | None:
    g = args["grounding"]
    problem = expect_tensor(out, "labels", tuple(g.shape), torch.int64, g.device)
    if problem or not small(args):
        return problem
    labels = out.cpu()
    ignore = args["ignore_index"]
    stray = (labels != ignore) & (labels != 0) & (labels != 1)
    problem = first_difference(labels, labels, stray, f"labels outside {{{ignore}, 0, 1}}")
    if problem or verdict.loose:
        return problem
    scalars = {k: args[k] for k in ("sink_threshold", "fg_ratio", "bg_ratio", "max_box_fraction", "ignore_index")}
    want = reference_module().pseudo_labels(g, args["sink"], args["grid_h"], args["grid_w"], **scalars)
    return first_difference(labels, want, labels != want, "labels differ from the reference")


def sink_scores(hidden: torch.Tensor, dims: list[int], eps: float) -> torch.Tensor:
    normed = hidden / torch.sqrt((hidden * hidden).mean(-1, keepdim=True) + eps)
    return normed[..., list(dims)].abs().amax(-1)


def check_massive_activation_sinks(args: dict[str, Any], out: Any, verdict: Verdict) -> str | None:
    h = args["hidden"]
    problem = expect_tensor(out, "sinks", tuple(h.shape[:2]), torch.bool, h.device)
    if problem or not small(args) or verdict.loose:
        return problem
    dims, tau, eps = list(args["dims"]), args["tau"], args["eps"]
    wide = sink_scores(h.detach().cpu().double(), dims, eps)
    narrow = sink_scores(h.detach().cpu().to(torch.float64 if h.dtype == torch.float64 else torch.float32), dims, eps)
    want = wide > tau
    # A token is judged only where float64 and the op's math type agree and it is no near tie.
    near = (wide - tau).abs() <= 1e-3 * max(1.0, tau)
    settled = (want == (narrow.double() > tau)) & ~near
    got = out.cpu()
    return first_difference(got, want, settled & (got != want), "sinks differ from max|h_d|/rms > tau")


def check_attention_rows(args: dict[str, Any], out: Any, verdict: Verdict) -> str | None:
    q = args["query"]
    problem = expect_tensor(out, "rows", (*q.shape[:3], args["key_length"]), torch.float32, q.device)
    if problem or not small(args):
        return problem
    got = out.cpu()
    problem = first_difference(got, got, (got < 0) | (got > 1), "weights outside [0, 1]")
    if problem or verdict.loose:
        return problem
    names = ("query", "key", "query_positions", "key_start", "key_length", "key_padding_mask", "scale")
    want = run_reference(lambda: reference_module().attention_rows(*(args[n] for n in names)))
    if want is None:
        return None
    return close(got, want, 1e-4, 1e-6, "rows differ from the softmax over the visible keys")


# Unit roundoff of each dtype: the rpn_scores tolerance scales with it.
ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def check_rpn_scores(args: dict[str, Any], out: Any, verdict: Verdict) -> str | None:
    query, visual = args["query_states"], args["visual_states"]
    problem = expect_tensor(out, "scores", tuple(visual.shape[:2]), query.dtype, query.device)
    if problem or not small(args) or verdict.loose:
        return problem
    names = ("query_states", "visual_states", "q_weight", "k_weight")
    wide = {n: None if args[n] is None else args[n].detach().cpu().double() for n in names + ("q_bias", "k_bias")}
    naive = reference_module().rpn_scores

    def head(fn):
        tensors = {n: None if t is None else fn(t) for n, t in wide.items()}
        return naive(*(tensors[n] for n in names), args["num_heads"], tensors["q_bias"], tensors["k_bias"])

    want, bound = head(lambda t: t), head(torch.abs)  # bound: the sum of |terms|, what rounding scales with
    got = out.detach().cpu().double()
    mask = args["visual_mask"]
    real = torch.ones_like(got, dtype=torch.bool) if mask is None else mask.cpu()
    problem = first_difference(got, want, ~real & (got != -INF), "masked cells must score -inf")
    # Past half the dtype's range the op may overflow where the float64 reference does not.
    judged = real & ~(want.abs() > torch.finfo(query.dtype).max / 2)
    problem = problem or first_difference(
        got, want, judged & (got.isfinite() != want.isfinite()), "NaN/Inf where the naive head has none, or back"
    )
    tolerance = 64 * ROUNDOFF[query.dtype] * bound + 1e-300
    off = judged & want.isfinite() & got.isfinite() & ((got - want).abs() > tolerance)
    return problem or first_difference(got, want, off, "scores differ from the naive head")


def box_invariants(args: dict[str, Any], boxes: Any, index: Any, cap: int, ascending: bool) -> str | None:
    """Boxes inside the grid, sample indices valid and sorted, at most ``cap`` boxes a sample."""
    prob = args["prob"]
    batch, height, width = prob.shape
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2:
        return f"boxes must be (M, 4), got {getattr(boxes, 'shape', type(boxes).__name__)}"
    count = boxes.shape[0]
    problem = expect_tensor(boxes, "boxes", (count, 4), torch.int64, prob.device)
    problem = problem or expect_tensor(index, "batch_index", (count,), torch.int64, prob.device)
    if problem:
        return problem
    boxes, index = boxes.cpu(), index.cpu()
    x0, y0, x1, y1 = boxes.unbind(1)
    outside = (x0 < 0) | (x1 < x0) | (x1 > width) | (y0 < 0) | (y1 < y0) | (y1 > height)
    if bool(outside.any()):
        return f"box {boxes[outside][0].tolist()} leaves the {height}x{width} grid"
    if count and (int(index.min()) < 0 or int(index.max()) >= batch):
        return f"batch_index {index.tolist()} outside [0, {batch})"
    steps = index[1:] - index[:-1]
    if bool((steps <= 0).any() if ascending else (steps < 0).any()):
        return f"batch_index not {'strictly ' if ascending else ''}ascending: {index.tolist()}"
    if count and int(torch.bincount(index).max()) > cap:
        return f"a sample has more than {cap} box(es): batch_index {index.tolist()}"
    return None


def triple(out: Any, names: str) -> str | None:
    if isinstance(out, (tuple, list)) and len(out) == 3:
        return None
    return f"expected ({names}), got {type(out).__name__}"


def box_rules(args: dict[str, Any]) -> dict[str, Any]:
    names = ("threshold", "sigma", "min_area", "max_area", "max_boxes", "drop_singletons", "reference_clamp")
    return {n: args[n] for n in names}


def run_reference(fn: Callable[[], Any]) -> Any:
    """The reference's own float arithmetic fails on a few extreme settings (sigma 1e-300, head dim 0)."""
    try:
        return fn()
    except (ZeroDivisionError, OverflowError):
        return None


def same_boxes(got: tuple, want: tuple) -> str | None:
    for name, a, b in zip(("boxes", "batch_index"), got, want):
        a = a.cpu()
        if a.shape != b.shape or not torch.equal(a, b):
            return f"{name} {a.tolist()} differ from the reference's {b.tolist()}"
    return None


def check_roi_boxes(args: dict[str, Any], out: Any, verdict: Verdict) -> str | None:
    prob = args["prob"]
    problem = triple(out, "boxes, batch_index, blurred")
    problem = problem or box_invariants(args, out[0], out[1], args["max_boxes"], ascending=False)
    problem = problem or expect_tensor(out[2], "blurred", tuple(prob.shape), torch.float32, prob.device)
    if problem or verdict.loose or not small(args):
        return problem
    want = run_reference(lambda: reference_module().roi_boxes(prob, **box_rules(args)))
    if want is None:
        return None
    return same_boxes(out, want) or close(out[2].cpu(), want[2], 1e-6, 1e-6, "blurred differs from the reference")


def check_roi_crops(args: dict[str, Any], out: Any, verdict: Verdict) -> str | None:
    prob = args["prob"]
    mask_mode = args["mode"] == "mask"
    problem = triple(out, "boxes, batch_index, keep")
    cap = 1 if mask_mode else args["max_boxes"]
    problem = problem or box_invariants(args, out[0], out[1], cap, ascending=mask_mode)
    if problem:
        return problem
    keep_shape = (out[0].shape[0], *prob.shape[1:])
    problem = expect_tensor(out[2], "keep", keep_shape, torch.bool, prob.device)
    if problem or verdict.loose or not small(args):
        return problem
    want = run_reference(lambda: reference_module().roi_crops(prob, mode=args["mode"], **box_rules(args)))
    if want is None:
        return None
    keep, want_keep = out[2].cpu(), want[2]
    return same_boxes(out, want) or first_difference(keep, want_keep, keep != want_keep, "keep differs")


# ---------------------------------------------------------------------------------------
# Inputs: one valid set per op, random valid-ish sets, and the mutations.


def torch_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_pseudo_labels(shape: dict[str, int], dtype: torch.dtype, device: str, gen: torch.Generator) -> dict:
    batch, cells = shape["batch"], shape["grid_h"] * shape["grid_w"]
    # A clear peak of two cells over faint noise, and a diffuse last sample: foreground,
    # background and all-ignore rows.
    grounding = torch.rand(batch, cells, generator=gen) * 0.05
    grounding[:, cells // 3 : cells // 3 + 2] = 1.0
    if batch > 2:
        grounding[-1] = torch.rand(cells, generator=gen)
    sink = torch.zeros(batch, cells)
    sink[:, :1] = 0.01  # the first cell is a sink
    return {
        "grounding": grounding.to(device, dtype),
        "sink": sink.to(device, dtype),
        "grid_h": shape["grid_h"],
        "grid_w": shape["grid_w"],
        "sink_threshold": 1e-3,
        "fg_ratio": 0.2,
        "bg_ratio": 0.1,
        "max_box_fraction": 0.5,
        "ignore_index": -100,
    }


def make_massive_activation_sinks(shape: dict[str, int], dtype: torch.dtype, device: str, gen: torch.Generator) -> dict:
    batch, length, hidden = shape["batch"], shape["length"], shape["hidden"]
    h = torch.randn(batch, length, hidden, generator=gen)
    dims = sorted({max(hidden - 1, 0), hidden // 3})
    if batch and length and hidden:
        h[0, length // 2, dims[0]] = 300.0  # one massive activation
    # |h_d| / rms(h) never exceeds sqrt(D) = 4 here: the default tau of 20 would find nothing.
    return {"hidden": h.to(device, dtype), "dims": dims, "tau": 3.0, "eps": 1e-6}


def make_attention_rows(shape: dict[str, int], dtype: torch.dtype, device: str, gen: torch.Generator) -> dict:
    batch, heads, kv_heads, rows = shape["batch"], shape["heads"], shape["kv_heads"], shape["rows"]
    seq_len, head_dim = shape["seq_len"], shape["head_dim"]
    length = min(shape["key_length"], seq_len)
    start = torch.randint(0, seq_len - length + 1, (batch,), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    for b in range(batch):  # left padding, before each sample's window
        mask[b, : int(torch.randint(0, int(start[b]) + 1, (1,), generator=gen))] = False
    return {
        "query": (torch.randn(batch, heads, rows, head_dim, generator=gen) * 2).to(device, dtype),
        "key": (torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen) * 2).to(device, dtype),
        "query_positions": torch.randint(-1, seq_len + 1, (batch, rows), generator=gen).to(device),
        "key_start": start.to(device),
        "key_length": length,
        "key_padding_mask": mask.to(device),
        "scale": None,
    }


def make_rpn_scores(shape: dict[str, int], dtype: torch.dtype, device: str, gen: torch.Generator) -> dict:
    batch, cells, hidden = shape["batch"], shape["cells"], shape["hidden"]
    heads, kv_heads, head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype)

    mask = torch.rand(batch, cells, generator=gen) > 0.3
    return {
        "query_states": rand(batch, hidden),
        "visual_states": rand(batch, cells, hidden),
        "q_weight": rand(heads * head_dim, hidden, scale=0.3),
        "k_weight": rand(kv_heads * head_dim, hidden, scale=0.3),
        "num_heads": heads,
        "q_bias": rand(heads * head_dim),
        "k_bias": rand(kv_heads * head_dim),
        "visual_mask": mask.to(device),
    }


def blob_maps(batch: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Two blobs, one blob, then smooth random maps: samples with 2, 1 and many boxes."""
    prob = torch.rand(batch, height, width, generator=gen) ** 6
    if batch > 0:
        prob[0] = 0
        prob[0, : height // 3 + 1, : width // 3 + 1] = 0.9
        prob[0, -(height // 3 + 1) :, -(width // 3 + 1) :] = 0.8
    if batch > 1:
        prob[1] = 0
        prob[1, height // 3 : height // 3 + 2, width // 2 : width // 2 + 3] = 1.0
    return prob


def make_roi_boxes(shape: dict[str, int], dtype: torch.dtype, device: str, gen: torch.Generator) -> dict:
    return {
        "prob": blob_maps(shape["batch"], shape["height"], shape["width"], gen).to(device, dtype),
        "threshold": 0.15,
        "sigma": 1.0,
        "min_area": 4,
        "max_area": 225,
        "max_boxes": 2,
        "drop_singletons": True,
        "reference_clamp": True,
    }


def make_roi_crops(shape: dict[str, int], dtype: torch.dtype, device: str, gen: torch.Generator) -> dict:
    args = make_roi_boxes(shape, dtype, device, gen)
    return {"prob": args.pop("prob"), "threshold": args.pop("threshold"), "mode": "mask", **args}


def pick(rng: random.Random, usual: Any, hostile: list[Any], p: float = 0.05) -> Any:
    """Mostly the usual value, now and then a hostile one."""
    return rng.choice(hostile) if rng.random() < p else usual


def spoil(rng: random.Random, t: torch.Tensor, p: float = 0.1) -> torch.Tensor:
    """Now and then one NaN or Inf entry."""
    if t.numel() and rng.random() < p:
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([NAN, INF, -INF])
    return t


def finish(rng: random.Random, t: torch.Tensor, dtype: torch.dtype | None, device: str) -> torch.Tensor:
    """To the dtype and device, in a random memory layout."""
    t = t.to(device, dtype) if dtype is not None else t.to(device)
    layout = rng.choice(["contiguous"] * 3 + ["transposed", "strided", "expanded", "offset"])
    if layout == "contiguous" or t.numel() == 0 or (layout == "transposed" and t.dim() < 2):
        return t
    return mutate_tensor(t, "layout", layout, None)


def random_pseudo_labels(rng: random.Random, device: str) -> dict:
    gen = torch_generator(rng.getrandbits(31))
    batch, grid_h, grid_w = rng.randint(0, 5), rng.randint(1, 10), rng.randint(1, 10)
    dtype = rng.choice(FLOATS)
    grounding = torch.rand(batch, grid_h * grid_w, generator=gen) ** rng.choice([1, 3, 8])
    sink = torch.rand(batch, grid_h * grid_w, generator=gen) * rng.choice([0.0, 1e-3, 1e-2])
    return {
        "grounding": finish(rng, spoil(rng, grounding), dtype, device),
        "sink": finish(rng, spoil(rng, sink, 0.05), dtype, device),
        "grid_h": pick(rng, grid_h, [0, grid_h + 1]),
        "grid_w": grid_w,
        "sink_threshold": pick(rng, rng.choice([1e-3, 5e-3, 0.0, -1.0]), [NAN, INF]),
        "fg_ratio": pick(rng, rng.uniform(0, 0.9), [-0.1, NAN]),
        "bg_ratio": pick(rng, rng.uniform(0, 0.5), [-0.1, INF]),
        "max_box_fraction": pick(rng, rng.uniform(0.05, 1.5), [0.0, -1.0, NAN]),
        "ignore_index": rng.choice([-100, -1, 255, 2**40]),
    }


def random_massive_activation_sinks(rng: random.Random, device: str) -> dict:
    gen = torch_generator(rng.getrandbits(31))
    batch, length, hidden = rng.randint(0, 4), rng.randint(0, 8), rng.randint(1, 64)
    scale = rng.choice([1.0, 0.01, 30.0])
    h = torch.randn(batch, length, hidden, generator=gen) * scale
    dims = rng.sample(range(hidden), rng.randint(1, min(4, hidden)))
    for _ in range(rng.randint(0, 3) if batch and length else 0):
        h[rng.randrange(batch), rng.randrange(length), rng.choice(dims)] = (
            rng.choice([-1, 1]) * rng.uniform(3, 60) * scale
        )
    return {
        "hidden": finish(rng, spoil(rng, h), rng.choice(FLOATS), device),
        "dims": pick(rng, dims, [[], dims + [hidden], [-1]]),
        "tau": pick(rng, rng.uniform(0, 30), [-1.0, NAN, INF]),
        "eps": pick(rng, rng.choice([1e-6, 0.0, 1e-3, 1.0]), [-1e-6, NAN]),
    }


def random_attention_rows(rng: random.Random, device: str) -> dict:
    gen = torch_generator(rng.getrandbits(31))
    batch, kv_heads, rows = rng.randint(0, 3), rng.randint(1, 3), rng.randint(0, 5)
    heads, seq_len, head_dim = kv_heads * rng.randint(1, 3), rng.randint(0, 32), rng.randint(1, 16)
    length = rng.randint(0, seq_len)
    start = [rng.randint(0, seq_len - length) for _ in range(batch)]
    if batch and rng.random() < 0.05:
        start[rng.randrange(batch)] = rng.choice([-1, seq_len - length + 1])
    dtype, size = rng.choice(FLOATS), rng.choice([0.5, 2.0])
    mask = None if rng.random() < 0.4 else torch.rand(batch, seq_len, generator=gen) < 0.85
    return {
        "query": finish(
            rng, spoil(rng, torch.randn(batch, heads, rows, head_dim, generator=gen) * size), dtype, device
        ),
        "key": finish(
            rng, spoil(rng, torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen) * size), dtype, device
        ),
        "query_positions": finish(rng, torch.randint(-2, seq_len + 3, (batch, rows), generator=gen), None, device),
        "key_start": finish(rng, torch.tensor(start, dtype=torch.int64), None, device),
        "key_length": pick(rng, length, [seq_len + 1, -1]),
        "key_padding_mask": None if mask is None else finish(rng, mask, None, device),
        "scale": None if rng.random() < 0.5 else pick(rng, rng.uniform(-3, 3), [NAN, INF]),
    }


def random_rpn_scores(rng: random.Random, device: str) -> dict:
    gen = torch_generator(rng.getrandbits(31))
    batch, cells, hidden = rng.randint(0, 3), rng.randint(0, 12), rng.randint(1, 32)
    kv_heads, head_dim = rng.randint(1, 3), rng.randint(1, 8)
    heads = kv_heads * rng.randint(1, 3)
    dtype = rng.choice(FLOATS)

    def rand(*size, scale=1.0, optional=False):
        if optional and rng.random() < 0.5:
            return None
        return finish(rng, spoil(rng, torch.randn(*size, generator=gen) * scale, 0.05), dtype, device)

    mask = None if rng.random() < 0.5 else finish(rng, torch.rand(batch, cells, generator=gen) > 0.3, None, device)
    return {
        "query_states": rand(batch, hidden),
        "visual_states": rand(batch, cells, hidden),
        "q_weight": rand(heads * head_dim, hidden, scale=0.3),
        "k_weight": rand(kv_heads * head_dim, hidden, scale=0.3),
        "num_heads": pick(rng, heads, [heads + 1, 0, -1]),
        "q_bias": rand(heads * head_dim, optional=True),
        "k_bias": rand(kv_heads * head_dim, optional=True),
        "visual_mask": mask,
    }


def random_maps(rng: random.Random, batch: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    maps = []
    for _ in range(batch):
        kind = rng.choice(["blobs", "blobs", "smooth", "speckle", "zeros", "ones"])
        m = torch.zeros(height, width)
        if kind == "blobs":
            for _ in range(rng.randint(1, 4)):
                y, x = rng.randrange(height), rng.randrange(width)
                m[y : y + rng.randint(1, 4), x : x + rng.randint(1, 4)] = rng.uniform(0.4, 1.0)
        elif kind == "smooth":
            m = torch.rand(height, width, generator=gen) ** rng.choice([2, 4, 8])
        elif kind == "speckle":
            m = (torch.rand(height, width, generator=gen) > 0.8).float()
        elif kind == "ones":
            m.fill_(1.0)
        maps.append(m)
    return torch.stack(maps) if maps else torch.zeros(0, height, width)


def random_roi_boxes(rng: random.Random, device: str) -> dict:
    gen = torch_generator(rng.getrandbits(31))
    batch, height, width = rng.randint(0, 4), rng.randint(1, 16), rng.randint(1, 16)
    threshold = rng.uniform(0, 0.9) if rng.random() < 0.7 else -rng.uniform(0.05, 1.0)
    prob = random_maps(rng, batch, height, width, gen)
    return {
        "prob": finish(rng, spoil(rng, prob, 0.05), rng.choice(FLOATS), device),
        "threshold": pick(rng, threshold, [NAN, INF]),
        "sigma": pick(rng, rng.uniform(0.2, 3.0), [0.0, -1.0, NAN]),
        "min_area": pick(rng, rng.randint(0, 12), [-1]),
        "max_area": pick(rng, rng.randint(1, 300), [0]),
        "max_boxes": pick(rng, rng.randint(1, 5), [0, -1]),
        "drop_singletons": rng.random() < 0.5,
        "reference_clamp": rng.random() < 0.5,
    }


def random_roi_crops(rng: random.Random, device: str) -> dict:
    args = random_roi_boxes(rng, device)
    mode = pick(rng, rng.choice(["mask", "bbox"]), ["boxes", ""])
    return {"prob": args.pop("prob"), "threshold": args.pop("threshold"), "mode": mode, **args}


def mutate_tensor(t: torch.Tensor, how: str, value: Any, other_device: str | None) -> torch.Tensor:
    """One hostile change to one tensor argument."""
    if how == "dtype":
        return t.to(DTYPES[value])
    if how == "rank":
        return {"scalar": lambda: t.reshape(-1)[0].clone(), "drop": lambda: t[0], "add": lambda: t.unsqueeze(-1)}[
            value
        ]()
    if how == "empty":
        return t.narrow(value, 0, 0)
    if how == "layout":
        return relayout(t, value)
    if how == "entry":
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    if how == "fill":
        return torch.full_like(t, value)
    if how == "giant":  # a huge leading dimension that costs no memory
        return t.narrow(0, 0, 1).expand(2**40, *t.shape[1:])
    if how == "device":
        return t.to(other_device)
    raise ValueError(f"unknown tensor mutation {how!r}")


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same shape in another memory layout (expanded also repeats the first row)."""
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided":
        wide = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)
        wide[..., 0] = t
        return wide[..., 0]
    if layout == "expanded":
        return t.narrow(0, 0, 1).expand(t.shape)
    if layout == "offset":
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)
    raise ValueError(f"unknown layout {layout!r}")


# ---------------------------------------------------------------------------------------
# The ops: signature, shapes of the valid inputs, contract, check, random inputs.


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str  # float_tensor, long_tensor, bool_tensor, int, float, bool, str, int_list
    rank: int = 0
    optional: bool = False

    @property
    def is_tensor(self) -> bool:
        return self.kind.endswith("_tensor")


@dataclass(frozen=True)
class OpSpec:
    args: tuple[Arg, ...]
    shape: dict[str, int]
    make: Callable[..., dict]
    contract: Callable[[Rules], None]
    check: Callable[[dict, Any, Verdict], str | None]
    random: Callable[[random.Random, str], dict]


def T(name: str, kind: str, rank: int, optional: bool = False) -> Arg:
    return Arg(name, f"{kind}_tensor", rank, optional)


BOX_ARGS = (
    Arg("sigma", "float"),
    Arg("min_area", "int"),
    Arg("max_area", "int"),
    Arg("max_boxes", "int"),
    Arg("drop_singletons", "bool"),
    Arg("reference_clamp", "bool"),
)
ROI_SHAPE = {"batch": 3, "height": 12, "width": 12}

OPS: dict[str, OpSpec] = {
    "pseudo_labels": OpSpec(
        (
            T("grounding", "float", 2),
            T("sink", "float", 2),
            Arg("grid_h", "int"),
            Arg("grid_w", "int"),
            Arg("sink_threshold", "float"),
            Arg("fg_ratio", "float"),
            Arg("bg_ratio", "float"),
            Arg("max_box_fraction", "float"),
            Arg("ignore_index", "int"),
        ),
        {"batch": 3, "grid_h": 4, "grid_w": 6},
        make_pseudo_labels,
        contract_pseudo_labels,
        check_pseudo_labels,
        random_pseudo_labels,
    ),
    "massive_activation_sinks": OpSpec(
        (T("hidden", "float", 3), Arg("dims", "int_list"), Arg("tau", "float"), Arg("eps", "float")),
        {"batch": 2, "length": 5, "hidden": 16},
        make_massive_activation_sinks,
        contract_massive_activation_sinks,
        check_massive_activation_sinks,
        random_massive_activation_sinks,
    ),
    "attention_rows": OpSpec(
        (
            T("query", "float", 4),
            T("key", "float", 4),
            T("query_positions", "long", 2),
            T("key_start", "long", 1),
            Arg("key_length", "int"),
            T("key_padding_mask", "bool", 2, optional=True),
            Arg("scale", "float", optional=True),
        ),
        {"batch": 3, "heads": 4, "kv_heads": 2, "rows": 5, "seq_len": 23, "head_dim": 8, "key_length": 9},
        make_attention_rows,
        contract_attention_rows,
        check_attention_rows,
        random_attention_rows,
    ),
    "rpn_scores": OpSpec(
        (
            T("query_states", "float", 2),
            T("visual_states", "float", 3),
            T("q_weight", "float", 2),
            T("k_weight", "float", 2),
            Arg("num_heads", "int"),
            T("q_bias", "float", 1, optional=True),
            T("k_bias", "float", 1, optional=True),
            T("visual_mask", "bool", 2, optional=True),
        ),
        {"batch": 3, "cells": 7, "hidden": 16, "heads": 4, "kv_heads": 2, "head_dim": 4},
        make_rpn_scores,
        contract_rpn_scores,
        check_rpn_scores,
        random_rpn_scores,
    ),
    "roi_boxes": OpSpec(
        (T("prob", "float", 3), Arg("threshold", "float"), *BOX_ARGS),
        ROI_SHAPE,
        make_roi_boxes,
        contract_roi_boxes,
        check_roi_boxes,
        random_roi_boxes,
    ),
    "roi_crops": OpSpec(
        (T("prob", "float", 3), Arg("threshold", "float"), Arg("mode", "str"), *BOX_ARGS),
        ROI_SHAPE,
        make_roi_crops,
        contract_roi_crops,
        check_roi_crops,
        random_roi_crops,
    ),
}


# ---------------------------------------------------------------------------------------
# The cases.

INT_VALUES = [0, 1, -1, 2, 2**31 - 1, 2**31, 2**32 + 1, 3_000_000_000, 2**62, INT64_MAX, INT64_MIN, 2.5, None]
FLOAT_VALUES = [0.0, -0.0, -1.0, 1e-300, 5e-324, 1e300, NAN, INF, -INF, 3, "x", None]
STR_VALUES = ["mask", "bbox", "", "MASK", "mask\x00", "x" * 100_000, None]
# [16]: one past D of the valid hidden states; then 100,000 dims in range (more than the
# kernels take).
DIMS_VALUES = [[], [-1], [16], [0, 0], [INT64_MAX], [INT64_MIN], [2**31], list(range(16)) * 6250, [1.5], [2**63]]
TENSOR_ENTRIES = {
    "float": [("entry", NAN), ("entry", INF), ("entry", -INF), ("entry", 1e30), ("fill", NAN), ("fill", 0.0)],
    "long": [("entry", v) for v in (-1, 2**31, INT64_MAX, INT64_MAX - 2, INT64_MIN)] + [("fill", INT64_MAX)],
    "bool": [("fill", False), ("fill", True)],
}
NATURAL_DTYPE = {"float": "float32", "long": "int64", "bool": "bool"}


@dataclass(frozen=True)
class Case:
    id: str
    op: str
    device: str
    kind: str  # base, tensor, scalar, special or random
    arg: str | None = None
    how: str | None = None
    value: Any = None
    shape: dict[str, int] = field(default_factory=dict)
    dtype: str = "float32"
    seed: int = 0

    @property
    def worker(self) -> str:
        """The device a worker needs: a CPU worker never touches CUDA and can cap its memory."""
        return "cuda" if self.device == "cuda" or self.how == "device" else "cpu"


@dataclass(frozen=True)
class Special:
    """A case no single-argument change reaches: ``edit`` changes the valid inputs."""

    op: str
    name: str
    shape: dict[str, int]
    edit: Callable[[dict], None]


def fill_key_start(value: int, length: int | None = None) -> Callable[[dict], None]:
    def edit(args: dict) -> None:
        args["key_start"].fill_(value)
        if length is not None:
            args["key_length"] = length

    return edit


def expanded_grid(height: int, width: int) -> Callable[[dict], None]:
    def edit(args: dict) -> None:
        args["prob"] = args["prob"].new_zeros(1, 1, 1).expand(1, height, width)

    return edit


def expanded_hidden(width: int, dim: int) -> Callable[[dict], None]:
    def edit(args: dict) -> None:
        args["hidden"] = args["hidden"].new_ones(1, 1, 1).expand(1, 1, width)
        args["dims"] = [dim]

    return edit


# Sizes whose int64 product or sum wraps, and expanded tensors of 2^31 or more elements.
SPECIALS = [
    Special("pseudo_labels", "grid (2^61 + 3) x 8 wraps to N = 24", {}, lambda a: a.update(grid_h=2**61 + 3, grid_w=8)),
    Special(
        "pseudo_labels",
        "grid 2^32 x 2^32 wraps to N = 0",
        {"grid_h": 0},
        lambda a: a.update(grid_h=2**32, grid_w=2**32),
    ),
    Special(
        "pseudo_labels",
        "grid INT64_MAX x INT64_MAX wraps to N = 1",
        {"grid_h": 1, "grid_w": 1},
        lambda a: a.update(grid_h=INT64_MAX, grid_w=INT64_MAX),
    ),
    Special("attention_rows", "key_start INT64_MAX, key_length 0", {}, fill_key_start(INT64_MAX, 0)),
    Special("attention_rows", "key_start + key_length wraps past INT64_MAX", {}, fill_key_start(INT64_MAX - 7)),
    Special("attention_rows", "key_start INT64_MAX - 1 everywhere", {}, fill_key_start(INT64_MAX - 1)),
    Special("massive_activation_sinks", "hidden 1x1x(2^31 + 8) expanded", {}, expanded_hidden(2**31 + 8, 2**31 + 3)),
    Special("roi_boxes", "grid 2^16 x 2^15 expanded", {}, expanded_grid(2**16, 2**15)),
    Special("roi_boxes", "grid 2^31 x 2^31 expanded", {}, expanded_grid(2**31, 2**31)),
    Special("roi_crops", "grid 2^16 x 2^15 expanded", {}, expanded_grid(2**16, 2**15)),
    Special("roi_crops", "grid 2^31 x 2^31 expanded", {}, expanded_grid(2**31, 2**31)),
    # Mask mode never reads max_boxes: bbox mode does.
    Special("roi_crops", "bbox mode, max_boxes 3e9", {}, lambda a: a.update(mode="bbox", max_boxes=3_000_000_000)),
    Special("roi_crops", "bbox mode, max_boxes 2^62", {}, lambda a: a.update(mode="bbox", max_boxes=2**62)),
    Special("roi_crops", "bbox mode, max_boxes INT64_MAX", {}, lambda a: a.update(mode="bbox", max_boxes=INT64_MAX)),
]
SPECIAL_EDITS = {f"{s.op}: {s.name}": s.edit for s in SPECIALS}


def tensor_mutations(arg: Arg, cuda: bool) -> list[tuple[str, Any]]:
    kind = arg.kind.removesuffix("_tensor")
    found = [("dtype", d) for d in DTYPES if d != NATURAL_DTYPE[kind]]
    found += [("rank", r) for r in ("scalar", "drop", "add")]
    found += [("empty", d) for d in range(arg.rank)]
    found += [
        ("layout", lay)
        for lay in ("transposed", "strided", "expanded", "offset")
        if arg.rank >= 2 or lay != "transposed"
    ]
    found += [("giant", None)] + TENSOR_ENTRIES[kind]
    found += [("none", None)] if arg.optional else []
    found += [("device", None)] if cuda else []
    return found


def scalar_values(arg: Arg) -> list[Any]:
    return {
        "int": INT_VALUES,
        "float": FLOAT_VALUES,
        "bool": [True, False],
        "str": STR_VALUES,
        "int_list": DIMS_VALUES,
    }[arg.kind]


def label(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... (length {len(value)})"


def op_cases(op: str, spec: OpSpec, device: str, cuda: bool, seed: int) -> list[Case]:
    prefix = f"{op}/{device}"
    cases = [
        Case(f"{prefix}/base.{d}", op, device, "base", dtype=d, seed=seed)
        for d in ("float32", "float64", "float16", "bfloat16")
    ]
    for name, size in spec.shape.items():
        for value in (v for v in (0, 1) if v != size):
            cases.append(Case(f"{prefix}/shape.{name}={value}", op, device, "base", shape={name: value}, seed=seed))
    for arg in spec.args:
        if arg.is_tensor:
            for how, value in tensor_mutations(arg, cuda):
                shown = value if isinstance(value, str) else label(value)
                tag = f"{arg.name}.{how}" + ("" if value is None else f"={shown}")
                cases.append(Case(f"{prefix}/{tag}", op, device, "tensor", arg.name, how, value, seed=seed))
        else:
            for value in scalar_values(arg):
                cases.append(
                    Case(f"{prefix}/{arg.name}={label(value)}", op, device, "scalar", arg.name, value=value, seed=seed)
                )
    for s in SPECIALS:
        if s.op == op:
            cases.append(
                Case(
                    f"{prefix}/special.{s.name}", op, device, "special", how=f"{op}: {s.name}", shape=s.shape, seed=seed
                )
            )
    return cases


def all_cases(devices: list[str], cuda: bool, random_count: int, seed: int) -> list[Case]:
    cases = []
    for device in devices:
        for op, spec in OPS.items():
            cases += op_cases(op, spec, device, cuda, seed)
        names = list(OPS)
        for i in range(random_count):
            op = names[i % len(names)]
            case_seed = seed * 1_000_003 + i
            cases.append(Case(f"{op}/{device}/random.seed={case_seed}", op, device, "random", seed=case_seed))
    return cases


# ---------------------------------------------------------------------------------------
# The worker: builds one case at a time, runs it and judges the outcome.


def build_args(case: dict) -> dict:
    spec, device = OPS[case["op"]], case["device"]
    if case["kind"] == "random":
        return spec.random(random.Random(case["seed"]), device)
    shape = {**spec.shape, **case["shape"]}
    args = spec.make(shape, DTYPES[case["dtype"]], device, torch_generator(case["seed"]))
    if case["kind"] == "tensor":
        name, how = case["arg"], case["how"]
        other = "cpu" if device == "cuda" else "cuda"
        args[name] = None if how == "none" else mutate_tensor(args[name], how, case["value"], other)
    elif case["kind"] == "scalar":
        args[case["arg"]] = case["value"]
    elif case["kind"] == "special":
        SPECIAL_EDITS[case["how"]](args)
    return args


def describe_value(v: Any) -> str:
    if not isinstance(v, torch.Tensor):
        return label(v)
    text = f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
    if v.device.type != "cpu":
        text += f"@{v.device}"
    if not v.is_contiguous():
        text += f" strides={list(v.stride())}"
    if v.storage_offset():
        text += f" offset={v.storage_offset()}"
    if (v.is_floating_point() or v.is_complex()) and 0 < v.numel() <= REFERENCE_LIMIT:
        bad = int((~torch.isfinite(v)).sum())
        text += f" non-finite={bad}" if bad else ""
    if v.dtype == torch.int64 and v.numel() <= 8:
        text += f" {v.tolist()}"
    return text


def describe(args: dict) -> str:
    return ", ".join(f"{name}={describe_value(v)}" for name, v in args.items())


def first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text.splitlines()[0][:300]


def names_in(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message) for name in names)


def classify_error(err: Exception, verdict: Verdict, case: dict) -> tuple[str, str]:
    line = first_line(err)
    if verdict.kind == "valid":
        return "BAD_ERROR", f"refused an input the docs accept: {line}"
    names = verdict.names + ((case["arg"],) if case["arg"] else ())
    if isinstance(err, MemoryError) or not names_in(str(err), names):
        return "BAD_ERROR", f"the message names none of {', '.join(dict.fromkeys(names))}: {line}"
    return "CLEAN_ERROR", line


def cuda_alive() -> bool:
    try:
        torch.zeros(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def run_case(case: dict, announce: Callable[[str], None]) -> dict:
    spec, on_cuda = OPS[case["op"]], case["worker"] == "cuda"
    try:
        args = build_args(case)
        announce(describe(args))
        verdict = judge(spec.contract, args)
    except Exception:
        return {"outcome": "FUZZER_ERROR", "detail": "building the case failed: " + traceback.format_exc()[-600:]}
    try:
        out = getattr(torch.ops.sdrpn, case["op"]).default(**args)
        if on_cuda:
            torch.cuda.synchronize()
    except Exception as err:
        if on_cuda and not cuda_alive():
            return {"outcome": "CRASH", "detail": f"the CUDA context broke: {first_line(err)}", "fatal": True}
        outcome, detail = classify_error(err, verdict, case)
        return {"outcome": outcome, "detail": detail}
    if verdict.kind == "invalid":
        return {"outcome": "SILENT_WRONG", "detail": f"returned for an input the docs refuse: {verdict.why}"}
    try:
        problem = spec.check(args, out, verdict)
    except Exception:
        return {"outcome": "FUZZER_ERROR", "detail": "checking the result failed: " + traceback.format_exc()[-600:]}
    return {"outcome": "SILENT_WRONG", "detail": problem} if problem else {"outcome": "OK", "detail": verdict.why}


def cap_memory(gib: float) -> None:
    """Caps the address space a little above what is mapped now, so that a giant allocation
    fails at once instead of swapping the machine (CUDA reserves address space: CPU only)."""
    import resource

    with open("/proc/self/status") as status:
        mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    limit = mapped + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def runner_main(inbox: Any, outbox: Any, device: str, memory_gb: float, threads: int) -> None:
    """Runs cases until its inbox closes or the CUDA context breaks."""
    torch.set_num_threads(threads)
    if device == "cpu" and memory_gb > 0 and sys.platform.startswith("linux"):
        cap_memory(memory_gb)

    def send(message: dict) -> None:
        outbox.write(json.dumps(message) + "\n")
        outbox.flush()

    for line in inbox:
        result = run_case(json.loads(line), lambda desc: send({"type": "args", "args": desc}))
        send({"type": "result", **result})
        if result.pop("fatal", None):
            return  # a broken CUDA context poisons every later case


@dataclass
class Runner:
    """A child forked from the worker: it runs the cases, so a crash costs a fork, not a
    fresh interpreter importing torch."""

    pid: int
    inbox: Any
    outbox: Any

    @classmethod
    def fork(cls, device: str, memory_gb: float, threads: int, channel: Any) -> Runner:
        cases_r, cases_w = os.pipe()
        results_r, results_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(channel.fileno())  # the parent must see EOF when the worker dies
                os.close(cases_w)
                os.close(results_r)
                runner_main(os.fdopen(cases_r), os.fdopen(results_w, "w"), device, memory_gb, threads)
                code = 0
            finally:
                os._exit(code)  # never return into the worker's loop
        os.close(cases_r)
        os.close(results_w)
        return cls(pid, os.fdopen(cases_w, "w"), os.fdopen(results_r))

    def reaped(self) -> bool:
        """Whether it died since its last case (a kill that came as it finished)."""
        if not os.waitpid(self.pid, os.WNOHANG)[0]:
            return False
        self.inbox.close()
        self.outbox.close()
        return True

    def how_it_ended(self) -> dict:
        self.inbox.close()
        self.outbox.close()
        code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return {"type": "result", "outcome": "CRASH", "detail": f"the process running the op died ({how})"}


def worker_main(device: str, memory_gb: float, threads: int) -> None:
    """Imports torch and the ops once, then forks a runner, and a fresh one whenever the
    last one dies; passes cases to it and its messages back."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the ops print goes to stderr, not into the channel

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    import sdrpn  # noqa: F401  (registers the ops)

    reference_module()

    def fork() -> Runner:
        runner = Runner.fork(device, memory_gb, threads, channel)
        send({"type": "runner", "pid": runner.pid})
        return runner

    runner = fork()
    send({"type": "ready"})
    for line in sys.stdin:
        if runner.reaped():
            runner = fork()
        runner.inbox.write(line)
        runner.inbox.flush()
        while True:
            message = json.loads(runner.outbox.readline() or "null")
            if message is None:
                send(runner.how_it_ended())
                runner = fork()
                break
            send(message)
            if message.get("fatal"):
                runner.how_it_ended()
                runner = fork()
            if message["type"] == "result":
                break


# ---------------------------------------------------------------------------------------
# The parent: a pool of workers.


@dataclass
class Options:
    timeout: float
    memory_gb: float
    threads: int
    startup_timeout: float = 300.0


class Worker:
    """One worker process and the line-delimited JSON channel to it."""

    def __init__(self, device: str, options: Options):
        self.options = options
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        command = [sys.executable, SCRIPT, "--worker", device]
        command += ["--memory-gb", str(options.memory_gb), "--threads", str(options.threads)]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env
        )
        self.buffer = b""
        self.runner = 0
        try:
            ready = self.read(time.monotonic() + options.startup_timeout)
        except TimeoutError:
            ready = None
        if not ready or ready.get("type") != "ready":
            self.close()
            raise RuntimeError(f"a {device} worker failed to start:\n{self.stderr_since(0)}")

    def read(self, deadline: float) -> dict | None:
        """The next message but runner notices, None when the worker is gone; TimeoutError
        past the deadline."""
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" not in self.buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line)
            if message["type"] != "runner":
                return message
            self.runner = message["pid"]

    def stderr_since(self, offset: int) -> str:
        self.stderr.seek(offset)
        return self.stderr.read().decode(errors="replace").strip()[-1500:]

    def run(self, case: Case) -> dict:
        start = os.fstat(self.stderr.fileno()).st_size
        began = time.monotonic()
        result = {"args": ""}
        try:
            self.proc.stdin.write((json.dumps(dataclasses.asdict(case) | {"worker": case.worker}) + "\n").encode())
            self.proc.stdin.flush()
            while True:
                message = self.read(began + self.options.timeout)
                if message is None:
                    self.close()
                    return result | {"outcome": "CRASH", "detail": "the worker process itself died"}
                if message["type"] == "args":
                    result["args"] = message["args"]
                    continue
                break
        except TimeoutError:
            return result | self.stop_runner()
        except BrokenPipeError:
            self.close()
            return result | {"outcome": "CRASH", "detail": "the worker process itself died"}
        if message["outcome"] == "CRASH":  # the runner's last words, an abort's message say
            tail = [line for line in self.stderr_since(start).splitlines() if line.strip()][-3:]
            if tail:
                message["detail"] += ": " + " | ".join(tail)
        return result | {"outcome": message["outcome"], "detail": message["detail"]}

    def stop_runner(self) -> dict:
        """Kills a runner past its timeout; the worker reports its end and forks another."""
        hang = {"outcome": "HANG", "detail": f"no result within {self.options.timeout:g} s"}
        os.kill(self.runner, signal.SIGKILL)
        deadline = time.monotonic() + 60
        try:
            while (message := self.read(deadline)) is not None:
                if message["type"] == "result":  # its own, or the worker's report of its end
                    return hang
        except TimeoutError:
            pass
        self.close()
        return hang

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def run_cases(cases: list[Case], jobs: int, options: Options) -> list[dict]:
    """Runs the cases on ``jobs`` lanes, each with its own workers; keeps the input order."""
    results: list[dict | None] = [None] * len(cases)
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(cases)):
        todo.put(i)
    failures: list[BaseException] = []

    def lane() -> None:
        workers: dict[str, Worker] = {}
        try:
            while not failures:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                case = cases[i]
                worker = workers.get(case.worker) or workers.setdefault(case.worker, Worker(case.worker, options))
                began = time.monotonic()
                result = worker.run(case)
                result["seconds"] = round(time.monotonic() - began, 3)
                if not worker.alive:
                    workers.pop(case.worker).close()
                results[i] = result
        except BaseException as err:
            failures.append(err)
        finally:
            for worker in workers.values():
                worker.close()

    threads = [threading.Thread(target=lane, daemon=True) for _ in range(max(1, min(jobs, len(cases))))]
    for thread in threads:
        thread.start()
    last_note = time.monotonic()
    for thread in threads:
        while thread.is_alive():
            thread.join(1.0)
            if time.monotonic() - last_note > 30:
                done = sum(r is not None for r in results)
                print(f"fuzz_ops: {done}/{len(cases)} cases", file=sys.stderr, flush=True)
                last_note = time.monotonic()
    if failures:
        raise failures[0]
    return [r for r in results if r is not None]


# ---------------------------------------------------------------------------------------
# The report.


def count(cases: list[Case], results: list[dict]) -> dict[str, dict[str, int]]:
    table = {op: dict.fromkeys(OUTCOMES, 0) for op in OPS}
    for case, result in zip(cases, results):
        table[case.op][result["outcome"]] += 1
    return table


def print_report(cases: list[Case], results: list[dict], rerun: str) -> None:
    table = count(cases, results)
    print(f"{'op':<26}" + "".join(f"{o:>14}" for o in OUTCOMES) + f"{'total':>8}")
    for op, row in table.items():
        print(f"{op:<26}" + "".join(f"{row[o]:>14}" for o in OUTCOMES) + f"{sum(row.values()):>8}")
    totals = {o: sum(row[o] for row in table.values()) for o in OUTCOMES}
    print(f"{'all':<26}" + "".join(f"{totals[o]:>14}" for o in OUTCOMES) + f"{len(results):>8}")
    notable = [(c, r) for c, r in zip(cases, results) if r["outcome"] not in ("OK", "CLEAN_ERROR")]
    if not notable:
        return
    print(f"\nCases neither OK nor CLEAN_ERROR (rerun one: {rerun} --case ID):")
    for op in OPS:
        mine = [(c, r) for c, r in notable if c.op == op]
        if mine:
            print(f"\n{op}")
        for case, result in mine:
            print(f"  {result['outcome']:<13} {case.id}")
            print(f"      args:   {result['args'] or '(not built)'}")
            print(f"      detail: {result['detail']}")


def write_json(path: str, cases: list[Case], results: list[dict], settings: dict) -> None:
    rows = [{"id": c.id, "op": c.op, "device": c.device, **r} for c, r in zip(cases, results)]
    report = {**settings, "counts": count(cases, results), "cases": rows}
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)


# ---------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fuzz the sdrpn torch ops; every case in a worker process.",
        epilog="Exit status 1 on any CRASH, HANG, SILENT_WRONG or FUZZER_ERROR.",
    )
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="cpu")
    parser.add_argument("--random", type=int, default=None, help="random valid-ish cases per device (100, quick 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the random sweep")
    parser.add_argument("--timeout", type=float, default=None, help="seconds a case may take (60, quick 20)")
    parser.add_argument("--json", help="write every case and its outcome here")
    parser.add_argument("--quick", action="store_true", help="a short run: fewer random cases, shorter timeout")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="worker processes at once")
    parser.add_argument("--case", action="append", default=[], help="run only cases whose id contains this")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="address space a CPU worker may add")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.memory_gb, args.threads)
        return 0
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("fuzz_ops: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu", "cuda"] if cuda else ["cpu"]}[args.device]
    random_count = args.random if args.random is not None else (24 if args.quick else 100)
    timeout = args.timeout if args.timeout is not None else (20.0 if args.quick else 60.0)
    cases = all_cases(devices, cuda, random_count, args.seed)
    if args.case:
        cases = [c for c in cases if any(text in c.id for text in args.case)]
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    began = time.monotonic()
    results = run_cases(cases, args.jobs, Options(timeout, args.memory_gb, threads))
    seconds = time.monotonic() - began
    rerun = f"python scripts/fuzz_ops.py --device {args.device} --seed {args.seed} --random {random_count}"
    print_report(cases, results, rerun)
    print(f"\n{len(cases)} cases on {', '.join(devices)} in {seconds:.0f} s")
    if args.json:
        settings = {"devices": devices, "seed": args.seed, "random": random_count, "seconds": round(seconds, 1)}
        write_json(args.json, cases, results, settings)
    return 1 if any(r["outcome"] in FAILING for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
