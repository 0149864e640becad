"""The real node on this host: packages, images, start, stop and undo (the shell around
`realnode`).

`up` records the host's state first (the sysctls the node may change, the iptables rules), and
`down` puts it back: pods stopped through the kubelet (so CNI tears down their networking), the
kubelet and containerd stopped by PID, leftover shims of OUR containerd killed, mounts under our
directories unmounted, the bridge deleted, our iptables rules and chains removed, the sysctls
restored, the kubelet's cgroups removed. Needs root (containers, bridges, iptables).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from . import components, pki, processes
from . import realnode as rn
from . import versions as _v
from .processes import Proc

Progress = Callable[[str], None]
CGROUP_ROOT = Path("/sys/fs/cgroup")


class RealNodeError(RuntimeError):
    """The real node cannot start here, with what to do about it."""


def _run(argv: list[str], timeout: float = 120.0, check: bool = True) -> str:
    if shutil.which(argv[0]) is None:
        package = rn.HOST_BINARIES.get(argv[0], argv[0])
        raise RealNodeError(f"`{argv[0]}` is not installed here: apt-get install {package} "
                            "(`pdctl dev cluster up` installs the real node's packages)")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and out.returncode != 0:
        raise RealNodeError(f"{' '.join(argv[:4])} failed (rc={out.returncode}): "
                            f"{(out.stderr or out.stdout).strip()[-2000:]}")
    return out.stdout


# ---- host packages ----------------------------------------------------------------------


def missing_host_parts() -> list[str]:
    missing = [b for b in rn.HOST_BINARIES if shutil.which(b) is None]
    missing += [f"cni:{p}" for p in rn.CNI_PLUGINS if not (rn.CNI_BIN_DIR / p).is_file()]
    return missing


def ensure_host_packages(progress: Progress) -> None:
    """Debian's containerd, runc, CNI plugins and iptables, installed with apt-get when
    missing (root only)."""
    if os.geteuid() != 0:
        raise RealNodeError("the real node needs root (containers, a bridge, iptables)")
    if not missing_host_parts():
        return
    apt_install(rn.APT_PACKAGES, "real node", progress)
    if missing_host_parts():
        raise RealNodeError(f"still missing after apt-get: {missing_host_parts()}")


POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def apt_install(packages: tuple[str, ...], who: str, progress: Progress) -> None:
    """`apt-get install` with no daemon started by the packages' scripts (a policy-rc.d that
    denies every start, unless one exists): containerd or dockerd started as services would
    change the host (iptables, a bridge) behind `up`/`down`'s back."""
    if shutil.which("apt-get") is None:
        raise RealNodeError(f"{who}: no apt-get: install {' '.join(packages)}")
    t0 = time.monotonic()
    progress(f"{who}: apt-get install {' '.join(packages)} ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    made_policy = not POLICY_RC_D.exists()
    if made_policy:
        POLICY_RC_D.write_text("#!/bin/sh\n# pd-operator: no service starts during apt-get\n"
                               "exit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        out = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages],
                             capture_output=True, text=True, env=env, timeout=900, check=False)
        if out.returncode != 0 and "Unable to locate package" in out.stderr:
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600,
                           check=False)
            out = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                                  *packages], capture_output=True, text=True, env=env,
                                 timeout=900, check=False)
    finally:
        if made_policy:
            POLICY_RC_D.unlink(missing_ok=True)
    if out.returncode != 0:
        raise RealNodeError(f"{who}: apt-get install failed: {out.stderr.strip()[-2000:]}")
    progress(f"{who}: packages installed in {time.monotonic() - t0:.0f}s")


# ---- host state: record before, restore after ---------------------------------------------


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    out = {}
    for name in rn.SYSCTLS:
        try:
            out[name] = _sysctl_path(name).read_text().strip()
        except OSError:
            continue
    return out


NETNS_DIR = Path("/run/netns")  # containerd's CRI makes pod network namespaces here


def iptables_listing(binary: str, table: str) -> str:
    return _run([binary, "-w", "-t", table, "-S"], timeout=30)


def snapshot_host() -> dict:
    """What `down` restores: the sysctls, the iptables rules (v4 and v6), the cgroups that
    existed, whether /run/netns existed."""
    return {
        "sysctls": read_sysctls(),
        "iptables": {f"{b}/{t}": iptables_listing(b, t)
                     for b in rn.IPTABLES for t in rn.IPTABLES_TABLES},
        "kubepods_cgroups": sorted(str(p) for p in CGROUP_ROOT.glob("*/kubepods")),
        "netns_dir": NETNS_DIR.is_dir(),
        "netns": _netns(),
    }


def _netns() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def host_footprint(nl: rn.NodeLayout) -> dict:
    """What a real node leaves on the host, for before/after comparisons (tests, evidence):
    the snapshot plus our shims, mounts, pod network namespaces and the bridge."""
    snap = snapshot_host()
    snap.update(
        bridge=bridge_exists(),
        shims=our_shims(nl),
        mounts=our_mounts(nl),
    )
    return snap


def restore_host(before: dict, progress: Progress) -> list[str]:
    """Undo what the node changed; returns one line per change undone."""
    done: list[str] = []
    for binary in rn.IPTABLES:
        for table in rn.IPTABLES_TABLES:
            old = before.get("iptables", {}).get(f"{binary}/{table}", "")
            for args in rn.iptables_undo(table, old, iptables_listing(binary, table)):
                _run([binary, "-w", *args], timeout=30, check=False)
                done.append(f"{binary} " + " ".join(args))
    for name, value in before.get("sysctls", {}).items():
        try:
            now = _sysctl_path(name).read_text().strip()
            if now != value:
                _sysctl_path(name).write_text(value + "\n")
                done.append(f"sysctl {name}: {now} -> {value}")
        except OSError as exc:
            progress(f"real node: could not restore {name}={value}: {exc}")
    # pod network namespaces the CRI could not tear down (the kubelet could not drain): CNI's
    # `cni-<uuid>` names that were not there before
    for name in sorted(set(_netns()) - set(before.get("netns", []))):
        if name.startswith("cni-"):
            subprocess.run(["umount", str(NETNS_DIR / name)], capture_output=True, check=False)
            (NETNS_DIR / name).unlink(missing_ok=True)
            done.append(f"removed network namespace {name}")
    if not before.get("netns_dir", True) and NETNS_DIR.is_dir():
        try:
            NETNS_DIR.rmdir()  # only when empty: a namespace left there is reported by checks
            done.append(f"removed {NETNS_DIR}")
        except OSError:
            pass
    kept = set(before.get("kubepods_cgroups", []))
    for top in CGROUP_ROOT.glob("*/kubepods"):
        if str(top) not in kept and _rmdir_tree(top):
            done.append(f"cgroup {top} removed")
    return done


def _rmdir_tree(top: Path) -> bool:
    """Remove an (empty of processes) cgroup directory tree, deepest first."""
    dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for d in [*dirs, top]:
        try:
            d.rmdir()
        except OSError:
            pass
    return not top.exists()


# ---- images -----------------------------------------------------------------------------


def images_cache() -> Path:
    return _v.cache_root() / "realnode-images"


def pause_binary(progress: Progress) -> Path:
    """The sandbox's pause program, built from deploy/local/pause (static, seconds)."""
    out = images_cache() / "pause"
    src = _v.local_dir() / "pause"
    if out.is_file() and out.stat().st_mtime >= max(p.stat().st_mtime for p in src.iterdir()):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CGO_ENABLED="0", GOTOOLCHAIN=os.environ.get("GOTOOLCHAIN", "local"))
    res = subprocess.run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out), "."],
                         cwd=src, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    if res.returncode != 0:
        raise RealNodeError(f"building pause failed: {res.stderr.strip()[-2000:]}")
    progress(f"real node: built {out}")
    return out


def busybox_binary(progress: Progress) -> Path:
    """A static busybox from Debian's `busybox-static` package, downloaded (not installed)
    into the cache: enough for small test images with a shell."""
    out = images_cache() / "busybox"
    if out.is_file():
        return out
    work = images_cache() / "busybox-deb"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    progress("real node: apt-get download busybox-static ...")
    subprocess.run(["apt-get", "download", "busybox-static"], cwd=work, capture_output=True,
                   text=True, timeout=300, check=True)
    deb = next(work.glob("busybox-static_*.deb"))
    _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
    shutil.copyfile(work / "root" / "bin" / "busybox", out)
    out.chmod(0o755)
    shutil.rmtree(work, ignore_errors=True)
    return out


BUSYBOX_APPLETS = ("sh", "echo", "sleep", "cat", "ls", "hostname", "wget", "env", "true",
                   "nc", "nslookup", "httpd", "mkdir", "printf", "tail", "grep")


def busybox_archive(name: str, progress: Progress) -> bytes:
    """A tiny busybox image (`/bin/busybox` and applet links), for tests."""
    data = busybox_binary(progress).read_bytes()
    links = {f"bin/{a}": "busybox" for a in BUSYBOX_APPLETS}
    return rn.docker_archive(name, {"bin/busybox": (data, 0o755)}, ["/bin/sh"], links=links)


def ctr(nl: rn.NodeLayout, *args: str, timeout: float = 300.0) -> str:
    return _run(["ctr", "--address", str(nl.containerd_sock), "--namespace", "k8s.io", *args],
                timeout=timeout)


def import_image(nl: rn.NodeLayout, archive: bytes, name: str) -> None:
    """Import a docker-archive into the node's containerd (where the kubelet looks)."""
    nl.images.mkdir(parents=True, exist_ok=True)
    tar = nl.images / (name.replace("/", "_").replace(":", "_") + ".tar")
    tar.write_bytes(archive)
    ctr(nl, "images", "import", str(tar))
    tar.unlink()


def has_image(nl: rn.NodeLayout, name: str) -> bool:
    return any(line.split()[0] == name
               for line in ctr(nl, "images", "ls").splitlines()[1:] if line.strip())


def ensure_pause_image(nl: rn.NodeLayout, progress: Progress) -> None:
    if has_image(nl, rn.PAUSE_IMAGE):
        return
    data = pause_binary(progress).read_bytes()
    archive = rn.docker_archive(rn.PAUSE_IMAGE, {"pause": (data, 0o755)}, ["/pause"])
    import_image(nl, archive, rn.PAUSE_IMAGE)
    progress(f"real node: imported {rn.PAUSE_IMAGE}")


# ---- start ------------------------------------------------------------------------------


def node_ip() -> str:
    """This host's address on its default route: the kubelet's InternalIP."""
    out = _run(["ip", "-4", "-o", "route", "get", "192.0.2.255"], timeout=10)
    words = out.split()
    if "src" not in words:
        raise RealNodeError(f"no source address for the default route: {out.strip()}")
    return words[words.index("src") + 1]


def node_pki(pki_dir: Path, ip: str) -> dict[str, pki.Pair]:
    """The kubelet's client identity (system:node:<name>, Node authorization), its serving
    certificate (the API server dials the InternalIP), and the API server's client certificate
    towards kubelets (logs / exec)."""
    ca = pki.make_ca(pki_dir)
    return {
        "kubelet": pki.issue(ca, pki_dir, "kubelet", f"system:node:{rn.NODE_NAME}",
                             orgs=("system:nodes",), client=True),
        "kubelet-serving": pki.issue(ca, pki_dir, "kubelet-serving", rn.NODE_NAME,
                                     sans=(f"IP:{ip}", f"DNS:{rn.NODE_NAME}"), server=True),
        "kubelet-client": pki.issue(ca, pki_dir, "kubelet-client",
                                    "kube-apiserver-kubelet-client",
                                    orgs=("system:masters",), client=True),
        # bound to system:node-proxier by the API server's default RBAC
        "kube-proxy": pki.issue(ca, pki_dir, "kube-proxy", "system:kube-proxy", client=True),
    }


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write only on change: kube-proxy exits when its configuration file is touched, and a
    second `up` must leave running processes alone."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    path.chmod(mode)


def _kubeconfig(path: Path, api_url: str, ca: Path, pair: pki.Pair) -> None:
    kc = components.kubeconfig_yaml(api_url, ca.read_bytes(), pair.crt.read_bytes(),
                                    pair.key.read_bytes())
    _write(path, yaml.safe_dump(kc, sort_keys=False), 0o600)


def write_configs(nl: rn.NodeLayout, pki_dir: Path, api_url: str, ip: str,
                  ports: dict[str, int], certs: dict[str, pki.Pair],
                  admin_kubeconfig: Path) -> None:
    for d in (nl.dir, nl.cni_conf_dir, nl.cni_ipam_dir, nl.kubelet_root, nl.pod_logs, nl.run):
        d.mkdir(parents=True, exist_ok=True)
    nl.run.chmod(0o700)
    _write(nl.containerd_config, rn.containerd_config(nl))
    _write(nl.cni_conf_dir / "10-pd-realnode.conflist", json.dumps(rn.cni_conflist(nl), indent=2))
    serving = certs["kubelet-serving"]
    _write(nl.kubelet_config, yaml.safe_dump(
        rn.kubelet_config(nl, pki_dir / "ca.crt", (serving.crt, serving.key), ip, ports),
        sort_keys=False))
    _kubeconfig(nl.kubelet_kubeconfig, api_url, pki_dir / "ca.crt", certs["kubelet"])
    _kubeconfig(nl.kube_proxy_kubeconfig, api_url, pki_dir / "ca.crt", certs["kube-proxy"])
    _write(nl.kube_proxy_config, yaml.safe_dump(rn.kube_proxy_config(nl, ports),
                                                 sort_keys=False))
    # CoreDNS reads Services and EndpointSlices cluster-wide: the admin identity of this
    # development cluster (a dedicated ClusterRole is the production way)
    _write(nl.corefile, rn.corefile(admin_kubeconfig, ports))


def ensure_bridge() -> None:
    """The pods' bridge with its gateway address, made before any pod so that CoreDNS can
    listen there; the CNI bridge plugin adopts it. `down` deletes it."""
    if bridge_exists():
        return
    _run(["ip", "link", "add", rn.BRIDGE, "type", "bridge"], timeout=30)
    prefix = rn.POD_SUBNET.split("/")[1]
    _run(["ip", "addr", "add", f"{rn.BRIDGE_IP}/{prefix}", "dev", rn.BRIDGE], timeout=30)
    _run(["ip", "link", "set", rn.BRIDGE, "up"], timeout=30)


def _wait(what: str, check: Callable[[], bool], proc: Proc | None, log: Path,
          timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not processes.alive(proc):
            raise RealNodeError(f"{what}: the process exited; see {log}")
        if check():
            return
        time.sleep(0.3)
    raise RealNodeError(f"{what}: not done after {timeout:.0f}s; see {log}")


def start_containerd(nl: rn.NodeLayout, logs: Path, timeout: float) -> Proc:
    proc = processes.start(rn.containerd_argv(nl), logs / "containerd.log")

    def serving() -> bool:
        try:
            ctr(nl, "version", timeout=5)
            return True
        except (RealNodeError, subprocess.TimeoutExpired):
            return False

    _wait("containerd", serving, proc, logs / "containerd.log", timeout)
    return proc


def _start_healthy(name: str, argv: list[str] | tuple[str, ...], health_url: str, logs: Path,
                   timeout: float) -> Proc:
    """Start one node process and wait until its health endpoint answers."""
    log = logs / f"{name}.log"
    proc = processes.start(argv, log)
    _wait(name, lambda: processes.probe(health_url)[0], proc, log, timeout)
    return proc


def start_kubelet(nl: rn.NodeLayout, kubelet: Path, ip: str, gpus: int, ports: dict[str, int],
                  logs: Path, timeout: float) -> Proc:
    return _start_healthy("kubelet", rn.kubelet_argv(kubelet, nl, ip, gpus),
                          f"http://127.0.0.1:{ports['kubelet-healthz']}/healthz", logs, timeout)


def start_kube_proxy(nl: rn.NodeLayout, kube_proxy: Path, ports: dict[str, int], logs: Path,
                     timeout: float) -> Proc:
    return _start_healthy("kube-proxy", rn.kube_proxy_argv(kube_proxy, nl),
                          f"http://127.0.0.1:{ports['kube-proxy-healthz']}/healthz", logs,
                          timeout)


def start_coredns(nl: rn.NodeLayout, coredns: Path, ports: dict[str, int], logs: Path,
                  timeout: float) -> Proc:
    return _start_healthy("coredns", rn.coredns_argv(coredns, nl),
                          f"http://127.0.0.1:{ports['coredns-health']}/health", logs, timeout)


def wait_node_ready(core, proc: Proc, log: Path, timeout: float) -> None:
    from kubernetes.client.rest import ApiException

    def ready() -> bool:
        try:
            node = core.read_node(rn.NODE_NAME, _request_timeout=5)
        except ApiException:
            return False
        return any(c.type == "Ready" and c.status == "True"
                   for c in node.status.conditions or [])

    _wait(f"node {rn.NODE_NAME} Ready", ready, proc, log, timeout)


def set_fake_gpus(core, gpus: int) -> None:
    """Fake GPU capacity in the node's status; the kubelet's own status updates keep it."""
    core.patch_node_status(rn.NODE_NAME, rn.gpu_status_patch(gpus))


# ---- stop -------------------------------------------------------------------------------


def drain(core, nl: rn.NodeLayout, timeout: float, progress: Progress) -> None:
    """Cordon the node and delete its pods through the API, so the kubelet stops them and CNI
    tears down their networking; wait until no pod of ours runs in containerd."""
    from kubernetes.client.rest import ApiException

    try:
        core.patch_node(rn.NODE_NAME, {"spec": {"unschedulable": True}})
        pods = core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={rn.NODE_NAME}").items
    except ApiException as exc:
        progress(f"real node: cannot drain through the API ({exc.status}); stopping anyway")
        return
    for p in pods:
        try:
            core.delete_namespaced_pod(p.metadata.name, p.metadata.namespace,
                                       grace_period_seconds=1)
        except ApiException as exc:
            if exc.status != 404:
                raise
    deadline = time.monotonic() + timeout
    left = pods
    while time.monotonic() < deadline:
        left = core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={rn.NODE_NAME}").items
        if not left and not running_tasks(nl):
            break
        time.sleep(0.5)
    if pods:
        progress(f"real node: {len(pods)} pod(s) deleted, {len(left)} left")


def running_tasks(nl: rn.NodeLayout) -> list[str]:
    try:
        lines = ctr(nl, "tasks", "ls", timeout=10).splitlines()[1:]
    except (RealNodeError, subprocess.TimeoutExpired):
        return []
    return [ln.split()[0] for ln in lines if ln.strip() and "RUNNING" in ln]


def kill_tasks(nl: rn.NodeLayout, progress: Progress) -> None:
    """Containers still running once the kubelet is gone (it could not drain): kill and delete
    their tasks, so no container process outlives `down`."""
    for task in running_tasks(nl):
        for args in (("tasks", "kill", "--signal", "SIGKILL", task), ("tasks", "delete", task)):
            try:
                ctr(nl, *args, timeout=20)
            except (RealNodeError, subprocess.TimeoutExpired):
                time.sleep(0.5)
        progress(f"real node: killed leftover container task {task[:12]}")


def our_shims(nl: rn.NodeLayout) -> list[int]:
    """PIDs of containerd shims started by OUR containerd (their command line names its
    socket); never anyone else's."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and \
                str(nl.containerd_sock).encode() in argv:
            pids.append(int(d.name))
    return pids


def our_mounts(nl: rn.NodeLayout) -> list[str]:
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if any(target == str(r) or target.startswith(str(r) + "/") for r in (nl.dir, nl.run)):
            mounts.append(target)
    return sorted(mounts, key=lambda m: -len(m))


def bridge_exists() -> bool:
    return Path(f"/sys/class/net/{rn.BRIDGE}").exists()


def cleanup_host(nl: rn.NodeLayout, before: dict | None, progress: Progress) -> list[str]:
    """After the kubelet and containerd are stopped: what they may have left behind."""
    done: list[str] = []
    for pid in our_shims(nl):
        try:
            os.kill(pid, 9)
            done.append(f"killed shim {pid}")
        except ProcessLookupError:
            pass
    for m in our_mounts(nl):
        if subprocess.run(["umount", "-l", m], capture_output=True, check=False).returncode == 0:
            done.append(f"unmounted {m}")
    if bridge_exists():
        _run(["ip", "link", "delete", rn.BRIDGE], timeout=30, check=False)
        done.append(f"deleted bridge {rn.BRIDGE}")
    if before:
        done += restore_host(before, progress)
    shutil.rmtree(nl.run, ignore_errors=True)
    shutil.rmtree(nl.cni_ipam_dir, ignore_errors=True)  # pod IP leases of pods now gone
    return done
