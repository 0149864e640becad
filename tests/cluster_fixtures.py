"""Pytest plugin: the local Kubernetes control plane for cluster tests.

Registered from tests/conftest.py. Fixtures:

* ``dev_cluster`` (session) - starts the cluster once (``pdctl dev cluster up``: builds the binaries
  if missing) or reuses a running, healthy one; stops it at the end only if it started it.
* ``kubeconfig`` (session) - path of the admin kubeconfig (also exported as ``KUBECONFIG``).
* ``kube_api`` (session) - a ``kubernetes.client.ApiClient`` for it.
* ``namespace`` (function) - a fresh namespace per test (default ServiceAccount present), deleted
  afterwards.
* ``kubectl`` (session) - ``kubectl(*args, input=None, check=True)`` -> CompletedProcess.

Cluster tests (marker ``cluster``) always run; they are skipped only when asked explicitly with
``PD_SKIP_CLUSTER_TESTS=1``. If the cluster can't be built or started, they ERROR (never a
silent skip).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SKIP_ENV = "PD_SKIP_CLUSTER_TESTS"
SKIP_REASON = f"{SKIP_ENV}=1 is set: cluster tests skipped on request"


def _skip_requested() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items) -> None:
    if not _skip_requested():
        return
    mark = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "cluster" in item.keywords:
            item.add_marker(mark)


def _progress(msg: str) -> None:
    # straight to the real stderr: a cold build takes many minutes and must show progress
    print(f"[dev cluster] {msg}", file=sys.__stderr__, flush=True)


@dataclass(frozen=True)
class DevCluster:
    dir: Path
    kubeconfig: Path
    started_here: bool

    def kubectl_path(self) -> str:
        from pd_dev.devcluster import build

        return str(build.binary_path("kubectl"))

    def helm_path(self) -> str:
        from pd_dev.devcluster import build

        return str(build.binary_path("helm"))


@pytest.fixture(scope="session")
def dev_cluster() -> Iterator[DevCluster]:
    if _skip_requested():
        pytest.skip(SKIP_REASON)
    from pd_dev.devcluster import cluster

    layout = cluster.layout_for()
    before = cluster.status(layout.dir, with_nodes=False)
    started_here = not before.any_running
    if not before.ok or not cluster.status(layout.dir).nodes_ready:
        try:
            cluster.up(layout.dir, progress=_progress)
        except BaseException:
            if started_here:  # leave nothing half-started behind
                cluster.down(layout.dir, progress=_progress)
            raise
    else:
        _progress(f"reusing the running cluster in {layout.dir}")
    old_env = {k: os.environ.get(k) for k in ("KUBECONFIG", "NO_PROXY", "no_proxy")}
    os.environ["KUBECONFIG"] = str(layout.kubeconfig)
    for k in ("NO_PROXY", "no_proxy"):
        os.environ[k] = ",".join(x for x in (os.environ.get(k), "127.0.0.1,localhost") if x)
    try:
        yield DevCluster(layout.dir, layout.kubeconfig, started_here)
    finally:
        for k, val in old_env.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val
        if started_here:
            cluster.down(layout.dir, progress=_progress)


@pytest.fixture(scope="session")
def kubeconfig(dev_cluster: DevCluster) -> str:
    return str(dev_cluster.kubeconfig)


@pytest.fixture(scope="session")
def kube_api(dev_cluster: DevCluster):
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(dev_cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


Kubectl = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def kubectl(dev_cluster: DevCluster) -> Kubectl:
    binary = dev_cluster.kubectl_path()

    def run(*args: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [binary, f"--kubeconfig={dev_cluster.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({out.returncode}):\n"
                                 f"{out.stderr}{out.stdout}")
        return out

    return run


def _ns_name(nodeid: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", nodeid.split("::")[-1].lower()).strip("-")[:40]
    return f"t-{base}-{secrets.token_hex(3)}".replace("--", "-")


@pytest.fixture
def namespace(request, kube_api) -> Iterator[str]:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(kube_api)
    name = _ns_name(request.node.nodeid)
    core.create_namespace(
        {"metadata": {"name": name, "labels": {"pd-operator.dev/test": "true"}}}
    )
    # pods are admitted only once the ServiceAccount controller made the default account
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise
