"""Entry point of `pdctl`.

Every module named in COMMAND_MODULES exposes `register(subparsers)`, which adds its commands
and sets `func` on them; `func(args)` returns the process exit code. Keeping each command group in
its own module lets them grow independently. `pdctl dev ...` comes from the development tooling
(pd_dev), loaded by name when it is installed: the product never imports it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..devtools import dev_module

COMMAND_MODULES = (
    "pd_operator.cli.validate_cmds",  # check, crd, explain, model-info
    "pd_operator.cli.operator_cmds",  # operator run
    "pd_operator.cli.run_cmds",  # run (a PDDeployment on this machine)
)
DEV_COMMAND_MODULE = "cli"  # pd_dev.cli: dev cluster build|up|down|status|kubeconfig, generate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdctl",
        description="Validate, inspect and run disaggregated prefill/decode (P/D) deployments.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    dev_commands = dev_module(DEV_COMMAND_MODULE)
    if dev_commands is not None:
        dev_commands.register(sub)
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
    except BrokenPipeError:
        # the reader went away (`pdctl check ... | head`): say so once, and keep the
        # interpreter's final flush of stdout from raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("error: output closed before it was all written", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a last resort: one line, not a traceback
        if os.environ.get("PDCTL_TRACEBACK"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (PDCTL_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
