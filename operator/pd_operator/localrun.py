"""`pdctl run`: a PDDeployment on this machine, from exactly what the operator renders.

    plan = plan_run(doc, model_dirs={"org/model": "/ckpt"}, router_port=8000, workdir=Path(...))
    with LocalRun(plan) as run:      # starts every replica, waits for /health, then the router
        run.wait()                   # until SIGTERM / Ctrl-C; everything is stopped on exit

The pods' command, arguments and environment come from render.render() unchanged except for
the local profile (docs/runtime.md, "Running a PDDeployment locally"):
- every replica gets its own HTTP port and side-channel port block: the values of `--port` and
  `--side-channel-port` and the env VLLM_NIXL_SIDE_CHANNEL_HOST / _PORT are remapped;
- appended flags: `--host 127.0.0.1 --device DEVICE --model-dir PATH` (spec.model.name -> a local
  checkpoint, as a pod would mount it);
- the pod's volumes (the ConfigMap, the side-channel token Secret) are written under a per-replica
  directory and PD_RUNTIME_MOUNT_ROOT points at it, so `--config /etc/pd-operator/prefill.json`
  and the token path resolve there;
- the router keeps its rendered flags except Kubernetes discovery, replaced by static
  `--prefill URL` / `--decode URL` for the local replicas, and host/ports mapped to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pd_runtime.compat import BUNDLED_MODELS

from .render import Owner, render
from .render import engine as render_engine
from .validate import parse_object, validate_spec

LOCALHOST = "127.0.0.1"
MOUNT_ROOT_ENV = "PD_RUNTIME_MOUNT_ROOT"
TOKEN_SECRET_SUFFIX = "side-channel-token"
# Router flags that exist for Kubernetes discovery, with how many values each takes (-1: all up
# to the next flag). Replaced by static URLs locally.
DISCOVERY_FLAGS = {"--service-discovery": 0, "--prefill-selector": -1, "--decode-selector": -1,
                   "--service-discovery-namespace": 1, "--service-discovery-port": 1,
                   "--selector": -1}
STOP_TIMEOUT_S = 15.0
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ \w+ [\w.]+: (.*)$")


class RunError(Exception):
    """A deployment that cannot run locally; the message names the field and the fix."""


@dataclass
class Proc:
    """One local process group: a P or D replica, or the router."""

    name: str  # prefill-0, decode-1, router
    role: str
    argv: list[str]
    env: dict[str, str]  # what the pod sets (added to this machine's environment)
    files: dict[str, str] = field(default_factory=dict)  # mount-root-relative path -> content
    port: int = 0
    side_channel_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"


@dataclass
class Plan:
    name: str
    engines: list[Proc]
    router: Proc
    router_metrics_port: int
    workdir: Path

    @property
    def url(self) -> str:
        return self.router.url


# ----------------------------------------------------------------------- planning (pure-ish)
def free_ports(count: int, start: int = 20000, stop: int = 60000) -> int:
    """The first of `count` consecutive ports nobody listens on (a TP pool's side channel needs
    base + rank for every rank), outside the kernel's ephemeral range: a port is picked here
    well before its process binds it (the router binds its port after the engines are ready,
    a minute or more later), and a port in the ephemeral range can meanwhile become the local
    end of any outgoing connection or bind(0) on the machine ("Address already in use")."""
    rng = secrets.SystemRandom()
    lo, hi = ephemeral_ports()
    bases = [b for b in range(start, stop - count) if b + count <= lo or b > hi]
    for _ in range(200):
        base = rng.choice(bases) if bases else rng.randrange(start, stop - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RunError(f"no {count} consecutive free ports between {start} and {stop}")


def ephemeral_ports() -> tuple[int, int]:
    """The first and last port the kernel hands out for outgoing connections and bind(0)
    (net.ipv4.ip_local_port_range; Linux's default when it cannot be read)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag`'s value replaced (the flag must be there: it is the rendered contract)."""
    if flag not in argv:
        raise RunError(f"the rendered command has no {flag}: {' '.join(argv)}")
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def _drop_discovery(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in DISCOVERY_FLAGS:
            n = DISCOVERY_FLAGS[arg]
            i += 1
            if n < 0:
                while i < len(argv) and not argv[i].startswith("--"):
                    i += 1
            else:
                i += n
            continue
        out.append(arg)
        i += 1
    return out


def executable(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        extra = " (pip install 'pd-operator[router]')" if name == "vllm-router" else ""
        raise RunError(f"{name} not found next to {sys.executable} nor on PATH{extra}")
    return found


def _children(kind: str, children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: c for c in children if c["kind"] == kind}


def _env(container: dict[str, Any], configmaps: dict[str, dict[str, Any]], side_port: int,
         where: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in container.get("env", []):
        name = e["name"]
        if "value" in e:
            env[name] = str(e["value"])
            continue
        src = e.get("valueFrom", {})
        if src.get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[name] = LOCALHOST
        elif "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            env[name] = configmaps[ref["name"]]["data"][ref["key"]]
        else:
            raise RunError(f"{where}: env {name} comes from {sorted(src)}, which a local run "
                           "cannot provide; set it with a value in spec.<pool>.template.env")
    env[render_engine.SIDE_CHANNEL_PORT_ENV] = str(side_port)
    return env


def _files(pod: dict[str, Any], container: dict[str, Any],
           configmaps: dict[str, dict[str, Any]], secrets_: dict[str, dict[str, Any]],
           token: str, where: str) -> dict[str, str]:
    """The pod's volumes as files under the mount root: ConfigMaps with their data, the
    side-channel token Secret with this run's token."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        vol = volumes[mount["name"]]
        base = mount["mountPath"].lstrip("/")
        if "configMap" in vol:
            data = configmaps[vol["configMap"]["name"]]["data"]
        elif "secret" in vol:
            name = vol["secret"]["secretName"]
            if name.endswith(TOKEN_SECRET_SUFFIX):
                data = {"token": token}
            elif name in secrets_:
                data = dict(secrets_[name].get("stringData", {}))
            else:
                raise RunError(f"{where}: volume {mount['name']} needs Secret {name}, which a "
                               "local run does not have")
        else:
            raise RunError(f"{where}: volume {mount['name']} ({sorted(vol)}) is not supported "
                           "locally")
        items = vol.get("configMap", vol.get("secret", {})).get("items")
        paths = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
        for key, rel in paths.items():
            files[f"{base}/{rel}"] = data[key]
    if not any(f.endswith("pd-runtime/token") for f in files):
        # Until the operator renders the Secret, the token sits where it will be mounted.
        files["var/run/secrets/pd-runtime/token"] = token
    return files


def _model_dir(name: str, model_dirs: dict[str, str], field_path: str) -> str | None:
    """The checkpoint to pass as --model-dir; None for a model the runtime bundles."""
    path = model_dirs.get(name) or model_dirs.get("*")
    if not path and name in BUNDLED_MODELS:
        return None  # the runtime finds it, or its preflight says which package to install
    if not path:
        raise RunError(f"{field_path} is {name!r}: map it to a local checkpoint with "
                       f"--model-dir {name}=PATH")
    if not Path(path).exists():
        raise RunError(f"--model-dir {name}={path}: no such file or directory")
    return str(Path(path).resolve())


def plan_run(doc: dict[str, Any], *, model_dirs: dict[str, str], router_port: int,
             workdir: Path, device: str = "cpu",
             ports: Callable[[int], int] = free_ports) -> Plan:
    """What to start for `doc` (a PDDeployment as read from YAML)."""
    pdd = parse_object(doc)
    name = str(pdd.metadata.get("name") or "pdd")
    owner = Owner(name=name, namespace=str(pdd.metadata.get("namespace") or "default"),
                  uid="local")
    rendered = render(owner, validate_spec(pdd.spec))
    if not rendered.decision.accepted:
        rules = [f"{v.rule} [{', '.join(v.fields)}]: {v.message}"
                 for v in rendered.decision.verdicts if v.severity == "reject"]
        raise RunError("the admission rules reject this deployment:\n  " + "\n  ".join(rules))
    statefulsets = _children("StatefulSet", rendered.children)
    configmaps = _children("ConfigMap", rendered.children)
    secrets_ = _children("Secret", rendered.children)
    token = secrets.token_hex(32)
    engines: list[Proc] = []
    urls: dict[str, list[str]] = {"prefill": [], "decode": []}
    for pool in (rendered.prefill, rendered.decode):
        sts = statefulsets[f"{name}-{pool.role}"]
        if pool.engine_type == "vllm":  # the rendered `vllm serve` (localrun_vllm)
            from . import localrun_vllm

            procs = localrun_vllm.replicas(pool, sts, configmaps, secrets_, token, model_dirs,
                                           device, ports)
            engines += procs
            urls[pool.role] += [p.url for p in procs]
            continue
        if pool.engine_type != "builtin":
            raise RunError(f"spec.{pool.role}.engine.type is {pool.engine_type!r}: pdctl run "
                           "starts engine.type builtin and vllm pools")
        pod = sts["spec"]["template"]["spec"]
        container = pod["containers"][0]
        ckpt = _model_dir(pool.model_name, model_dirs,
                          pool.origin.get("model_name", "spec.model.name"))
        for i in range(sts["spec"]["replicas"]):
            rname = f"{pool.role}-{i}"
            port, side = ports(1), ports(pool.tp * pool.dp)
            argv = list(container["command"])
            if argv[:2] != ["pd-runtime", "serve"]:
                raise RunError(f"{rname}: expected a pd-runtime serve command, got {argv[:2]}")
            argv = _set_flag(argv, "--port", str(port))
            argv = _set_flag(argv, "--side-channel-port", str(side))
            argv = [sys.executable, "-m", "pd_runtime.cli", *argv[1:],
                    "--host", LOCALHOST, "--device", device,
                    *(["--model-dir", ckpt] if ckpt else [])]
            engines.append(Proc(
                name=rname, role=pool.role, argv=argv,
                env=_env(container, configmaps, side, rname),
                files=_files(pod, container, configmaps, secrets_, token, rname),
                port=port, side_channel_port=side))
            urls[pool.role].append(engines[-1].url)
    deployment = _children("Deployment", rendered.children)[f"{name}-router"]
    r_argv = _drop_discovery(list(deployment["spec"]["template"]["spec"]["containers"][0]
                                  ["command"]))
    metrics_port = ports(1)
    for flag, value in (("--host", LOCALHOST), ("--port", str(router_port)),
                        ("--prometheus-host", LOCALHOST),
                        ("--prometheus-port", str(metrics_port))):
        r_argv = _set_flag(r_argv, flag, value)
    r_argv[0] = executable(r_argv[0])
    for u in urls["prefill"]:
        r_argv += ["--prefill", u]
    for u in urls["decode"]:
        r_argv += ["--decode", u]
    router = Proc(name="router", role="router", argv=r_argv, env={}, port=router_port)
    return Plan(name=name, engines=engines, router=router, router_metrics_port=metrics_port,
                workdir=workdir)


# ----------------------------------------------------------------------- processes
def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - local URLs
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


class LocalRun:
    """Starts a Plan's processes, each in its own process group, and stops them all."""

    def __init__(self, plan: Plan, out: Callable[[str], None] = print):
        self.plan, self.out = plan, out
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.reported: set[str] = set()

    def __enter__(self) -> LocalRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_path(self, name: str) -> Path:
        return self.plan.workdir / "logs" / f"{name}.log"

    def _spawn(self, p: Proc) -> None:
        env = {**os.environ, **p.env}
        if p.files:
            root = self.plan.workdir / "mounts" / p.name
            for rel, content in p.files.items():
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
                if rel.endswith("token"):
                    path.chmod(0o400)
            env[MOUNT_ROOT_ENV] = str(root)
        log = self.log_path(p.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            self.procs[p.name] = subprocess.Popen(  # noqa: S603 - argv from render
                p.argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def start(self, timeout_s: float = 600.0) -> None:
        self.plan.workdir.mkdir(parents=True, exist_ok=True)
        for p in self.plan.engines:
            self._spawn(p)
        self.out(f"starting {len(self.plan.engines)} engine replica(s) of {self.plan.name}; "
                 f"logs in {self.plan.workdir / 'logs'}")
        self._wait_healthy(self.plan.engines, "/health", timeout_s)
        self._spawn(self.plan.router)
        self._wait_healthy([self.plan.router], "/health", min(timeout_s, 120.0))
        self.write_state()

    def _wait_healthy(self, procs: list[Proc], path: str, timeout_s: float) -> None:
        t0, shown = time.monotonic(), ""
        pending = {p.name: p for p in procs}
        while pending:
            for name, p in list(pending.items()):
                code = self.procs[name].poll()
                if code is not None:
                    raise RunError(f"{name} exited with code {code} while starting:\n"
                                   + self.log_tail(name))
                if http_status(p.url + path) == 200:
                    del pending[name]
                    self.out(f"  {name}: ready at {p.url} ({time.monotonic() - t0:.1f}s)")
            status = ", ".join(f"{n}: {self.last_line(n)[:70]}" for n in pending)
            if pending and status != shown:
                self.out(f"  waiting {time.monotonic() - t0:.0f}s: {status}")
                shown = status
            if pending and time.monotonic() - t0 > timeout_s:
                raise RunError(f"not ready after {timeout_s:.0f}s: {', '.join(pending)}")
            if pending:
                time.sleep(0.3)

    def last_line(self, name: str) -> str:
        """The replica's last log line without the logging prefix (time, level, logger)."""
        lines = self.log_tail(name, 1).strip().splitlines()
        if not lines:
            return "starting"
        m = _LOG_PREFIX.match(lines[-1])
        return m.group(1) if m else lines[-1]

    def log_tail(self, name: str, n: int = 20) -> str:
        try:
            data = self.log_path(name).read_bytes()[-8192:].decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(data.splitlines()[-n:])

    def write_state(self) -> Path:
        """run.json: URLs, pids, ports and logs, for tools and tests."""
        state = {
            "name": self.plan.name, "url": self.plan.url,
            "router": {"pid": self.procs["router"].pid, "url": self.plan.router.url,
                       "metrics_port": self.plan.router_metrics_port,
                       "log": str(self.log_path("router"))},
            "replicas": [{**{k: v for k, v in asdict(p).items() if k in (
                "name", "role", "port", "side_channel_port", "argv")},
                "url": p.url, "pid": self.procs[p.name].pid, "log": str(self.log_path(p.name))}
                for p in self.plan.engines],
        }
        path = self.plan.workdir / "run.json"
        path.write_text(json.dumps(state, indent=1))
        return path

    def check_exits(self) -> list[str]:
        """Names of processes that exited since the last call (reported once each)."""
        gone = []
        for name, proc in self.procs.items():
            if proc.poll() is not None and name not in self.reported:
                self.reported.add(name)
                gone.append(f"{name} exited with code {proc.returncode}")
        return gone

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to every process group (the router first), SIGKILL to what is left."""
        order = ["router", *[p.name for p in self.plan.engines]]
        for name in order:
            _signal_group(self.procs.get(name), signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name in order:
            proc = self.procs.get(name)
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # the group may hold TP workers still
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()


def _signal_group(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)  # its own session: the group id is its pid
    except (ProcessLookupError, PermissionError):
        pass
