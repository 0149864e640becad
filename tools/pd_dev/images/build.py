"""`pdctl dev images build`: base, images, import, each step skipped when its key matches.

1. The keys (seconds): the staged context's digest, the Dockerfile, the base recipe and the
   build arguments make one key per image. When the real node's containerd already holds the
   image with that key (a label on the image), there is nothing to do and no daemon starts.
2. Otherwise, under a host-wide lock: the base root filesystem (debootstrap, cached as a tar),
   a private dockerd, the base imported, `docker build` (legacy builder, host network; its own
   layer cache makes a source-only change cheap), then `docker save | ctr images import` into
   the node's containerd (namespace k8s.io) and the key put on the image there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pd_dev.devcluster import cluster
from pd_dev.devcluster import realnode as rn
from pd_dev.devcluster import realnode_host as rnh
from pd_dev.devcluster import versions as _v

from . import host, plan, transfer
from .host import ImageBuildError, Progress


@dataclass
class Result:
    name: str
    ref: str
    key: str
    action: str  # "up to date" | "imported" | "built" | "saved"
    seconds: float = 0.0
    size_mib: float | None = None  # docker's size of the image (uncompressed layers)
    tar: Path | None = None  # --no-import: the docker-archive written


def find_node(cluster_dir: Path | None) -> rn.NodeLayout:
    """The real node of the cluster at `cluster_dir` (default: $PD_DEV_CLUSTER_DIR), whose
    containerd must answer; ImageBuildError says how to get one otherwise."""
    layout = cluster.layout_for(cluster_dir)
    state = cluster.State.load(layout)
    hint = (f"no real node is up in {layout.dir}: start one with `pdctl dev cluster up "
            f"--real-node` (or point --dir / PD_DEV_CLUSTER_DIR at a cluster that has one), "
            f"or build without importing: `pdctl dev images build --no-import`")
    if not state.real_node.get("enabled") or "containerd" not in state.procs:
        raise ImageBuildError(hint)
    nl = rn.node_layout(layout.dir)
    try:
        rnh.ctr(nl, "version", timeout=10)
    except (rnh.RealNodeError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"{hint} (its containerd at {nl.containerd_sock} does not "
                              f"answer: {exc})") from exc
    return nl


def node_labels(nl: rn.NodeLayout) -> dict[str, dict[str, str]]:
    return plan.ctr_image_labels(rnh.ctr(nl, "images", "ls", timeout=60))


def stage_context(root: Path, specs: list[plan.ImageSpec]) -> Path:
    """A minimal build context, copied once: the files the Dockerfiles COPY (the legacy builder
    does not read `<name>.Dockerfile.dockerignore`) and the Dockerfiles themselves. The keys
    are computed from this copy, so an edit during the build cannot slip in under an old key."""
    base = host.cache_dir() / "context"
    base.mkdir(parents=True, exist_ok=True)
    ctx = Path(tempfile.mkdtemp(prefix="build-", dir=base))
    for rel in plan.context_files(root):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, ctx / rel)
    for spec in specs:
        shutil.copyfile(root / spec.dockerfile, ctx / Path(spec.dockerfile).name)
    return ctx


def _step_printer(name: str, t0: float, progress: Progress):
    def on_line(line: str) -> None:
        step = plan.parse_step(line)
        if step:
            n, of, what = step
            progress(f"{name}: [{time.monotonic() - t0:5.0f}s] step {n}/{of} {what[:90]}")
    return on_line


def docker_build(p: plan.DockerdPaths, spec: plan.ImageSpec, ctx: Path, key: str,
                 args: dict[str, str], progress: Progress) -> None:
    log = host.cache_dir() / "logs" / f"{spec.name}.log"
    progress(f"{spec.name}: docker build {spec.ref()} (output: {log})")
    t0 = time.monotonic()
    argv = plan.docker_build_argv(host.docker_cli(), p, ctx, ctx / Path(spec.dockerfile).name,
                                  spec.ref(), key, args)
    env = {**_env_without_docker(), "DOCKER_BUILDKIT": "0"}
    before = host.docker_image_id(p, spec.ref())
    host.run_logged(argv, log, f"{spec.name}: docker build", progress,
                    on_line=_step_printer(spec.name, t0, progress), timeout=3600, env=env)
    # The image this tag named before: drop it and its own layers. Not `image prune`: that
    # would also drop the untagged build stages, i.e. the layer cache of the next build.
    if before and before != host.docker_image_id(p, spec.ref()):
        subprocess.run([host.docker_cli(), "--host", p.host, "rmi", before],
                       capture_output=True, timeout=300, check=False)


def _env_without_docker() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}


def import_to_node(p: plan.DockerdPaths, nl: rn.NodeLayout, ref: str, key: str,
                   progress: Progress) -> None:
    """`docker save` -> the node's containerd (namespace k8s.io), sending only the layers it
    lacks when the record of earlier imports says which those are (pd_dev.images.transfer);
    then the key on the image."""
    record_path = host.cache_dir() / "layers.json"
    record = transfer.load_record(record_path)
    layers = json.loads(host.docker(p, "image", "inspect", "--format",
                                    "{{json .RootFS.Layers}}", ref))
    content = set(rnh.ctr(nl, "content", "ls", "-q", timeout=120).split())
    node_has = content & set(layers)
    done: transfer.Transfer | None = None
    if node_has and any(lay.digest in node_has for lay in record.values()):
        spill = host.cache_dir() / f"spill-{os.getpid()}"
        try:
            done = _save_into_ctr(p, nl, ref, lambda src, dst: transfer.delta(
                src, dst, ref, record, node_has, spill))
        except (transfer.DeltaMiss, ImageBuildError) as exc:
            # ImageBuildError: containerd refused the partial archive. Seen once: "failed to
            # prepare extraction snapshot ... parent snapshot ... does not exist" for a layer
            # the archive left out (its blob was in the content store, its snapshot was not
            # there when the unpack reached it). The full archive unpacks every layer itself.
            progress(f"{ref}: importing every layer ({exc})")
        finally:
            shutil.rmtree(spill, ignore_errors=True)
    if done is None:
        done = _save_into_ctr(p, nl, ref, transfer.passthrough)
    progress(f"{ref}: {done.sent / 2**20:.0f} MiB of layers sent, {done.skipped / 2**20:.0f} "
             f"MiB already in the node")
    kept = {k: v for k, v in record.items() if v.digest in content}
    transfer.save_record(record_path, {**kept, **done.layers})
    _label_kept(nl, ref, key)


def _save_into_ctr(p: plan.DockerdPaths, nl: rn.NodeLayout, ref: str,
                   convert: Callable[[IO[bytes], IO[bytes]], transfer.Transfer]
                   ) -> transfer.Transfer:
    """docker save REF | convert | ctr images import -"""
    save = subprocess.Popen([host.docker_cli(), "--host", p.host, "save", ref],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    imp = subprocess.Popen(["ctr", "--address", str(nl.containerd_sock), "--namespace",
                            "k8s.io", "images", "import", "-"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert save.stdout is not None and imp.stdin is not None  # PIPEs were asked for
    try:
        done = convert(save.stdout, imp.stdin)  # communicate() below closes ctr's stdin
    except BaseException:
        save.kill()
        imp.kill()
        save.wait()
        imp.wait()
        raise
    imp_out, imp_err = imp.communicate(timeout=3600)
    save_err = save.stderr.read().decode(errors="replace") if save.stderr else ""
    if save.wait() != 0 or imp.returncode != 0:
        raise ImageBuildError(f"import of {ref} into {nl.containerd_sock} failed: "
                              f"{(save_err + imp_err.decode(errors='replace')).strip()[-2000:]}")
    return done


def _label_kept(nl: rn.NodeLayout, ref: str, key: str, tries: int = 10) -> None:
    """Put the key on the imported image. containerd's CRI plugin updates a new image's labels
    (io.cri-containerd.image=managed) right after the import and can overwrite ours: check."""
    for _ in range(tries):
        rnh.ctr(nl, "images", "label", ref, f"{plan.KEY_LABEL}={key}")
        time.sleep(0.5)
        if node_labels(nl).get(ref, {}).get(plan.KEY_LABEL) == key:
            return
    raise ImageBuildError(f"the label {plan.KEY_LABEL} does not stay on {ref} in "
                          f"{nl.containerd_sock}")


def build(names: list[str], cluster_dir: Path | None = None, do_import: bool = True,
          force: bool = False, overrides: dict[str, str] | None = None,
          progress: Progress = print, root: Path | None = None) -> list[Result]:
    """Build the named images (all when empty) from the checkout at `root` (default: this
    one) and import them into the real node."""
    t_all = time.monotonic()
    specs = plan.select(names)
    nl = find_node(cluster_dir) if do_import else None
    recipe = plan.BaseRecipe(ca_certs=host.host_ca_certs())
    ctx = stage_context(root or _v.repo_root(), specs)
    try:
        digest = plan.digest_files(ctx, plan.context_files(ctx))
        wanted: dict[str, tuple[str, dict[str, str]]] = {}
        for spec in specs:
            args = plan.build_args(spec, recipe.ref(), overrides)
            dockerfile = (ctx / Path(spec.dockerfile).name).read_bytes()
            key = plan.build_key(spec, dockerfile, digest, recipe.key(), args)
            wanted[spec.name] = (key, args)
        results: list[Result] = []
        todo = _not_current(specs, wanted, nl, force, results, progress)
        if todo:
            if os.geteuid() != 0:
                raise ImageBuildError("building images needs root (debootstrap, dockerd)")
            with host.locked(progress):
                host.ensure_build_tools(progress)
                tar = host.base_rootfs(recipe, progress)
                with host.dockerd(progress) as p:
                    host.ensure_base_image(p, recipe, tar, progress)
                    for spec in todo:
                        key, args = wanted[spec.name]
                        results.append(_one(p, spec, ctx, key, args, nl, force, progress))
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    progress(f"images: done in {time.monotonic() - t_all:.1f}s")
    return results


def _not_current(specs: list[plan.ImageSpec], wanted: dict[str, tuple[str, dict[str, str]]],
                 nl: rn.NodeLayout | None, force: bool, results: list[Result],
                 progress: Progress) -> list[plan.ImageSpec]:
    """The images that need work; those already in place are added to `results`."""
    if force:
        return specs
    have = node_labels(nl) if nl is not None else {}
    todo = []
    for spec in specs:
        key = wanted[spec.name][0]
        tar = _tar_path(spec, key)
        if nl is not None and have.get(spec.ref(), {}).get(plan.KEY_LABEL) == key:
            progress(f"{spec.name}: {spec.ref()} is up to date in the real node (key {key[:12]})")
            results.append(Result(spec.name, spec.ref(), key, "up to date"))
        elif nl is None and tar.is_file():
            progress(f"{spec.name}: {tar} is up to date (key {key[:12]})")
            results.append(Result(spec.name, spec.ref(), key, "up to date", tar=tar))
        else:
            todo.append(spec)
    return todo


def _tar_path(spec: plan.ImageSpec, key: str) -> Path:
    return host.cache_dir() / "tars" / f"{spec.name}-{key[:16]}.tar"


def _one(p: plan.DockerdPaths, spec: plan.ImageSpec, ctx: Path, key: str,
         args: dict[str, str], nl: rn.NodeLayout | None, force: bool,
         progress: Progress) -> Result:
    t0 = time.monotonic()
    action = "imported"  # built earlier with this key (docker has it), not in the node yet
    if force or host.docker_label(p, spec.ref()) != key:
        docker_build(p, spec, ctx, key, args, progress)
        action = "built"
    size = host.docker_size_mib(p, spec.ref())
    done = "built" if action == "built" else "found built with this key"
    progress(f"{spec.name}: {spec.ref()} {done} ({size:.0f} MiB) in "
             f"{time.monotonic() - t0:.0f}s")
    if nl is None:
        tar = _tar_path(spec, key)
        tar.parent.mkdir(parents=True, exist_ok=True)
        for old in tar.parent.glob(f"{spec.name}-*.tar"):
            old.unlink()
        host.docker(p, "save", "-o", str(tar), spec.ref(), timeout=3600)
        progress(f"{spec.name}: saved {tar}")
        return Result(spec.name, spec.ref(), key, "saved", time.monotonic() - t0, size, tar)
    t1 = time.monotonic()
    import_to_node(p, nl, spec.ref(), key, progress)
    progress(f"{spec.name}: imported into the real node's containerd (k8s.io) in "
             f"{time.monotonic() - t1:.0f}s")
    return Result(spec.name, spec.ref(), key, action, time.monotonic() - t0, size)
