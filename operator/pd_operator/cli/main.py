"""Entry point of `pdctl`.

Every module named in COMMAND_MODULES exposes `register(subparsers)`, which adds its commands
and sets `func` on them; `func(args)` returns the process exit code. Keeping each command group in
its own module lets them grow independently.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "pd_operator.cli.validate_cmds",  # check, crd, explain, model-info
    "pd_operator.cli.dev_cmds",  # dev cluster up|down|status|kubeconfig
    "pd_operator.cli.operator_cmds",  # operator run
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdctl",
        description="Validate, inspect and run disaggregated prefill/decode (P/D) deployments.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
