"""The shell around `plan`: debootstrap, a private dockerd, `docker build`, and the import into
the real node's containerd. Needs root (debootstrap, dockerd).

The dockerd started here is private: its own data root under the cache, its own socket and
pidfile under /run, no iptables rules, no bridge, no ip_forward; it runs only for the build and
is stopped after. It starts its own containerd child, never the real node's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pd_dev.devcluster import versions as _v

from . import plan

Progress = Callable[[str], None]
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")  # what update-ca-certificates adds
HEARTBEAT_S = 30.0


class ImageBuildError(RuntimeError):
    """An image could not be built or imported, with what to do about it."""


def cache_dir() -> Path:
    return _v.cache_root() / "images"


BUILD_PACKAGES = ("docker.io", "debootstrap")


def ensure_build_tools(progress: Progress) -> None:
    """dockerd, the docker CLI and debootstrap from Debian's apt when missing (no service is
    started by the install: builds start their own private dockerd)."""
    from pd_dev.devcluster import realnode_host as rnh

    have = (shutil.which("dockerd"), shutil.which("debootstrap"), Path("/usr/bin/docker").is_file())
    if all(have):
        return
    try:
        rnh.apt_install(BUILD_PACKAGES, "images", progress)
    except rnh.RealNodeError as exc:
        raise ImageBuildError(str(exc)) from exc


def dockerd_paths() -> plan.DockerdPaths:
    return plan.DockerdPaths(cache_dir() / "docker", Path(f"/run/pd-operator-images-{os.getuid()}"))


def docker_cli() -> str:
    """Debian's docker CLI when present (the same version as its dockerd), else any on PATH."""
    for cand in ("/usr/bin/docker", shutil.which("docker")):
        if cand and Path(cand).is_file():
            return cand
    raise ImageBuildError("no docker CLI: apt-get install docker.io")


def host_ca_certs() -> tuple[tuple[str, bytes], ...]:
    """The extra CA certificates this host trusts (installed by update-ca-certificates)."""
    if not HOST_CA_DIR.is_dir():
        return ()
    return tuple(sorted((p.relative_to(HOST_CA_DIR).as_posix(), p.read_bytes())
                        for p in HOST_CA_DIR.rglob("*.crt") if p.is_file()))


@contextlib.contextmanager
def locked(progress: Progress) -> Iterator[None]:
    """One build at a time on this host (they share the dockerd and its data root)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / "lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"images: waiting for another build on this host ({cache_dir() / 'lock'})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- running things with progress -------------------------------------------------------


def run_logged(argv: list[str], log: Path, what: str, progress: Progress,
               on_line: Callable[[str], None] | None = None, timeout: float = 3600.0,
               stdin=None, env: dict[str, str] | None = None) -> None:
    """Run argv with its output appended to `log`; each line goes to on_line; a heartbeat
    line every HEARTBEAT_S seconds of silence; ImageBuildError with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    lines: queue.Queue[str | None] = queue.Queue()
    with open(log, "a") as lf:
        lf.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n")
        lf.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                text=True, errors="replace", env=env)
        assert proc.stdout is not None  # PIPE was asked for

        def pump() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        last = time.monotonic()
        while True:
            if time.monotonic() - t0 > timeout:
                proc.kill()
                raise ImageBuildError(f"{what}: not done after {timeout:.0f}s; see {log}")
            try:
                line = lines.get(timeout=5.0)
            except queue.Empty:
                if time.monotonic() - last >= HEARTBEAT_S:
                    progress(f"{what}: still running ({time.monotonic() - t0:.0f}s; log {log})")
                    last = time.monotonic()
                continue
            if line is None:
                break
            lf.write(line)
            lf.flush()
            if on_line is not None:
                on_line(line.rstrip("\n"))
                last = time.monotonic()
    rc = proc.wait()
    if rc != 0:
        raise ImageBuildError(f"{what} failed (rc={rc}); the end of {log}:\n{_tail(log)}")


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _run(argv: list[str], timeout: float = 120.0) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv[:5])} failed (rc={out.returncode}): "
                              f"{(out.stderr or out.stdout).strip()[-2000:]}")
    return out.stdout


# ---- the base root filesystem -----------------------------------------------------------


def _unmount_under(top: Path) -> None:
    """debootstrap mounts /proc and /sys in its target; an interrupted run leaves them."""
    top_s = str(top.resolve())
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m == top_s or m.startswith(top_s + "/")),
                    key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, check=False)


def _remove_tree(top: Path) -> None:
    if top.exists():
        _unmount_under(top)
        shutil.rmtree(top)


def base_rootfs(recipe: plan.BaseRecipe, progress: Progress) -> Path:
    """The base root filesystem as a tar, cached by the recipe's key (debootstrap: ~1-2 min)."""
    base = cache_dir() / "base"
    tar = base / f"debian-{recipe.suite}-{recipe.key()[:16]}.tar"
    if tar.is_file():
        return tar
    if os.geteuid() != 0:
        raise ImageBuildError("debootstrap needs root")
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("no debootstrap: apt-get install debootstrap")
    work = base / "rootfs.tmp"
    _remove_tree(work)
    work.mkdir(parents=True)
    log = cache_dir() / "logs" / "base.log"
    t0 = time.monotonic()
    progress(f"base: debootstrap {recipe.variant} {recipe.suite} + {' '.join(recipe.packages)} "
             f"(log {log}) ...")
    try:
        run_logged(recipe.debootstrap_argv(work), log, "base: debootstrap", progress,
                   timeout=1800)
        _add_ca_certs(work, recipe, log, progress)
        for junk in ("var/lib/apt/lists", "var/cache/apt", "var/log"):
            for p in (work / junk).glob("*"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        tmp = tar.with_suffix(".tar.tmp")
        _run(["tar", "--numeric-owner", "--sort=name", "-C", str(work), "-cf", str(tmp), "."],
             timeout=600)
        tmp.replace(tar)
    finally:
        _remove_tree(work)
    progress(f"base: {tar.name} ({tar.stat().st_size / 2**20:.0f} MiB) in "
             f"{time.monotonic() - t0:.0f}s")
    return tar


def _add_ca_certs(root: Path, recipe: plan.BaseRecipe, log: Path, progress: Progress) -> None:
    if not recipe.ca_certs:
        return
    dest = root / "usr/local/share/ca-certificates"
    for name, pem in recipe.ca_certs:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(pem)
    run_logged(["chroot", str(root), "update-ca-certificates"], log,
               "base: update-ca-certificates", progress, timeout=300)


# ---- the private dockerd ----------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_dockerd(pid: int, p: plan.DockerdPaths) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and cmd[0].endswith(b"dockerd") and \
        f"--pidfile={p.pidfile}".encode() in cmd


def _stop_pid(pid: int, timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stop_stale(p: plan.DockerdPaths) -> None:
    """A dockerd of ours left by an interrupted build (its pidfile names it)."""
    try:
        pid = int(p.pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if _is_our_dockerd(pid, p):
        _stop_pid(pid)


# What dockerd 20.10 writes outside its data and exec roots whatever its flags: its trust key
# and the plugin socket directory. Removed after the build when they were not there before.
DOCKERD_LEFTOVERS = (Path("/etc/docker/key.json"), Path("/run/docker/plugins"),
                     Path("/run/docker"))


def _remove_leftovers(existed: dict[Path, bool]) -> None:
    for path in DOCKERD_LEFTOVERS:
        if existed.get(path, True) or not path.exists():
            continue
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()  # a directory only when empty


@contextlib.contextmanager
def dockerd(progress: Progress, timeout: float = 60.0) -> Iterator[plan.DockerdPaths]:
    """A private dockerd for the length of the block; the host as it was after it."""
    if shutil.which("dockerd") is None:
        raise ImageBuildError("no dockerd: apt-get install docker.io (it is not started as a "
                              "service here; builds start their own)")
    p = dockerd_paths()
    p.exec_root.mkdir(parents=True, exist_ok=True)
    p.exec_root.chmod(0o700)
    p.data_root.mkdir(parents=True, exist_ok=True)
    _stop_stale(p)
    existed = {path: path.exists() for path in DOCKERD_LEFTOVERS}
    log = cache_dir() / "logs" / "dockerd.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as lf:
        proc = subprocess.Popen(plan.dockerd_argv(p), stdout=lf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ImageBuildError(f"dockerd exited (rc={proc.returncode}):\n{_tail(log)}")
            ok = subprocess.run([docker_cli(), "--host", p.host, "version"],
                                capture_output=True, timeout=10, check=False).returncode == 0
            if ok:
                break
            if time.monotonic() > deadline:
                raise ImageBuildError(f"dockerd not serving after {timeout:.0f}s; see {log}")
            time.sleep(0.5)
        yield p
    finally:
        _stop_pid(proc.pid)
        with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        _remove_leftovers(existed)
        _remove_tree(p.exec_root)  # its runtime state (and the socket and pidfile) only


def docker(p: plan.DockerdPaths, *args: str, timeout: float = 600.0) -> str:
    return _run([docker_cli(), "--host", p.host, *args], timeout=timeout)


def docker_label(p: plan.DockerdPaths, ref: str) -> str | None:
    """The build key on a local docker image, or None when there is no such image."""
    out = subprocess.run([docker_cli(), "--host", p.host, "image", "inspect", "--format",
                          "{{index .Config.Labels \"" + plan.KEY_LABEL + "\"}}", ref],
                         capture_output=True, text=True, timeout=60, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def docker_image_id(p: plan.DockerdPaths, ref: str) -> str | None:
    out = subprocess.run([docker_cli(), "--host", p.host, "image", "inspect", "--format",
                          "{{.Id}}", ref], capture_output=True, text=True, timeout=60, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def docker_size_mib(p: plan.DockerdPaths, ref: str) -> float:
    return int(docker(p, "image", "inspect", "--format", "{{.Size}}", ref).strip()) / 2**20


def ensure_base_image(p: plan.DockerdPaths, recipe: plan.BaseRecipe, tar: Path,
                      progress: Progress) -> str:
    """`docker import` the base tar (a few seconds) unless the daemon has it already."""
    ref = recipe.ref()
    if docker_label(p, ref) is not None:
        return ref
    t0 = time.monotonic()
    # PATH must be in the image config: the Dockerfiles extend it with ENV PATH=...:$PATH
    changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "ENV LANG=C.UTF-8", 'CMD ["/bin/bash"]']
    docker(p, "import", *[a for c in changes for a in ("--change", c)], str(tar), ref)
    progress(f"base: imported as {ref} in {time.monotonic() - t0:.1f}s")
    return ref
