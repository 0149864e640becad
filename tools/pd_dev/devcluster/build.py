"""Build (or skip) the control-plane binaries into the cache.

Each tool is built from a wrapper module under ``deploy/local/<name>/`` (a go.mod + go.sum that pin
the version), with ``CGO_ENABLED=0 -trimpath -ldflags "-s -w ..."``. A binary is skipped when it is
present and its ``--version`` reports the pinned version.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import versions as _v

Progress = Callable[[str], None]

K8S_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
NODE_COMMANDS = ("kubelet", "kube-proxy")  # the real node (cluster up --real-node) only
KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)


@dataclass(frozen=True)
class Binary:
    name: str  # file name in the bin dir
    package: str  # Go import path of the main package
    version_args: tuple[str, ...]  # how to ask it for its version
    expect: str  # substring its version output must contain


@dataclass(frozen=True)
class Tool:
    name: str  # k8s | etcd | kwok | helm | k8s-node
    version: str
    module: str  # Go module the wrapper requires
    wrapper: str  # folder under deploy/local
    binaries: tuple[Binary, ...]
    ldflags: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    def dir(self, cache: Path) -> Path:
        return cache / f"{self.name}-{self.version}"

    def bin_dir(self, cache: Path) -> Path:
        return self.dir(cache) / "bin"


def k8s_ldflags(version: str) -> tuple[str, ...]:
    """Upstream's version stamping (hack/lib/version.sh), so binaries report their real version."""
    major, minor, _ = version.lstrip("v").split(".")
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return tuple(flags)


def _k8s_tool(name: str, version: str, commands: tuple[str, ...]) -> Tool:
    """Commands of k8s.io/kubernetes built from the wrapper deploy/local/<name> (pure)."""
    return Tool(
        name=name,
        version=version,
        module="k8s.io/kubernetes",
        wrapper=name,
        binaries=tuple(
            Binary(
                c,
                f"k8s.io/kubernetes/cmd/{c}",
                ("version", "--client") if c == "kubectl" else ("--version",),
                f"Client Version: {version}" if c == "kubectl" else f"Kubernetes {version}",
            )
            for c in commands
        ),
        ldflags=k8s_ldflags(version),
        tags=("selinux", "notest", "grpcnotrace"),
    )


def node_tools(v: _v.Versions) -> tuple[Tool, ...]:
    """The real node's binaries: kubelet and kube-proxy at the control plane's version, from
    their own wrapper so the default build (`tools`) is unchanged (pure)."""
    coredns = Tool(
        name="coredns",
        version=v.coredns,
        module="github.com/coredns/coredns",
        wrapper="coredns",
        binaries=(Binary("coredns", "github.com/coredns/coredns", ("-version",),
                         f"CoreDNS-{v.coredns.lstrip('v')}"),),
        ldflags=("-s", "-w"),
    )
    return (_k8s_tool("k8s-node", v.kubernetes, NODE_COMMANDS), coredns)


def tools(v: _v.Versions) -> tuple[Tool, ...]:
    """What to build (pure)."""
    k8s = _k8s_tool("k8s", v.kubernetes, K8S_COMMANDS)
    etcd = Tool(
        name="etcd",
        version=v.etcd,
        module="go.etcd.io/etcd/server/v3",
        wrapper="etcd",
        binaries=(
            Binary("etcd", "go.etcd.io/etcd/server/v3", ("--version",),
                   f"etcd Version: {v.etcd.lstrip('v')}"),
        ),
        ldflags=("-s", "-w"),
    )
    kwok = Tool(
        name="kwok",
        version=v.kwok,
        module="sigs.k8s.io/kwok",
        wrapper="kwok",
        binaries=(Binary("kwok", "sigs.k8s.io/kwok/cmd/kwok", ("--version",), v.kwok.lstrip("v")),),
        ldflags=("-s", "-w", f"-X sigs.k8s.io/kwok/pkg/consts.Version={v.kwok.lstrip('v')}"),
    )
    helm = Tool(
        name="helm",
        version=v.helm,
        module="helm.sh/helm/v3",
        wrapper="helm",
        binaries=(Binary("helm", "helm.sh/helm/v3/cmd/helm", ("version", "--short"), v.helm),),
        ldflags=("-s", "-w", f"-X helm.sh/helm/v3/internal/version.version={v.helm}"),
    )
    return (k8s, etcd, kwok, helm)


def binary_path(name: str, v: _v.Versions | None = None, cache: Path | None = None) -> Path:
    """Path of one cached binary by name (kube-apiserver, etcd, kwok, helm, kubectl, ...)."""
    v = v or _v.load()
    cache = cache or _v.cache_root()
    for t in (*tools(v), *node_tools(v)):
        for b in t.binaries:
            if b.name == name:
                return t.bin_dir(cache) / name
    raise KeyError(name)


def stages_dir(v: _v.Versions | None = None, cache: Path | None = None) -> Path:
    v = v or _v.load()
    cache = cache or _v.cache_root()
    kwok = next(t for t in tools(v) if t.name == "kwok")
    return kwok.dir(cache) / "stages"


def binary_ok(path: Path, b: Binary) -> bool:
    if not (path.is_file() and os.access(path, os.X_OK)):
        return False
    try:
        out = subprocess.run(
            [str(path), *b.version_args], capture_output=True, text=True, timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b.expect in (out.stdout + out.stderr)


def tool_ok(t: Tool, cache: Path) -> bool:
    ok = all(binary_ok(t.bin_dir(cache) / b.name, b) for b in t.binaries)
    if ok and t.name == "kwok":
        ok = all((t.dir(cache) / "stages" / s).is_file() for s in KWOK_STAGES)
    return ok


_REQUIRE = re.compile(r"^\s*(?:require\s+)?(\S+)\s+(v\S+)", re.MULTILINE)


def check_wrapper(t: Tool, local: Path) -> None:
    """The wrapper go.mod must require exactly the pinned version (versions.env is the truth)."""
    gomod = local / t.wrapper / "go.mod"
    text = gomod.read_text()
    found = {m.group(1): m.group(2) for m in _REQUIRE.finditer(text)}
    if found.get(t.module) != t.version:
        raise RuntimeError(
            f"{gomod} requires {t.module} {found.get(t.module)}, versions.env says {t.version}; "
            f"edit the go.mod (and run `go mod tidy` there) to match"
        )
    if t.module == "k8s.io/kubernetes":
        staging = "v0." + ".".join(t.version.lstrip("v").split(".")[1:])
        bad = [
            line.strip()
            for line in text.splitlines()
            if "=>" in line and not line.strip().endswith(staging)
        ]
        if bad:
            raise RuntimeError(f"{gomod}: replace lines not at {staging}: {bad[:3]}")


def go_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CGO_ENABLED="0",
        GOTOOLCHAIN=env.get("GOTOOLCHAIN", "local"),
        GOFLAGS=" ".join(
            f for f in (env.get("GOFLAGS", ""), "-buildvcs=false", "-mod=readonly") if f
        ),
    )
    env.update(extra or {})
    return env


def build_command(t: Tool, cache: Path) -> list[str]:
    """The `go build` command line for one tool (pure)."""
    cmd = ["go", "build", "-v", "-trimpath"]
    if t.tags:
        cmd += ["-tags", ",".join(t.tags)]
    if t.ldflags:
        cmd += ["-ldflags", " ".join(t.ldflags)]
    bdir = t.bin_dir(cache)
    if len(t.binaries) == 1:
        cmd += ["-o", str(bdir / t.binaries[0].name)]
    else:
        cmd += ["-o", str(bdir) + "/"]
    cmd += [b.package for b in t.binaries]
    return cmd


def _go(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    out = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"go {' '.join(args)} failed in {cwd}:\n{out.stderr[-4000:]}")
    return out.stdout


def _run_with_progress(cmd, cwd, env, log: Path, label: str, total: int, progress: Progress):
    """Run `go build -v`, counting the packages it compiles, reporting every few seconds."""
    count = 0
    last = ""
    done = threading.Event()
    t0 = time.monotonic()

    def ticker() -> None:
        while not done.wait(10.0):
            progress(
                f"  [{label}] {time.monotonic() - t0:5.0f}s compiled {count} of <= {total} "
                f"packages ({last})"
            )

    th = threading.Thread(target=ticker, daemon=True)
    th.start()
    with open(log, "a") as lf:
        lf.write(f"$ (cd {cwd} && {' '.join(cmd)})\n")
        lf.flush()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=lf, stderr=subprocess.PIPE, text=True
        )
        assert proc.stderr is not None
        tail: list[str] = []
        for line in proc.stderr:
            lf.write(line)
            line = line.strip()
            if line and " " not in line:
                count += 1
                last = line
            else:
                tail.append(line)
        rc = proc.wait()
    done.set()
    th.join()
    if rc != 0:
        raise RuntimeError(f"[{label}] go build failed (rc={rc}); see {log}:\n"
                           + "\n".join(tail[-40:]))
    return count


def build_tool(t: Tool, cache: Path, local: Path, progress: Progress, log: Path) -> None:
    if shutil.which("go") is None:
        raise RuntimeError("`go` not found on PATH: the control plane is built from the Go "
                           "module proxy and needs a Go toolchain (1.26+)")
    check_wrapper(t, local)
    wdir = local / t.wrapper
    env = go_env()
    t0 = time.monotonic()
    progress(f"[{t.name} {t.version}] resolving and downloading modules (go list -deps)...")
    pkgs = [b.package for b in t.binaries]
    tags = ["-tags", ",".join(t.tags)] if t.tags else []
    total = len(_go(["list", "-deps", *tags, *pkgs], wdir, env).split())
    cold = "; cold: many minutes on 2 cores" if t.module == "k8s.io/kubernetes" else ""
    progress(f"[{t.name} {t.version}] building {', '.join(b.name for b in t.binaries)} "
             f"({total} packages{cold})")
    t.bin_dir(cache).mkdir(parents=True, exist_ok=True)
    n = _run_with_progress(build_command(t, cache), wdir, env, log, t.name, total, progress)
    if t.name == "kwok":
        moddir = _go(["list", "-m", "-f", "{{.Dir}}", t.module], wdir, env).strip()
        for s in KWOK_STAGES:
            dst = t.dir(cache) / "stages" / s
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(moddir) / "kustomize" / "stage" / s, dst)
    for b in t.binaries:
        if not binary_ok(t.bin_dir(cache) / b.name, b):
            raise RuntimeError(f"{b.name}: built, but `{b.name} {' '.join(b.version_args)}` "
                               f"does not report {b.expect!r}")
    progress(f"[{t.name} {t.version}] done in {time.monotonic() - t0:.0f}s ({n} packages compiled)")


def ensure_built(
    force: bool = False,
    progress: Progress | None = None,
    only: tuple[str, ...] = (),
    real_node: bool = False,
) -> dict[str, Path]:
    """Build whatever is missing or wrong; return {binary name: path}."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    v = _v.load()
    cache = _v.cache_root()
    local = _v.local_dir()
    log = cache / "build.log"
    cache.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    t_all = time.monotonic()
    with open(cache / "build.lock", "w") as lock:
        if not _try_lock(lock):
            progress(f"another build holds {cache / 'build.lock'}; waiting for it...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        _build_all(v, cache, local, force, only, real_node, progress, log, paths)
    progress(f"binaries ready in {time.monotonic() - t_all:.0f}s (cache: {cache}, log: {log})")
    return paths


def _try_lock(fh) -> bool:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _build_all(v, cache, local, force, only, real_node, progress, log, paths) -> None:
    node = real_node or bool({"k8s-node", "coredns"} & set(only))
    wanted = (*tools(v), *node_tools(v)) if node else tools(v)
    for t in wanted:
        if only and t.name not in only:
            continue
        if not force and tool_ok(t, cache):
            progress(f"[{t.name} {t.version}] cached in {t.bin_dir(cache)}")
        else:
            build_tool(t, cache, local, progress, log)
        for b in t.binaries:
            paths[b.name] = t.bin_dir(cache) / b.name


def all_present(real_node: bool = False) -> bool:
    v = _v.load()
    cache = _v.cache_root()
    wanted = (*tools(v), *node_tools(v)) if real_node else tools(v)
    return all(tool_ok(t, cache) for t in wanted)
