"""`pdctl run FILE`: run a PDDeployment on this machine (pd_operator.localrun)."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import yaml


def register(sub) -> None:
    run = sub.add_parser(
        "run", help="run a PDDeployment locally: its P and D replicas and the router",
        description="Start every prefill and decode replica of a PDDeployment (engine.type: "
        "builtin or vllm) as local process groups, from exactly the commands and environment the "
        "operator renders, with vllm-router in P/D mode in front. Ctrl-C or SIGTERM stops "
        "everything. vLLM on --device cpu runs in the live vLLM environment, installed on first "
        "use (docs/live-vllm.md).")
    run.add_argument("file", metavar="FILE", help="PDDeployment YAML (one document, or --name)")
    run.add_argument("--name", help="the PDDeployment to run when FILE holds several")
    run.add_argument("--model-dir", action="append", default=[], metavar="NAME=PATH",
                     help="map spec.model.name NAME to a local checkpoint (dir or .gguf); "
                     "PATH alone maps every model (repeatable)")
    run.add_argument("--port", type=int, default=8000, help="the router's port (default 8000)")
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    run.add_argument("--workdir", help="logs, mounts and run.json (default: a new temp dir)")
    run.add_argument("--startup-timeout", type=float, default=600.0, metavar="SECONDS")
    run.set_defaults(func=run_local)


class _Stop(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signum)


def _model_dirs(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.rpartition("=")
        out[name if sep else "*"] = path
    return out


def _document(path: str, name: str | None) -> dict:
    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if isinstance(d, dict)]
    if name:
        docs = [d for d in docs if d.get("metadata", {}).get("name") == name]
    if len(docs) != 1:
        raise ValueError(f"{path}: expected one PDDeployment{f' named {name}' if name else ''}"
                         f", found {len(docs)} (use --name)")
    return docs[0]


def run_local(args: argparse.Namespace) -> int:
    from ..localrun import LocalRun, RunError, plan_run
    from ..validate import SpecError

    def say(msg: str) -> None:
        print(msg, flush=True)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pdctl-run-"))
    try:
        plan = plan_run(_document(args.file, args.name), model_dirs=_model_dirs(args.model_dir),
                        router_port=args.port, workdir=workdir, device=args.device)
    except SpecError as exc:
        for where, msg in exc.problems:
            print(f"error: {where}: {msg}", file=sys.stderr)
        return 2
    except (RunError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    run = LocalRun(plan, say)
    code = 0
    try:
        run.start(args.startup_timeout)
        say(f"router: {plan.url}   (OpenAI API: {plan.url}/v1)")
        for e in plan.engines:
            say(f"  {e.name}: {e.url}  side channel {e.side_channel_port}")
        say(f"state: {workdir / 'run.json'}")
        say("Ctrl-C to stop")
        while True:
            for event in run.check_exits():
                say(f"warning: {event}; see {workdir / 'logs'}")
            time.sleep(0.5)
    except _Stop as stop:
        code = 0 if stop.signum == signal.SIGTERM else 130
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    finally:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        say("stopping")
        run.stop()
        for s, h in old.items():
            signal.signal(s, h)
        say("stopped")
    return code
