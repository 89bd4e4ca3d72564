"""The ``sdrpn`` command line: flags in, option objects out, stage packages called.

Option flags are made from the fields of the option dataclasses (sdrpn.options,
labels.options, rpn.train_config), so every field has a flag and --help shows its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import types
import typing
from collections.abc import Callable

from safetensors import SafetensorError

from .distributed import RankStopped
from .io_utils import FolderBusy
from .options import DECODERS, INT64_MAX, TASK_THRESHOLDS, RoiOptions
from .prefetch import DEFAULT_WORKERS
from .subsets import SUBSET_SEED


class Parser(argparse.ArgumentParser):
    """argparse's parser, a mistake in the flags reported in one line as every other user
    error is (argparse prints its whole usage block first; --help shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def _grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid must look like 24x24, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--grid must be at least 1x1, got {text!r}")
    return h, w


def _at_least(minimum: int, text: str) -> int:
    """An int >= minimum that fits the 64 bits torch and the ops take."""
    value = int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    if value > INT64_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {INT64_MAX} (64 bits), got {value}")
    return value


def positive_int(text: str) -> int:
    return _at_least(1, text)


def non_negative_int(text: str) -> int:
    return _at_least(0, text)


def text_arg(text: str) -> str:
    """A value that is not empty or blank: an empty path would name the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


def path_arg(text: str) -> str:
    """A file or folder: text_arg with a leading ``~`` taken as the home folder, as the
    shell takes it everywhere but in quotes and after ``--flag=``."""
    return os.path.expanduser(text_arg(text))


def number_in(low: float, high: float = math.inf, *, low_open: bool = False):
    """An argparse type: a finite float in [low, high] ((low, high] with ``low_open``)."""

    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            left = "(" if low_open else "["
            right = "]" if math.isfinite(high) else ")"
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}{low}, {high}{right}, got {text}")
        return value

    return parse


def device_arg(text: str) -> str:
    """A torch device this machine has ('cpu', 'cuda', 'cuda:1'): a typo or a missing GPU is
    a flag error up front, not a traceback once the model has loaded."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:N)") from None
    if device.type == "cpu":
        return text
    backend = getattr(torch, device.type, None)
    count = backend.device_count() if backend is not None and backend.is_available() else 0
    if count == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no {device.type} device")
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} {device.type} device(s)")
    return text


WORKERS_HELP = (
    "threads that load images ahead of the model (0: on the main thread) (default: the CPU count, at most 8: "
    "%(default)s here)"
)


def _plain_type(hint):
    """int for ``int | None``, and so on."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def add_options(parser: argparse.ArgumentParser, cls, *, overrides_from: str | None = None) -> None:
    """One flag per field of an option dataclass (fields with metadata cli=False excepted).

    overrides_from: every flag defaults to None, meaning "take the value from there"
    (for instance "the RPN folder"); the help shows the dataclass default as the fallback.
    """
    group = parser.add_argument_group(f"{cls.__name__} ({cls.__doc__.strip().splitlines()[0]})")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind = _plain_type(hints[f.name])
        default = None if f.default is dataclasses.MISSING else f.default
        shown = f"{overrides_from}, else {default!r}" if overrides_from else repr(default)
        text = f.metadata.get("help", "")
        kwargs = {"dest": f.name, "help": text if "(default:" in text else f"{text} (default: {shown})"}
        if f.metadata.get("required") and not overrides_from:
            kwargs.update(required=True, help=f.metadata.get("help", ""))
        if kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        else:  # text must not be blank: an empty path names the current folder
            text = path_arg if f.metadata.get("path") else text_arg
            kwargs.update(type=text if kind is str else kind, choices=f.metadata.get("choices"))
        group.add_argument("--" + f.name.replace("_", "-"), default=None if overrides_from else default, **kwargs)


def options_from_args(cls, args: argparse.Namespace, base=None, **extra):
    """The option object from parsed flags: on top of `base` (flags left at None keep its
    values) or of the dataclass defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        if base is not None:
            return base.updated(**values, **extra)
        return cls(**{k: v for k, v in values.items() if v is not None}, **extra)
    except ValueError as err:  # "max_new_tokens must be >= 1": name the flag the user typed
        name = str(err).split(" ", 1)[0]
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        if values.get(name) is not None and values[name] != defaults.get(name):
            raise ValueError(f"argument --{name.replace('_', '-')}: {err}") from None
        raise


DESCRIPTION = """SD-RPN for LLaVA-1.5: pseudo labels from the model's own attention (label), a region
proposal network trained on them (train), and answers that read a crop of the predicted
region (infer). `sdrpn COMMAND --help` lists a command's flags and their defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sdrpn", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also accepted after the command)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("label-demo", help="label synthetic attention maps and draw them")
    demo.add_argument("--out", type=path_arg, default="outputs/label-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--batch", type=positive_int, default=12, help="number of maps (default: %(default)s)")
    demo.add_argument("--grid", type=_grid, default=(24, 24), help="grid as HxW (default: 24x24)")
    demo.add_argument("--seed", type=non_negative_int, default=0, help="the maps' seed (default: %(default)s)")
    demo.add_argument("--device", type=device_arg, default="cpu", help="where the op runs (default: %(default)s)")

    label = sub.add_parser("label", help="pseudo labels from a LLaVA model's own attention")
    label.add_argument("--model", type=text_arg, required=True, help="LLaVA model (HF format): a folder or a Hub id")
    label.add_argument("--data", type=path_arg, required=True, help="LLaVA-format JSON list of samples")
    label.add_argument(
        "--image-folder", type=path_arg, required=True, help="the folder the data's image paths are relative to"
    )
    label.add_argument("--out", type=path_arg, required=True, help="label folder (resumable with the same settings)")
    label.add_argument(
        "--preset",
        type=path_arg,
        default="auto",
        help="heads, sink threshold and template: a preset name, a JSON file, or 'auto' (the "
        "model folder's sdrpn_preset.json, else the LLaVA-1.5 preset of its depth) "
        "(default: %(default)s)",
    )
    label.add_argument(
        "--batch-size", type=positive_int, default=8, help="samples per teacher-forced pass (default: %(default)s)"
    )
    label.add_argument("--limit", type=positive_int, default=None, help="only the first N entries")
    label.add_argument(
        "--shard-size",
        type=positive_int,
        default=1000,
        help="samples a shard holds at least (the last may hold fewer): it closes after the batch that reaches "
        "this (default: %(default)s)",
    )
    label.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS, help=WORKERS_HELP)
    label.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default="fp16",
        help="the model's dtype while labelling; the reference labels in fp16, and greedy answers can "
        "differ between fp16 and bf16 (default: %(default)s)",
    )
    label.add_argument(
        "--device", type=device_arg, default=None, help="default: cuda:LOCAL_RANK if available, else cpu"
    )
    from .labels.options import LabelOptions  # the stages import transformers: only where needed

    add_options(label, LabelOptions)

    train = sub.add_parser("train", help="train the RPN on a label folder")
    train.add_argument("--model", type=text_arg, required=True, help="LLaVA model (HF format): a folder or a Hub id")
    train.add_argument(
        "--device", type=device_arg, default=None, help="default: cuda:LOCAL_RANK if available, else cpu"
    )
    from .rpn.train_config import TrainConfig

    add_options(train, TrainConfig)
    add_options(train, RoiOptions, overrides_from="the preset")

    infer = sub.add_parser("infer", help="answer with RoI crops (one image, or a whole file)")
    infer.add_argument("--model", type=text_arg, required=True, help="LLaVA model (HF format): a folder or a Hub id")
    infer.add_argument(
        "--rpn", type=path_arg, required=True, help="a trained RPN: its folder (sdrpn train --out) or a Hub id"
    )
    infer.add_argument("--image", type=path_arg, default=None, help="one image to answer about (with --question)")
    infer.add_argument("--question", default=None, help="the question about --image")
    infer.add_argument("--data", type=path_arg, default=None, help="LLaVA-format JSON list to answer as a whole")
    infer.add_argument(
        "--image-folder",
        type=path_arg,
        default=None,
        help="with --data: the folder the data's image paths are relative to",
    )
    infer.add_argument("--out", type=path_arg, default=None, help="JSONL answers for --data (resumable)")
    infer.add_argument(
        "--viz",
        type=path_arg,
        default=None,
        help="with --image: a picture of the RoI heat map and boxes (PNG, or the format the extension names)",
    )
    infer.add_argument("--json", action="store_true", help="print one JSON object")
    infer.add_argument(
        "--preprocessing", choices=["pad", "crop"], default=None, help="image preprocessing (default: the RPN folder's)"
    )
    infer.add_argument(
        "--prompt-template", type=text_arg, default=None, help="prompt template (default: the RPN folder's)"
    )
    infer.add_argument(
        "--task",
        choices=sorted(TASK_THRESHOLDS),
        default=None,
        help="use the RoI threshold the reference evaluated this benchmark with (--threshold overrides)",
    )
    infer.add_argument(
        "--max-new-tokens", type=positive_int, default=128, help="longest answer, in tokens (default: %(default)s)"
    )
    infer.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="with --data: questions answered together (default: %(default)s)",
    )
    infer.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS, help=WORKERS_HELP)
    infer.add_argument("--limit", type=positive_int, default=None, help="with --data: only the first N entries")
    infer.add_argument(
        "--restart", action="store_true", help="with --data: answer every entry again, discarding what --out holds"
    )
    infer.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default="fp16",
        help="the model's and the RPN's dtype (default: %(default)s; fp32 is faster on a CPU)",
    )
    infer.add_argument("--device", type=device_arg, default=None, help="default: cuda if available, else cpu")
    infer.add_argument(
        "--decoder",
        choices=DECODERS,
        default="auto",
        help="how answer tokens are decoded: CUDA graphs over a static cache ('graph', what 'auto' picks on CUDA), "
        "the same step without graphs ('static') or the model's own forward ('hf') (default: %(default)s)",
    )
    add_options(infer, RoiOptions, overrides_from="the RPN folder")

    convert = sub.add_parser("convert-labels", help="import a reference-implementation label pickle")
    convert.add_argument("pickle", type=path_arg, help="IN.pkl")
    convert.add_argument("out", type=path_arg, help="OUT_DIR")
    convert.add_argument("--grid", type=_grid, default=None, help="HxW when the maps are not square")
    convert.add_argument(
        "--image-folder",
        type=path_arg,
        default=None,
        help="where the images are: each record's path is matched against it (prefix stripped, or its "
        "longest tail found there) and records whose image is not found are skipped",
    )
    convert.add_argument(
        "--strip-prefix",
        type=text_arg,
        default=None,
        help="a prefix of the records' image paths to drop (the reference's data root)",
    )
    convert.add_argument(
        "--max-samples", type=positive_int, default=None, help="a seeded random subset of this many records"
    )
    convert.add_argument(
        "--seed", type=non_negative_int, default=SUBSET_SEED, help="the subset's seed (default: %(default)s)"
    )

    imp = sub.add_parser(
        "import-checkpoint", help="make an RPN folder from the reference implementation's released RPN checkpoint"
    )
    imp.add_argument(
        "src", type=path_arg, help="the reference's checkpoint folder (original LLaVA layout, config.json with twig_*)"
    )
    imp.add_argument(
        "--model", type=text_arg, required=True, help="the LLaVA model (HF format) it was trained on: folder or Hub id"
    )
    imp.add_argument("--out", type=path_arg, required=True, help="RPN folder to write (must not exist, or be empty)")
    imp.add_argument(
        "--preset",
        type=path_arg,
        default="auto",
        help="prompt template and RoI options to record: a preset name, a JSON file, or 'auto' (default: %(default)s)",
    )
    imp.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="--model's dtype (default: %(default)s)"
    )

    viz = sub.add_parser("viz-labels", help="draw the first samples of a label folder")
    viz.add_argument("labels", type=path_arg, help="label folder")
    viz.add_argument("--out", type=path_arg, required=True, help="PNG folder")
    viz.add_argument(
        "--num", type=positive_int, default=16, help="samples drawn, the first ones (default: %(default)s)"
    )
    viz.add_argument("--image-folder", type=path_arg, default=None, help="default: the one the labels record")
    return parser


def _run_train(args) -> dict:
    from .distributed import finish, from_environment
    from .llava.loading import load_llava
    from .rpn.dataset import check_label_folder
    from .rpn.train import RPNTrainer
    from .rpn.train_config import TrainConfig

    cfg = options_from_args(TrainConfig, args)  # the flags checked before the model's slow load
    options_from_args(RoiOptions, args)
    _check_files(image_folder=args.image_folder, out_folder=args.out)
    check_label_folder(cfg.labels, cfg.partial_labels)
    rank, world, device = from_environment(args.device)
    model, tokenizer = load_llava(args.model, "bf16" if args.bf16 else "fp32", device)
    roi_overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(RoiOptions)}
    trainer = RPNTrainer(cfg, model, tokenizer, rank=rank, world_size=world, device=device, roi_overrides=roi_overrides)
    result = trainer.run()
    finish(world)
    return result if rank == 0 else {}


def _run_infer(args) -> None:
    import torch

    from .distributed import MEET_AT_END_TIMEOUT, finish, from_environment
    from .infer.answers_file import answer_record
    from .infer.job import InferFileConfig, answer_file
    from .infer.pipeline import SDRPNLlava
    from .infer.viz import roi_overlay
    from .llava.inputs import check_preprocessable, is_text, question_text
    from .llava.loading import load_llava
    from .pictures import save_atomic
    from .rpn.model import RegionProposalNetwork

    # The flags and the image are checked before the model's slow load.
    single = args.image is not None or args.question is not None
    if single == (args.data is not None):
        raise ValueError("give either --image and --question, or --data (with --image-folder and --out)")
    if single and (args.image is None or args.question is None):
        raise ValueError("--image and --question go together")
    if single and not is_text(args.question):
        raise ValueError(f"--question must be valid UTF-8 text without NUL bytes, got {args.question!r}")
    if single and not question_text(args.question):
        raise ValueError(f"--question must hold text besides the image placeholder, got {args.question!r}")
    # A flag of the other mode would be ignored: what the user asked for would not happen.
    if single:
        data_flags = {"--out": args.out, "--image-folder": args.image_folder, "--limit": args.limit}
        other = [flag for flag, value in {**data_flags, "--restart": args.restart}.items() if value]
    else:
        other = ["--viz"] if args.viz else []
    if other:
        raise ValueError(f"{', '.join(other)}: only with {'--data' if single else '--image'}")
    if single:
        check_output_kind(args.viz, "--viz", folder=False)
    if not single:
        missing = [flag for flag, value in (("--image-folder", args.image_folder), ("--out", args.out)) if not value]
        if missing:
            raise ValueError(f"--data needs --image-folder and --out: {' and '.join(missing)} missing")
    options_from_args(RoiOptions, args)  # the RoI flags' values (they apply on the RPN folder's)
    if not single:
        _check_files(args.data, args.image_folder)
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a folder: it must be a JSONL file")
    image = _read_image(args.image) if single else None
    if single:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError("--image answers one question on one process: run it without torchrun")
        rank, world, device = 0, 1, args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    else:  # each rank answers every world_size-th entry; they meet to sum their counts (gloo)
        rank, world, device = from_environment(args.device, backend="gloo", timeout=MEET_AT_END_TIMEOUT)
    model, tokenizer = load_llava(args.model, args.dtype, device)
    rpn = RegionProposalNetwork.from_pretrained(args.rpn, model=model)  # a folder or a Hub id
    base = rpn.config.task_roi_options(args.task) if args.task else rpn.config.roi_options
    roi = options_from_args(RoiOptions, args, base=base)
    pipe = SDRPNLlava(
        model,
        tokenizer,
        rpn,
        roi=roi,
        preprocessing=args.preprocessing,
        prompt_template=args.prompt_template,
        decoder=args.decoder,
    )
    try:
        pipe.checked_max_new_tokens(args.max_new_tokens)  # the model's context bounds it
    except ValueError as err:
        raise ValueError(f"argument --max-new-tokens: {err}") from None
    if not single:
        cfg = InferFileConfig(
            args.data,
            args.image_folder,
            args.out,
            args.batch_size,
            args.max_new_tokens,
            args.limit,
            args.restart,
            args.workers,
            rank,
            world,
        )
        summary = answer_file(pipe, cfg)
        finish(world)
        if rank == 0:
            print(json.dumps(summary))
        return
    check_preprocessable(image, pipe.size, pipe.preprocessing, f"--image {args.image}")
    answer = pipe.generate([image], [args.question], args.max_new_tokens)[0]
    record = answer_record(answer)
    if args.viz:
        save_atomic(roi_overlay(image, answer.rois.prob.numpy(), answer.rois.boxes, pipe.preprocessing), args.viz)
        record["viz"] = args.viz
    if args.json:
        print(json.dumps(record))
    else:
        print(f"answer: {record['answer']}")
        print(f"boxes (pixels): {record['boxes'] or 'none (answered as the base model)'}")
        print("timing: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in record["timings_s"].items()))
        if args.viz:
            print(f"wrote {args.viz}")


def _check_files(data: str | None = None, image_folder: str | None = None, out_folder: str | None = None) -> None:
    """What a job reads and writes, checked before the model's slow load."""
    from .llava.data import check_data_file, check_image_folder

    if data is not None:
        check_data_file(data)
    if image_folder is not None:
        check_image_folder(image_folder)
    check_output_kind(out_folder, "--out", folder=True)


def check_output_kind(path: str | None, flag: str, folder: bool) -> None:
    """An output path of the wrong kind (a file for a folder, or the other way), named by its
    flag before the work that would write it."""
    if path is None or not os.path.exists(path) or os.path.isdir(path) == folder:
        return
    want, got = ("a folder", "a file") if folder else ("a file", "a folder")
    raise ValueError(f"{flag} {path} is {got}: it must be {want}")


def _read_image(path: str):
    """The --image as RGB, refused where it cannot be read (the --data jobs skip such an
    image); whether it is too large to preprocess waits for the preprocessing mode, which
    the RPN may choose."""
    from PIL import Image

    from .llava.inputs import load_rgb

    try:
        return load_rgb(path)
    except (OSError, Image.DecompressionBombError) as err:  # PIL's text alone names no file
        raise ValueError(f"--image {path}: cannot read it as an image ({err})") from None


def _run_label(args) -> dict:
    from .distributed import MEET_AT_END_TIMEOUT, barrier, finish, from_environment
    from .labels.folder import LabelFolder
    from .labels.job import LabelJob, LabelJobConfig
    from .labels.options import LabelOptions
    from .llava.loading import load_llava
    from .llava.presets import resolve_preset

    # Each rank labels every world_size-th sample into its own shards; ranks only meet at a
    # barrier before the summary, which gloo serves on any device.
    options = options_from_args(LabelOptions, args)  # the flags checked before the model's slow load
    _check_files(args.data, args.image_folder, args.out)
    rank, world, device = from_environment(args.device, backend="gloo", timeout=MEET_AT_END_TIMEOUT)
    model, tokenizer = load_llava(args.model, args.dtype, device)
    preset = resolve_preset(args.preset, model)
    cfg = LabelJobConfig(
        data=args.data,
        image_folder=args.image_folder,
        out=args.out,
        options=options,
        batch_size=args.batch_size,
        limit=args.limit,
        shard_size=args.shard_size,
        workers=args.workers,
        rank=rank,
        world_size=world,
    )
    LabelJob(cfg, model, tokenizer, preset).run()
    barrier(world)
    summary = LabelFolder(args.out).write_summary() if rank == 0 else {}
    finish(world)
    return summary


def _run_import(args) -> dict:
    from .llava.loading import load_llava
    from .rpn.import_reference import import_reference_checkpoint

    # The target model only lends its configuration and a weight fingerprint; the RPN's
    # weights all come from the checkpoint, in its own dtype.
    model, _ = load_llava(args.model, args.dtype, "cpu")
    return import_reference_checkpoint(args.src, model, args.out, args.preset)


def _version() -> str:
    import torch

    from . import build_info

    info = build_info()
    cuda = f"CUDA kernels for {info['cuda_archs']}" if info["with_cuda"] else "CPU kernels only"
    return f"sdrpn {info['version']} (torch {torch.__version__}, {cuda})"


# What a user's mistake or the machine raises (a bad flag value, a missing file, a model that
# does not fit, a busy output folder, a full disk, which safetensors reports as its own error,
# another torchrun rank that stopped on one of these): one line and exit status 2 rather
# than a traceback.
USER_ERRORS = (ValueError, OSError, FolderBusy, NotImplementedError, SafetensorError, RankStopped)

# What the commands need beyond the ops: the `llava` extra, which `pip install .` alone leaves out.
LLAVA_EXTRA = ("transformers", "accelerate", "tokenizers", "huggingface_hub")


# What an interrupted command has kept, and how to go on.
RESUME_HINTS = {
    "label": "every shard finished so far is kept: rerun the same command to go on",
    "infer": "with --data, the answers written so far are kept: rerun the same command to go on",
    "train": "the checkpoints are kept: rerun with --resume to go on from the last one",
    "train-base": "the checkpoints are kept: rerun with --resume to go on from the last one",
    "run": "the finished stages are kept in --out: rerun the same command to go on",
}


def run_command(main: Callable[[list[str]], int], prog: str, argv: list[str] | None = None) -> int:
    """main(argv) with user mistakes reported as one line on stderr and exit status 2, and
    Ctrl-C as one line saying what was kept (status 130); --debug (anywhere on the line)
    shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    words = [a for a in argv if not a.startswith("-")][:1]
    command = " ".join([prog] + words)
    try:
        return main([a for a in argv if a != "--debug"])
    except USER_ERRORS as err:
        if debug:
            raise
        _say(f"{command}: error: {err} (--debug shows the traceback)")
        return 2
    except ModuleNotFoundError as err:
        if debug or (err.name or "").split(".")[0] not in LLAVA_EXTRA:
            raise
        _say(
            f"{command}: error: this command needs the llava extra ({err.name} is missing): "
            "pip install --no-build-isolation '.[llava]' in sdrpn's source folder (the ops alone need torch only)"
        )
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        hint = RESUME_HINTS.get(words[0] if words else "")
        _say(f"{command}: interrupted" + (f"; {hint}" if hint else ""))
        return 130


def _say(line: str) -> None:
    """One line on stderr in one write: torchrun's ranks share the stream, and print's two
    writes (the text, then its newline) of ranks stopping at once interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def entry(argv: list[str] | None = None) -> int:
    """The `sdrpn` command (see run_command)."""
    return run_command(main, "sdrpn", argv)


def configure_logging() -> None:
    """sdrpn's INFO and up, and other libraries' warnings, on stderr as "LEVEL name:
    message", each record once. Other libraries' INFO lines stay out: they say nothing
    about the job (numexpr's thread count on every command, through transformers' pandas
    import). huggingface_hub gives its loggers a stderr handler of their own on import, and
    they also reach the root's, so each of its warnings (a Hub retry, say) came twice. With
    stderr not a terminal, the libraries' progress bars are off."""
    if not logging.getLogger().handlers:  # an application (or pytest) that set up logging keeps its own
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("sdrpn").setLevel(logging.INFO)
    try:
        import huggingface_hub.utils.logging  # noqa: F401  (adds that handler: 0.07 s)
    except ImportError:  # without the llava extra nothing reaches the Hub
        return
    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        hub.removeHandler(handler)
    if not sys.stderr.isatty():  # a log file: the libraries' bars (downloads, "Loading weights") would be
        # lines of carriage returns; sdrpn's own bars log plain lines there instead
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # transformers reads this when it is imported
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    if args.command == "label-demo":
        from .labels.demo import LabelDemoConfig, run_label_demo, summary_line

        _check_files(out_folder=args.out)
        cfg = LabelDemoConfig(
            out=args.out, batch=args.batch, grid_h=args.grid[0], grid_w=args.grid[1], seed=args.seed, device=args.device
        )
        print(summary_line(run_label_demo(cfg)))
    elif args.command == "label":
        summary = _run_label(args)
        if summary:
            print(json.dumps(summary))
    elif args.command == "train":
        result = _run_train(args)
        if result:
            print(json.dumps(result))
    elif args.command == "infer":
        _run_infer(args)
    elif args.command == "convert-labels":
        from .labels.convert import convert_reference_pickle

        summary = convert_reference_pickle(
            args.pickle,
            args.out,
            args.grid,
            image_folder=args.image_folder,
            strip_prefix=args.strip_prefix,
            max_samples=args.max_samples,
            seed=args.seed,
        )
        print(json.dumps(summary))
    elif args.command == "import-checkpoint":
        print(json.dumps(_run_import(args)))
    elif args.command == "viz-labels":
        from .labels.viz import visualise_labels

        _check_files(out_folder=args.out)
        paths = visualise_labels(args.labels, args.out, args.num, args.image_folder)
        print(f"wrote {len(paths)} pictures to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(entry())
