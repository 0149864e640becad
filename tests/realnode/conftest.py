"""The real-node tier (marker ``realnode``): pods that really run, on the local cluster's real
node (kubelet + containerd beside the kwok fake GPU nodes; docs/real-node.md).

Fixtures:

* ``real_cluster`` (session) - a control plane with its real node in its own directory
  (``PD_REALNODE_TEST_DIR``, default ``~/.cache/pd-operator/clusters/realnode-test``). It records
  the host's footprint first, and after ``down`` fails the session if the host is not as it was
  (processes, bridge, iptables, sysctls, mounts, netns, cgroups): one real node per host, so this
  tier owns it for the session. ``PD_REALNODE_REUSE=1`` reuses a running real-node cluster in that
  directory and leaves it running (development).
* ``real_kubectl`` (session) - ``kubectl(*args, input=None, check=True, timeout=60)``.
* ``real_images`` (session) - `pdctl dev images build` for that cluster: the operator and
  runtime images from deploy/images, imported into the node (seconds when nothing changed; the
  first build on a machine downloads torch: minutes, with progress on stderr).

Needs root (containers, a bridge, iptables); skipped without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REUSE_ENV = "PD_REALNODE_REUSE"


def _progress(msg: str) -> None:
    print(f"[real node] {msg}", file=sys.__stderr__, flush=True)


def pytest_collection_modifyitems(config, items) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.realnode)


@dataclass(frozen=True)
class RealCluster:
    dir: Path
    kubeconfig: Path

    def api(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def cluster_dir() -> Path:
    from pd_dev.devcluster import versions

    env = os.environ.get("PD_REALNODE_TEST_DIR")
    return Path(env) if env else versions.cache_root() / "clusters" / "realnode-test"


@pytest.fixture(scope="session")
def real_cluster() -> Iterator[RealCluster]:
    if os.geteuid() != 0:
        pytest.skip("the real node needs root")
    from pd_dev.devcluster import cluster, processes
    from pd_dev.devcluster import realnode as rn
    from pd_dev.devcluster import realnode_host as rnh

    d = cluster_dir()
    layout = cluster.layout_for(d)
    nl = rn.node_layout(d)
    reuse = os.environ.get(REUSE_ENV) == "1" and cluster.status(d, with_nodes=False).ok
    before = None
    if not reuse:
        if cluster.status(d, with_nodes=False).any_running:
            cluster.down(d, progress=_progress)
        # the footprint lists iptables rules, so the node's packages (iptables among them) go
        # in first, as `up` would install them; packages are not part of what `down` undoes
        rnh.ensure_host_packages(_progress)
        before = rnh.host_footprint(nl)
        try:
            cluster.up(d, node_count=1, gpus_per_node=8, real_node=True, timeout=300,
                       progress=_progress)
        except BaseException:
            cluster.down(d, progress=_progress)
            raise
    state = cluster.State.load(layout)
    try:
        yield RealCluster(d, layout.kubeconfig)
    finally:
        if not reuse:
            cluster.down(d, progress=_progress)
            alive = [n for n in ("containerd", "kubelet", "kube-proxy", "coredns",
                                 "kube-apiserver", "etcd")
                     if (p := state.proc(n)) is not None and processes.alive(p)]
            after = rnh.host_footprint(nl)
            assert not alive, f"still running after down: {alive}"
            assert after == before, _footprint_diff(before or {}, after)


def _footprint_diff(before: dict, after: dict) -> str:
    keys = sorted(set(before) | set(after))
    lines = [f"{k}: before={before.get(k)!r} after={after.get(k)!r}"
             for k in keys if before.get(k) != after.get(k)]
    return "the host changed after down:\n" + "\n".join(lines)


Kubectl = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def real_kubectl(real_cluster: RealCluster) -> Kubectl:
    from pd_dev.devcluster import build

    binary = str(build.binary_path("kubectl"))

    def run(*args: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        out = subprocess.run([binary, f"--kubeconfig={real_cluster.kubeconfig}", *args],
                             input=input, capture_output=True, text=True, timeout=timeout,
                             check=False)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({out.returncode}):\n"
                                 f"{out.stderr}{out.stdout}")
        return out

    return run


@pytest.fixture(scope="session")
def real_images(real_cluster: RealCluster) -> None:
    from tests.helpers import pdctl

    _progress("pdctl dev images build (cached by content)")
    proc = subprocess.run([pdctl(), "dev", "images", "build", "--dir", str(real_cluster.dir)],
                          stdout=sys.__stderr__, stderr=subprocess.STDOUT, timeout=3600,
                          check=False)
    assert proc.returncode == 0, "pdctl dev images build failed (its output is above)"
