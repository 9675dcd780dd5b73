"""The command line: ``swav-ref COMMAND [options]`` (or ``python -m swav_ref``).

Commands
--------
dessert   the optimal-transport dessert example: prints the plan, writes figures.

Each command's options are documented by ``swav-ref COMMAND --help``, with defaults.
"""

from __future__ import annotations

import argparse
import sys


def _add_dessert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dessert",
        help="optimal transport on the dessert example (Sinkhorn vs exact)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--lam", type=float, default=10.0, help="entropic regularisation strength lambda")
    p.add_argument("--out", default="dessert_out", help="folder for the figures")
    p.set_defaults(func=_run_dessert)


def _run_dessert(args: argparse.Namespace) -> int:
    from swav_ref.ot.desserts import run_dessert_example

    run_dessert_example(lam=args.lam, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swav-ref",
        description="SwAV from first principles: optimal transport, training and evaluation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_dessert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
