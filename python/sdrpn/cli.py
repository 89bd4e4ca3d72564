"""The ``sdrpn`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from .label_demo import LabelDemoConfig, run_label_demo, summary_line


def _grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid must look like 24x24, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--grid must be at least 1x1, got {text!r}")
    return h, w


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdrpn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("label-demo", help="label synthetic attention maps and draw them")
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.add_argument("--batch", type=_positive, default=12, help="number of maps")
    demo.add_argument("--grid", type=_grid, default=(24, 24), help="grid as HxW")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "label-demo":
        cfg = LabelDemoConfig(out=args.out, batch=args.batch, grid_h=args.grid[0],
                              grid_w=args.grid[1], seed=args.seed, device=args.device)
        print(summary_line(run_label_demo(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
