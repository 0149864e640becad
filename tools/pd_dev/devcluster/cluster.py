"""`pdctl dev cluster up|down|status`: one local control plane per state directory.

State (ports, PIDs) lives in ``<dir>/state.json``; the default dir is
``~/.cache/pd-operator/clusters/default`` (``PD_DEV_CLUSTER_DIR`` overrides). `up` is idempotent:
it starts only what is not running and healthy. `down` stops exactly the PIDs it recorded.

With ``real_node=True`` (`up --real-node`) one real node joins beside the fake ones: containerd
and a kubelet (realnode, realnode_host); the mode is kept in the state, and `down` stops the node
and undoes its changes to the host before it stops the control plane.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import build, components, nodes, pki, processes
from . import realnode as rn
from . import realnode_host as rnh
from . import versions as _v
from .components import ORDER, PORT_NAMES, Layout
from .processes import Proc

Progress = Callable[[str], None]


def _default_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_dir() -> Path:
    env = os.environ.get("PD_DEV_CLUSTER_DIR")
    return Path(env).expanduser() if env else _v.cache_root() / "clusters" / "default"


def layout_for(directory: Path | None = None) -> Layout:
    d = (directory or default_dir()).resolve()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        tag = hashlib.sha1(str(d).encode()).hexdigest()[:10]
        etcd_data = shm / f"pd-operator-{os.getuid()}-{tag}" / "etcd"
    else:
        etcd_data = d / "etcd-data"
    return Layout(dir=d, etcd_data=etcd_data)


@dataclass
class State:
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, dict[str, int]] = field(default_factory=dict)
    # the real node: {"enabled": bool, "ports", "node_ip", "gpus", "before": host snapshot}
    real_node: dict = field(default_factory=dict)

    @classmethod
    def load(cls, layout: Layout) -> State:
        try:
            raw = json.loads(layout.state.read_text())
        except FileNotFoundError:
            return cls()
        return cls(ports=raw.get("ports", {}), procs=raw.get("procs", {}),
                   real_node=raw.get("real_node", {}))

    def save(self, layout: Layout) -> None:
        layout.dir.mkdir(parents=True, exist_ok=True)
        tmp = layout.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        tmp.replace(layout.state)

    def proc(self, name: str) -> Proc | None:
        p = self.procs.get(name)
        return Proc(p["pid"], p["start_time"]) if p else None


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    layout.dir.mkdir(parents=True, exist_ok=True)
    with open(layout.dir / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ports(state: State) -> dict[str, int]:
    """Keep the recorded ports (so live components keep talking); when nothing of ours runs,
    give up any that someone else took meanwhile (e.g. after a reboot)."""
    ports = dict(state.ports)
    if not any(processes.alive(p) for n in ORDER if (p := state.proc(n)) is not None):
        ports = {n: p for n, p in ports.items() if processes.port_free(p)}
    return _with_free_ports(ports, PORT_NAMES, set(ports.values()))


def _with_free_ports(ports: dict[str, int], names, taken: set[int]) -> dict[str, int]:
    """`ports` plus a free port, distinct from `taken` and from each other, for each name it
    lacks."""
    for name in names:
        if name not in ports:
            while (p := processes.free_port()) in taken:
                pass
            ports[name] = p
            taken.add(p)
    return ports


def _write_kubeconfig(layout: Layout, ports: dict[str, int], cpki: pki.ClusterPKI) -> None:
    cfg = components.kubeconfig_yaml(
        f"https://{components.HOST}:{ports['kube-apiserver']}",
        cpki.ca.crt.read_bytes(), cpki.admin.crt.read_bytes(), cpki.admin.key.read_bytes(),
    )
    text = yaml.safe_dump(cfg, sort_keys=False)
    if not layout.kubeconfig.is_file() or layout.kubeconfig.read_text() != text:
        layout.kubeconfig.write_text(text)
        layout.kubeconfig.chmod(0o600)


def _probe(layout: Layout, comp: components.Component) -> tuple[bool, str]:
    pr = comp.probe
    return processes.probe(
        pr.url,
        ca=layout.pki / "ca.crt" if pr.verify_ca else None,
        cert=(layout.pki / "admin.crt", layout.pki / "admin.key") if pr.client_cert else None,
    )


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def _wait_healthy(layout: Layout, comp: components.Component, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    detail = ""
    while time.monotonic() < deadline:
        if not processes.alive(proc):
            log = layout.logs / f"{comp.name}.log"
            raise RuntimeError(f"{comp.name} exited during start-up; last lines of {log}:\n"
                               + _tail(log))
        ok, detail = _probe(layout, comp)
        if ok:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{comp.name} not healthy after {timeout:.0f}s ({detail}); "
                       f"see {layout.logs / (comp.name + '.log')}")


def _bins() -> dict[str, Path]:
    v = _v.load()
    cache = _v.cache_root()
    return {b.name: t.bin_dir(cache) / b.name
            for t in (*build.tools(v), *build.node_tools(v)) for b in t.binaries}


def _commands(layout: Layout, ports: dict[str, int],
              node_ip: str | None = None) -> dict[str, components.Component]:
    """`node_ip`: the real node's address, when the cluster has one."""
    stages = [build.stages_dir() / s for s in build.KWOK_STAGES]
    extra = rn.apiserver_flags(layout.pki, node_ip) if node_ip else ()
    return components.commands(_bins(), layout, ports, stages, apiserver_extra=extra)


def api_client(layout: Layout | None = None):
    from kubernetes import config

    layout = layout or layout_for()
    return config.new_client_from_config(config_file=str(layout.kubeconfig))


def ensure_nodes(layout: Layout, count: int, gpus: int, timeout: float, progress: Progress) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with api_client(layout) as api:
        core = client.CoreV1Api(api)
        for obj in nodes.node_objects(count, gpus):
            try:
                core.create_node(obj)
            except ApiException as exc:
                if exc.status != 409:
                    raise
        names = {s.name for s in nodes.node_specs(count, gpus)}
        deadline = time.monotonic() + timeout
        ready: set[str] = set()
        while time.monotonic() < deadline:
            ready = {
                n.metadata.name
                for n in core.list_node(label_selector="type=kwok").items
                if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
            }
            if names <= ready:
                progress(f"nodes: {len(names)} fake GPU nodes Ready ({gpus} x nvidia.com/gpu each)")
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not Ready after {timeout:.0f}s: {sorted(names - ready)}; "
                           f"see {layout.logs / 'kwok.log'}")


def up(
    directory: Path | None = None,
    node_count: int = 4,
    gpus_per_node: int = 8,
    build_missing: bool = True,
    progress: Progress | None = None,
    timeout: float = 120.0,
    real_node: bool = False,
) -> list[str]:
    """Start what is not running; return the names of the components started now.
    `real_node`: also one real node (kubelet + containerd) beside the fake ones."""
    progress = progress or _default_progress
    layout = layout_for(directory)
    t0 = time.monotonic()
    real_node = real_node or bool(State.load(layout).real_node.get("enabled"))
    if build_missing:
        build.ensure_built(progress=progress, real_node=real_node)
    elif not build.all_present(real_node=real_node):
        raise RuntimeError("binaries missing: run `pdctl dev cluster build` first")
    if real_node:
        rnh.ensure_host_packages(progress)
    started: list[str] = []
    with _locked(layout):
        state = State.load(layout)
        _check_mode(state, real_node)
        state.ports = _ports(state)
        state.save(layout)
        ip = None
        if real_node:
            ip = state.real_node.setdefault("node_ip", rnh.node_ip())
            state.real_node["enabled"] = True
            state.save(layout)
            rnh.node_pki(layout.pki, ip)
        cpki = pki.ensure_cluster_pki(layout.pki, (f"IP:{ip}",) if ip else ())
        _write_kubeconfig(layout, state.ports, cpki)
        layout.etcd_data.parent.mkdir(parents=True, exist_ok=True)
        layout.etcd_data.parent.chmod(0o700)
        cmds = _commands(layout, state.ports, ip)
        for name in ORDER:
            comp = cmds[name]
            old = state.proc(name)
            if old is not None and processes.alive(old):
                progress(f"{name}: running (pid {old.pid})")
                _wait_healthy(layout, comp, old, timeout)
                continue
            proc = processes.start(comp.argv, layout.logs / f"{name}.log")
            state.procs[name] = {"pid": proc.pid, "start_time": proc.start_time}
            state.save(layout)
            t1 = time.monotonic()
            _wait_healthy(layout, comp, proc, timeout)
            started.append(name)
            progress(f"{name}: started (pid {proc.pid}), healthy in {time.monotonic() - t1:.1f}s")
        ensure_nodes(layout, node_count, gpus_per_node, timeout, progress)
        if real_node:
            started += _up_real_node(layout, state, gpus_per_node, timeout, progress)
    progress(f"cluster up in {time.monotonic() - t0:.1f}s; export KUBECONFIG={layout.kubeconfig}")
    return started


def _check_mode(state: State, real_node: bool) -> None:
    """The API server's flags differ with a real node: never mix a running control plane
    started without it and a real node."""
    api = state.proc("kube-apiserver")
    running = api is not None and processes.alive(api)
    if running and real_node and not state.real_node.get("enabled"):
        raise RuntimeError("this control plane runs without --real-node (its API server lacks "
                           "Node authorization and kubelet client certificates): run `pdctl dev "
                           "cluster down` first, or use another --dir")


def _real_ports(state: State) -> dict[str, int]:
    ports = dict(state.real_node.get("ports", {}))
    return _with_free_ports(ports, rn.REAL_PORT_NAMES,
                            set(state.ports.values()) | set(ports.values()))


def _ensure_running(layout: Layout, state: State, name: str, started: list[str],
                    progress: Progress, start: Callable[[], Proc]) -> Proc:
    """The recorded process `name` if it still runs, else a new one (recorded at once)."""
    proc = state.proc(name)
    if proc is not None and processes.alive(proc):
        progress(f"{name}: running (pid {proc.pid})")
        return proc
    proc = start()
    state.procs[name] = {"pid": proc.pid, "start_time": proc.start_time}
    state.save(layout)
    started.append(name)
    progress(f"{name}: started (pid {proc.pid})")
    return proc


def _up_real_node(layout: Layout, state: State, gpus: int, timeout: float,
                  progress: Progress) -> list[str]:
    """containerd, the pause image, the kubelet, kube-proxy, CoreDNS; the node Ready with
    fake GPUs."""
    from kubernetes import client

    nl = rn.node_layout(layout.dir)
    t0 = time.monotonic()
    started: list[str] = []
    rs = state.real_node
    if "before" not in rs:  # the host as it was before the node touched it, kept until `down`
        if rnh.bridge_exists():
            raise RuntimeError(f"bridge {rn.BRIDGE} exists: another real node runs on this host "
                               f"(one per host); `pdctl dev cluster down` its cluster first")
        rs["before"] = rnh.snapshot_host()
    rs["ports"] = _real_ports(state)
    rs["gpus"] = gpus
    state.save(layout)
    ip = rs["node_ip"]
    api_url = f"https://{components.HOST}:{state.ports['kube-apiserver']}"
    certs = rnh.node_pki(layout.pki, ip)
    rnh.write_configs(nl, layout.pki, api_url, ip, rs["ports"], certs, layout.kubeconfig)
    rnh.ensure_bridge()
    _ensure_running(layout, state, "containerd", started, progress,
                    lambda: rnh.start_containerd(nl, layout.logs, timeout))
    rnh.ensure_pause_image(nl, progress)
    kl = _ensure_running(layout, state, "kubelet", started, progress,
                         lambda: rnh.start_kubelet(nl, _bins()["kubelet"], ip, gpus,
                                                   rs["ports"], layout.logs, timeout))
    with api_client(layout) as api:
        core = client.CoreV1Api(api)
        rnh.wait_node_ready(core, kl, layout.logs / "kubelet.log", timeout)
        rnh.set_fake_gpus(core, gpus)
        core.patch_node(rn.NODE_NAME, {"spec": {"unschedulable": False}})
    bins = _bins()  # kube-proxy reads its node (registered by now) at start
    _ensure_running(layout, state, "kube-proxy", started, progress,
                    lambda: rnh.start_kube_proxy(nl, bins["kube-proxy"], rs["ports"],
                                                 layout.logs, timeout))
    _ensure_running(layout, state, "coredns", started, progress,
                    lambda: rnh.start_coredns(nl, bins["coredns"], rs["ports"], layout.logs,
                                              timeout))
    progress(f"real node: {rn.NODE_NAME} Ready at {ip} ({gpus} fake nvidia.com/gpu, label "
             f"{rn.REAL_NODE_LABEL}=true, taint {rn.REAL_NODE_LABEL}=true:NoSchedule) in "
             f"{time.monotonic() - t0:.1f}s")
    return started


REAL_NODE_ORDER = ("containerd", "kubelet", "kube-proxy", "coredns")  # start order


def _stop_recorded(layout: Layout, state: State, name: str, progress: Progress) -> bool:
    proc = state.proc(name)
    stopped = proc is not None and processes.stop(proc)
    if stopped and proc is not None:
        progress(f"{name}: stopped (pid {proc.pid})")
    state.procs.pop(name, None)
    state.save(layout)
    return stopped


def _down_real_node(layout: Layout, state: State, progress: Progress) -> list[str]:
    """Drain (pods stopped by the kubelet, so CNI tears down their networking), stop the node's
    processes, kill what the kubelet could not stop, undo the host changes."""
    from kubernetes import client

    nl = rn.node_layout(layout.dir)
    api, kl = state.proc("kube-apiserver"), state.proc("kubelet")
    if api is not None and processes.alive(api) and kl is not None and processes.alive(kl):
        with api_client(layout) as apic:
            rnh.drain(client.CoreV1Api(apic), nl, 60.0, progress)
    stopped = []
    for name in reversed(REAL_NODE_ORDER):
        cd = state.proc(name) if name == "containerd" else None
        if cd is not None and processes.alive(cd):
            rnh.kill_tasks(nl, progress)
        if _stop_recorded(layout, state, name, progress):
            stopped.append(name)
    for line in rnh.cleanup_host(nl, state.real_node.get("before"), progress):
        progress(f"real node: {line}")
    state.real_node.pop("before", None)
    state.real_node["enabled"] = False
    state.save(layout)
    return stopped


def down(directory: Path | None = None, purge: bool = False,
         progress: Progress | None = None) -> list[str]:
    """Stop the recorded processes (reverse order, by PID); return the names stopped."""
    progress = progress or _default_progress
    layout = layout_for(directory)
    stopped: list[str] = []
    if not layout.dir.exists():
        progress(f"no cluster in {layout.dir}")
        return stopped
    with _locked(layout):
        state = State.load(layout)
        if state.real_node:
            stopped += _down_real_node(layout, state, progress)
        for name in reversed(ORDER):
            p = state.proc(name)
            if p is None:
                continue
            if processes.stop(p):
                stopped.append(name)
                progress(f"{name}: stopped (pid {p.pid})")
            state.procs.pop(name, None)
            state.save(layout)
        if layout.etcd_data.parent.name.startswith("pd-operator-"):
            shutil.rmtree(layout.etcd_data.parent, ignore_errors=True)
        else:
            shutil.rmtree(layout.etcd_data, ignore_errors=True)
    if purge:
        shutil.rmtree(layout.dir, ignore_errors=True)
        progress(f"removed {layout.dir}")
    return stopped


@dataclass
class ComponentStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    detail: str
    rss_mib: float


@dataclass
class Status:
    dir: str
    kubeconfig: str
    components: list[ComponentStatus]
    nodes_ready: int | None
    nodes_total: int | None

    @property
    def ok(self) -> bool:
        return all(c.running and c.healthy for c in self.components)

    @property
    def any_running(self) -> bool:
        return any(c.running for c in self.components)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["rss_mib_total"] = round(sum(c.rss_mib for c in self.components), 1)
        return d


def _probe_real(layout: Layout, state: State, name: str) -> tuple[bool, str]:
    """Health of one of the real node's processes."""
    ports = state.real_node.get("ports", {})
    urls = {
        "kubelet": f"http://127.0.0.1:{ports.get('kubelet-healthz')}/healthz",
        "kube-proxy": f"http://127.0.0.1:{ports.get('kube-proxy-healthz')}/healthz",
        "coredns": f"http://127.0.0.1:{ports.get('coredns-health')}/health",
    }
    if name in urls:
        return processes.probe(urls[name])
    try:
        rnh.ctr(rn.node_layout(layout.dir), "version", timeout=5)
    except (rnh.RealNodeError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)[:80]
    return True, "serving (ctr version)"


def status(directory: Path | None = None, with_nodes: bool = True) -> Status:
    layout = layout_for(directory)
    state = State.load(layout)
    ip = state.real_node.get("node_ip") if state.real_node.get("enabled") else None
    cmds = _commands(layout, state.ports, ip) if state.ports else {}
    comps = []
    names = (*ORDER, *(REAL_NODE_ORDER if ip else ()))
    for name in names:
        p = state.proc(name)
        running = p is not None and processes.alive(p)
        healthy, detail = (False, "not running")
        if p is None:
            detail = "not started"
        if running:
            healthy, detail = (_probe(layout, cmds[name]) if name in cmds
                               else _probe_real(layout, state, name))
        comps.append(ComponentStatus(
            name, p.pid if p else None, running, healthy, detail,
            round(processes.rss_kib(p) / 1024, 1) if running and p else 0.0,
        ))
    ready = total = None
    api_ok = next(c for c in comps if c.name == "kube-apiserver").healthy
    if with_nodes and api_ok:
        try:
            from kubernetes import client

            with api_client(layout) as api:
                items = client.CoreV1Api(api).list_node(
                    label_selector="type=kwok", _request_timeout=5).items
            total = len(items)
            ready = sum(
                1 for n in items
                if any(c.type == "Ready" and c.status == "True"
                       for c in n.status.conditions or [])
            )
        except Exception:  # noqa: BLE001, S110 - status reports, never raises
            pass
    return Status(str(layout.dir), str(layout.kubeconfig), comps, ready, total)
