"""`pd-runtime serve`: the arguments the operator renders (render/engine.py builtin_command),
the local-profile flags, preflight, then the HTTP server over the engine.

Rendered (every flag below is required by the operator's contract; a test parses the rendered
command of every builtin example with this parser):
    --role --model --family --dtype --num-kv-heads --head-size --num-layers
    --tensor-parallel-size --pipeline-parallel-size --data-parallel-size --block-size
    --kv-cache-dtype --kv-cache-layout --connector --backends --buffer-device --port
    --side-channel-port --config
Local profile and tuning (never rendered): --role aggregated, --host, --model-dir, --device,
--side-channel-host, --side-channel-token-file, --num-blocks, --kv-cache-memory, --max-model-len,
--kv-lease-seconds, --gil-switch-interval-us, --log-level.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import preflight as pf

ROLES = ("prefill", "decode", "aggregated")
LAYOUTS = ("HND", "NHD")
MODEL_DIR_ENV = "PD_RUNTIME_MODEL_DIR"
SHUTDOWN_TIMEOUT_S = 20.0
# Python's 5 ms switch interval made a pull wait up to 5 ms per GIL hand-over behind a thread
# running pure Python; 500 us cut such pulls 1.7-1.9x on a 2-core CPU (docs/performance.md)
GIL_SWITCH_US = 500
log = logging.getLogger("pd_runtime.serve")


def _bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB, 1000000)")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    return int(float(m.group(1)) * scale)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _port(text: str) -> int:
    v = _positive(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("rendered by the operator (render/engine.py)")
    r.add_argument("--role", required=True, choices=ROLES)
    r.add_argument("--model", required=True, help="spec.model.name: the served model name")
    r.add_argument("--family", required=True, help="spec.model.family")
    r.add_argument("--dtype", required=True, choices=["bfloat16", "float16", "float32"])
    r.add_argument("--num-kv-heads", type=_positive, required=True)
    r.add_argument("--head-size", type=_positive, required=True)
    r.add_argument("--num-layers", type=_positive, required=True)
    r.add_argument("--tensor-parallel-size", type=_positive, default=1)
    r.add_argument("--pipeline-parallel-size", type=_positive, default=1)
    r.add_argument("--data-parallel-size", type=_positive, default=1)
    r.add_argument("--block-size", type=_positive, default=16)
    r.add_argument("--kv-cache-dtype", default="auto",
                   choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"])
    r.add_argument("--kv-cache-layout", default="HND", choices=LAYOUTS)
    r.add_argument("--connector", default="NixlConnector",
                   choices=["NixlConnector", "NixlPushConnector"])
    r.add_argument("--backends", default="UCX", help="comma-separated NIXL backends")
    r.add_argument("--buffer-device", default="cuda", choices=["cuda", "cpu"])
    r.add_argument("--port", type=_port, default=8000)
    r.add_argument("--side-channel-port", type=_port, default=5600)
    r.add_argument("--config", default=None,
                   help="the pool's rendered document (ConfigMap prefill.json / decode.json)")
    loc = p.add_argument_group("local profile and tuning")
    loc.add_argument("--host", default="0.0.0.0")
    loc.add_argument("--model-dir", default=None,
                     help=f"local checkpoint (dir or .gguf) for --model (or ${MODEL_DIR_ENV})")
    loc.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    loc.add_argument("--side-channel-host", default=None,
                     help="address advertised to peers (default $VLLM_NIXL_SIDE_CHANNEL_HOST)")
    loc.add_argument("--side-channel-token-file", default=None,
                     help=f"default ${pf.TOKEN_FILE_ENV}, ${pf.TOKEN_ENV}, "
                          f"{pf.DEFAULT_TOKEN_FILE}")
    loc.add_argument("--num-blocks", type=_positive, default=None,
                     help="KV blocks per rank (default: from --kv-cache-memory)")
    loc.add_argument("--kv-cache-memory", type=_bytes, default=None,
                     help="KV cache bytes per rank, e.g. 2GiB")
    loc.add_argument("--max-model-len", type=_positive, default=None)
    loc.add_argument("--kv-lease-seconds", type=_seconds, default=None,
                     help="how long a prefill server holds a request's KV for its decode "
                          "server (default: the engine's); set it with spec.prefill.args")
    loc.add_argument("--gil-switch-interval-us", type=_positive, default=GIL_SWITCH_US,
                     help="the longest a Python thread keeps the GIL while another waits for "
                          f"it (default {GIL_SWITCH_US}; Python's own is 5000): the transfer "
                          "threads (P's side channel, D's pulls) wait at most this long behind "
                          "a Python-busy engine or HTTP thread (bench/transfer/bench_gil.py)")
    loc.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-runtime serve",
                                description="Serve a model over the OpenAI API as a prefill, "
                                            "decode or aggregated server.")
    add_arguments(p)
    return p


# ----------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class Resolved:
    checkpoint: str
    device: str
    token_file: str | None
    side_channel_host: str


def declared(a: argparse.Namespace) -> pf.Declared:
    return pf.Declared(family=a.family, dtype=a.dtype, num_kv_heads=a.num_kv_heads,
                       head_size=a.head_size, num_layers=a.num_layers,
                       tp=a.tensor_parallel_size, pp=a.pipeline_parallel_size,
                       dp=a.data_parallel_size)


def checkpoint_path(a: argparse.Namespace) -> tuple[str | None, list[str]]:
    for src, path in (("--model-dir", a.model_dir), (f"${MODEL_DIR_ENV}",
                                                      os.environ.get(MODEL_DIR_ENV))):
        if path:
            if Path(path).exists():
                return path, []
            return None, [f"{src} {path}: no such file or directory"]
    if Path(a.model).exists():
        return a.model, []
    bundled = bundled_model_path(a.model)
    if bundled:
        return bundled, []
    from ..compat import BUNDLED_MODELS

    if a.model in BUNDLED_MODELS:
        from ..engine.gguf import SMOLLM2_INSTALL

        return None, [f"spec.model.name {a.model} is bundled with the runtime image, but its "
                      f"package is not installed here: `{SMOLLM2_INSTALL}`, or pass --model-dir"]
    return None, [f"spec.model.name (--model {a.model}) is not a local checkpoint; mount it "
                  f"and pass --model-dir (or ${MODEL_DIR_ENV}); the runtime never downloads"]


def bundled_model_path(model: str) -> str | None:
    """The checkpoint of a model the image bundles (compat.BUNDLED_MODELS) when its package is
    installed, else None."""
    from ..compat import BUNDLED_MODELS
    from ..engine.gguf import SMOLLM2_PACKAGE, GGUFError, smollm2_path

    if BUNDLED_MODELS.get(model) != SMOLLM2_PACKAGE:
        return None
    try:
        return smollm2_path()
    except GGUFError:
        return None
    from ..engine.gguf import GGUFError, smollm2_path

    try:
        return smollm2_path()
    except GGUFError:
        return None


def read_model_config(path: str) -> Any:
    """The checkpoint's ModelConfig without loading its weights."""
    import json

    from ..engine.config import ModelConfig

    p = Path(path)
    if p.suffix == ".gguf":
        from ..engine.gguf import hf_config
        from ..engine.gguf_file import read_gguf

        file = read_gguf(str(p))  # memory-mapped: metadata and tensor headers, no dequantizing
        tied = "output.weight" not in {t.name for t in file.tensors}
        return ModelConfig.from_hf(hf_config(file.metadata, tied))
    with open(p / "config.json", encoding="utf-8") as fh:
        return ModelConfig.from_hf(json.load(fh))


def _device(requested: str) -> tuple[str, int]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "auto":
        return ("cuda" if n else "cpu"), n
    return requested, n


def run_preflight(a: argparse.Namespace) -> Resolved:
    """Every check; raises PreflightError with all problems at once."""
    problems: list[str] = []
    d = declared(a)
    if a.role == "aggregated" and a.config:
        problems.append("--config is the rendered pool document of a prefill or decode pool; "
                        "--role aggregated takes none")
    elif a.config:
        doc, errs = pf.read_pool_document(a.config)
        problems += errs
        if doc is not None:
            problems += pf.check_pool_document(doc, a.role, d)
    ckpt, errs = checkpoint_path(a)
    problems += errs
    if ckpt is not None:
        try:
            cfg = read_model_config(ckpt)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is one named problem
            problems.append(f"checkpoint {ckpt}: {exc}")
        else:
            problems += pf.check_model(d, cfg, source=ckpt, is_gguf=ckpt.endswith(".gguf"))
    device, count = _device(a.device)
    if a.device == "cuda" and count == 0:
        problems.append("--device cuda but no CUDA device is visible")
    problems += pf.check_devices(d, device, count)
    token_problems, token_file = pf.check_token(a.role, a.side_channel_token_file)
    problems += token_problems
    if problems:
        raise pf.PreflightError(problems)
    assert ckpt is not None
    host = (a.side_channel_host or os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST")
            or "127.0.0.1")
    return Resolved(checkpoint=ckpt, device=device, token_file=token_file,
                    side_channel_host=host)


def engine_kwargs(a: argparse.Namespace, r: Resolved) -> dict[str, Any]:
    """EngineArgs fields (ENGINE_PLAN.md, Changes: SERVE)."""
    return {
        "role": a.role, "model": r.checkpoint, "served_model_name": a.model,
        "family": a.family, "dtype": a.dtype, "tensor_parallel_size": a.tensor_parallel_size,
        "block_size": a.block_size, "kv_cache_dtype": a.kv_cache_dtype,
        "kv_cache_layout": a.kv_cache_layout, "connector": a.connector,
        "backends": [b for b in a.backends.split(",") if b], "buffer_device": a.buffer_device,
        "side_channel_host": r.side_channel_host, "side_channel_port": a.side_channel_port,
        "token_file": r.token_file, "device": r.device, "num_blocks": a.num_blocks,
        "kv_cache_memory": a.kv_cache_memory, "max_model_len": a.max_model_len,
        **({"lease_s": a.kv_lease_seconds} if a.kv_lease_seconds else {}),
    }


# ----------------------------------------------------------------------- serving
async def serve(a: argparse.Namespace, r: Resolved) -> int:
    from aiohttp import web

    from ..engine.async_engine import AsyncEngine, EngineArgs
    from ..engine.sampling import SamplingParams
    from .app import ServerState, make_app

    state = ServerState(role=a.role, served_model_name=a.model, make_params=SamplingParams)
    runner = web.AppRunner(make_app(state), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, a.host, a.port).start()
    log.info("listening on http://%s:%d (/health says loading); loading %s as %s on %s",
             a.host, a.port, r.checkpoint, a.role, r.device)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    start = asyncio.ensure_future(AsyncEngine.start(EngineArgs(**engine_kwargs(a, r))))
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not start.done():
        start.cancel()
        await runner.cleanup()
        return 0
    waiter.cancel()
    try:
        engine = start.result()
    except Exception as exc:  # noqa: BLE001 - a named failure, not a traceback
        log.error("engine failed to start: %s: %s", type(exc).__name__, exc)
        await runner.cleanup()
        return 1
    state.engine = engine
    log.info("ready: %s serving %s on http://%s:%d", a.role, a.model, a.host, a.port)
    await stop.wait()
    log.info("stopping")
    try:
        await asyncio.wait_for(runner.cleanup(), SHUTDOWN_TIMEOUT_S / 2)
    except TimeoutError:
        log.warning("HTTP server did not stop in time")
    try:
        await asyncio.wait_for(engine.shutdown(), SHUTDOWN_TIMEOUT_S / 2)
    except TimeoutError:
        log.warning("engine did not stop in time")
    return 0


def main(a: argparse.Namespace) -> int:
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import prometheus_client

    prometheus_client.disable_created_metrics()  # no *_created series: counters say enough
    sys.setswitchinterval(a.gil_switch_interval_us / 1e6)
    try:
        resolved = run_preflight(a)
    except pf.PreflightError as exc:
        print("pd-runtime serve: preflight failed:", file=sys.stderr)
        for p in exc.problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    return asyncio.run(serve(a, resolved))
