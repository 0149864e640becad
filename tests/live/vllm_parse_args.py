"""Run inside a vLLM environment (not the project's): parse rendered `vllm serve` argument
lists with that vLLM's own parser, without loading any model.

Usage: python vllm_parse_args.py OUT.json < JOBS.json, with JOBS [{"name": ..., "args": [...],
"env": {...}}] and OUT [{"name", "ok", "error", "kv_transfer_config", "version"}].
Per job: `make_arg_parser` (what `vllm serve` builds), then `validate_parsed_serve_args`, then
`AsyncEngineArgs.from_cli_args` (which turns the JSON-valued flags such as --kv-transfer-config
into vLLM's config objects), and the VLLM_* environment the operator renders read through
vllm.envs (which checks choices where vLLM declares them).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys


def _imports():
    import importlib

    # where `vllm serve`'s parser lives, newest first (it moved in 0.32 and again in 0.33)
    for module in ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args",
                   "vllm.entrypoints.openai.cli_args"):
        try:
            cli_args = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(cli_args, "make_arg_parser"):
            break
    else:
        raise ImportError("no vllm.entrypoints.*.cli_args with make_arg_parser")
    make_arg_parser, validate_parsed_serve_args = (cli_args.make_arg_parser,
                                                   cli_args.validate_parsed_serve_args)
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser  # type: ignore[no-redef]
    from vllm.engine.arg_utils import AsyncEngineArgs

    return make_arg_parser, validate_parsed_serve_args, FlexibleArgumentParser, AsyncEngineArgs


def parse_one(job: dict, tools) -> dict:
    import vllm
    import vllm.envs as envs

    make_arg_parser, validate, Parser, EngineArgs = tools
    out = {"name": job["name"], "ok": False, "error": "", "version": vllm.__version__}
    err = io.StringIO()
    saved = dict(os.environ)
    try:
        os.environ.update(job.get("env", {}))
        with contextlib.redirect_stderr(err):
            parser = make_arg_parser(Parser(description="vLLM OpenAI-Compatible RESTful API"))
            args = parser.parse_args(job["args"])
            validate(args)
            engine_args = EngineArgs.from_cli_args(args)
        for name in job.get("env", {}):
            if name in envs.environment_variables:
                envs.environment_variables[name]()  # raises on a value outside its choices
        out["kv_transfer_config"] = str(engine_args.kv_transfer_config)
        out["ok"] = True
    except SystemExit as exc:  # argparse: the message went to stderr
        out["error"] = f"exit {exc.code}: {err.getvalue().strip()[-1500:]}"
    except Exception as exc:  # noqa: BLE001 - any refusal is the answer
        out["error"] = f"{type(exc).__name__}: {exc}"[-1500:]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return out


def main() -> int:
    jobs = json.load(sys.stdin)
    tools = _imports()
    results = [parse_one(j, tools) for j in jobs]
    with open(sys.argv[1], "w") as fh:  # a file: some vLLM versions log to stdout
        json.dump(results, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
