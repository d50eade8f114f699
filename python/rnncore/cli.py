"""The `rnncore` command line: info (and, as they land, train, sample, bench)."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    from . import info
    for k, v in info().items():
        print(f"{k:14s} {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnncore", description="Fast RNN, LSTM and GRU for the CPU.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("info", help="version, SIMD level in use, threads, BLAS, CUDA")
    s.set_defaults(func=_cmd_info)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
