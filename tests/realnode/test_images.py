"""`pdctl dev images build` against a running real node: both images are built (or found up to
date by their key), sit in the node's containerd under the names the chart and the operator
render, a second build with nothing changed does nothing, and pods on the real node run them
(`pd-runtime --help`, `pdctl --help`, the SmolLM2 model and NIXL import in the runtime image).

Markers ``realnode`` and ``slow``: the first build is long (torch; see docs/images.md), later
ones take seconds. Runs on the tier's real-node cluster (tests/realnode/conftest.py).
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

from pd_dev.devcluster import cluster
from pd_dev.devcluster import realnode as rn
from pd_dev.devcluster import versions as _v
from pd_dev.images import build, plan

pytestmark = [pytest.mark.realnode, pytest.mark.slow, pytest.mark.timeout(3600)]


def _progress(msg: str) -> None:
    print(f"[images] {msg}", file=sys.__stderr__, flush=True)


@pytest.fixture(scope="module")
def node(real_cluster) -> rn.NodeLayout:
    return build.find_node(real_cluster.dir)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """The checkout's build inputs, copied: edits made meanwhile (other sessions share the
    working tree) cannot change the key between the two builds of the test."""
    root, snap = _v.repo_root(), tmp_path_factory.mktemp("checkout")
    for rel in [*plan.context_files(root), *(s.dockerfile for s in plan.IMAGES.values())]:
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, snap / rel)
    return snap


@pytest.fixture(scope="module")
def built(real_cluster, node: rn.NodeLayout, snapshot: Path) -> list[build.Result]:
    return build.build([], cluster_dir=real_cluster.dir, progress=_progress, root=snapshot)


@pytest.fixture
def core(real_cluster, node: rn.NodeLayout):
    from kubernetes import client

    with cluster.api_client(cluster.layout_for(real_cluster.dir)) as api:
        v1 = client.CoreV1Api(api)
        ns = f"images-{uuid.uuid4().hex[:8]}"
        v1.create_namespace({"metadata": {"name": ns}})
        try:
            yield v1, ns
        finally:
            v1.delete_namespace(ns, grace_period_seconds=0)


def test_images_in_the_node_and_a_rebuild_does_nothing(real_cluster, node: rn.NodeLayout,
                                                       snapshot: Path,
                                                       built: list[build.Result]) -> None:
    assert [r.ref for r in built] == [plan.IMAGES["operator"].ref(),
                                      plan.IMAGES["runtime"].ref()]
    labels = build.node_labels(node)
    for r in built:
        assert labels[r.ref][plan.KEY_LABEL] == r.key
    t0 = time.monotonic()
    again = build.build([], cluster_dir=real_cluster.dir, progress=_progress, root=snapshot)
    assert [(r.ref, r.action, r.key) for r in again] == \
        [(r.ref, "up to date", r.key) for r in built]
    assert time.monotonic() - t0 < 60  # keys and one `ctr images ls`: seconds


def _run_pod(v1, ns: str, image: str, args: list[str], command: list[str] | None = None,
             timeout: float = 240) -> str:
    """Run one container to completion on the real node; its output."""
    name = f"probe-{uuid.uuid4().hex[:6]}"
    container = {"name": "main", "image": image, "imagePullPolicy": "Never", "args": args}
    if command:
        container["command"] = command
    v1.create_namespaced_pod(ns, {
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {rn.REAL_NODE_LABEL: "true"},
            "tolerations": [{"key": rn.REAL_NODE_LABEL, "operator": "Exists",
                             "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
        },
    })
    deadline = time.monotonic() + timeout
    phase = None
    while time.monotonic() < deadline:
        phase = v1.read_namespaced_pod(name, ns).status.phase
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    logs = v1.read_namespaced_pod_log(name, ns) if phase in ("Succeeded", "Failed") else ""
    assert phase == "Succeeded", f"pod {name}: {phase}: {logs[-2000:]}"
    return logs


def test_runtime_image_runs_on_the_real_node(core, built: list[build.Result]) -> None:
    v1, ns = core
    ref = plan.IMAGES["runtime"].ref()
    assert "serve" in _run_pod(v1, ns, ref, ["--help"])
    assert "--port" in _run_pod(v1, ns, ref, ["serve", "--help"])


def test_runtime_image_has_torch_nixl_and_the_model(core, built: list[build.Result]) -> None:
    v1, ns = core
    code = ("import torch, nixl_cu13, pd_runtime.transport; "
            "from pd_runtime.engine.gguf import smollm2_path; print('model', smollm2_path())")
    out = _run_pod(v1, ns, plan.IMAGES["runtime"].ref(), ["-c", code], command=["python3"])
    assert "model /" in out and out.strip().endswith(".gguf")


def test_operator_image_runs_on_the_real_node(core, built: list[build.Result]) -> None:
    v1, ns = core
    out = _run_pod(v1, ns, plan.IMAGES["operator"].ref(), ["--help"])
    assert "operator" in out
    out = _run_pod(v1, ns, plan.IMAGES["operator"].ref(), ["--help"], command=["vllm-router"])
    assert out.strip()
