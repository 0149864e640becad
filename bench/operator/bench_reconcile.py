"""Reconcile cost: N PDDeployments (default 200) created at once, time until every one is Ready,
next to the time `kubectl apply --server-side` takes for the same rendered children (ownerless,
in another namespace) in the same run; also how long those plain children take until their
StatefulSets/Deployments are ready (the like-for-like baseline), and the operator's peak memory.
Prints a table and writes JSON.

    python bench/operator/bench_reconcile.py [--kubeconfig K] [--count 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from pd_dev.devcluster import nodes  # noqa: E402
from pd_operator import kube  # noqa: E402
from pd_operator.render import Owner, render  # noqa: E402
from pd_operator.validate import parse_spec, validate_spec  # noqa: E402

RUN = time.strftime("%H%M%S")
BASE_NS = f"pd-bench-baseline-{RUN}"  # unique per run: a namespace takes minutes to delete
OP_NS = f"pd-bench-reconcile-{RUN}"
NODE_LABEL = "pd-operator.dev/bench-node"


def _bench_nodes(count: int) -> list[dict]:
    out = []
    for i in range(count):
        spec = nodes.NodeSpec(f"pd-bench-{i}", "NVIDIA-H100-80GB-HBM3", 81559,
                              nodes.ZONES[i % 2], 128)
        obj = nodes.node_object(spec, pods="256")
        obj["metadata"]["labels"][NODE_LABEL] = "true"
        out.append(obj)
    return out


def _workloads_ready(kc: str, ns: str, expected: int) -> bool:
    items = json.loads(common.kubectl(kc, "get", "statefulsets,deployments", "-n", ns, "-o",
                                      "json").stdout)["items"]
    ready = [i for i in items if (i.get("status") or {}).get("readyReplicas", 0)
             == i["spec"]["replicas"]]
    return len(items) == expected and len(ready) == expected


def _ns_gone(kc: str, ns: str) -> bool:
    return common.kubectl(kc, "get", "namespace", ns, check=False).returncode != 0


async def _create_all(client: kube.Client, docs: list[dict], conc: int = 50) -> None:
    sem = asyncio.Semaphore(conc)

    async def one(d: dict) -> None:
        async with sem:
            await client.create(d)
    await asyncio.gather(*(one(d) for d in docs))


async def _all_ready(client: kube.Client, ns: str, n: int) -> int:
    items = await client.list("serving.pd-operator.dev/v1alpha1", "PDDeployment", ns)
    return sum(1 for i in items if (i.get("status") or {}).get("phase") == "Ready"
               and (i.get("status") or {}).get("observedGeneration")
               == i["metadata"].get("generation"))


def baseline(kc: str, count: int, timeout: float) -> dict:
    common.kubectl(kc, "create", "namespace", BASE_NS, check=False)
    items = []
    for i in range(count):
        doc = common.small(f"pdd-{i:03d}", BASE_NS)
        for child in render(Owner(doc["metadata"]["name"], BASE_NS, "00000000-bench"),
                            validate_spec(parse_spec(doc["spec"]))).children:
            child["metadata"].pop("ownerReferences", None)
            items.append(child)
    path = Path(tempfile.mkdtemp(prefix="pd-bench-")) / "children.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    workloads = sum(1 for c in items if c["kind"] in ("StatefulSet", "Deployment"))
    t0 = time.monotonic()
    common.kubectl(kc, "apply", "--server-side", "--field-manager=bench", "-f", str(path),
                   timeout=timeout)
    t_apply = time.monotonic() - t0
    print(f"  baseline: kubectl apply --server-side of {len(items)} objects: {t_apply:.1f}s",
          file=sys.stderr, flush=True)
    common.wait("baseline workloads ready", lambda: _workloads_ready(kc, BASE_NS, workloads),
                timeout, every=1)
    t_ready = time.monotonic() - t0
    print(f"  baseline: workloads ready after {t_ready:.1f}s", file=sys.stderr, flush=True)
    # kept until the end: deleting it now would load the API server during the operator run
    return {"objects": len(items), "kubectl_apply_s": round(t_apply, 2),
            "kubectl_apply_until_workloads_ready_s": round(t_ready, 2)}


async def operator_run(kc: str, count: int, timeout: float) -> dict:
    common.kubectl(kc, "create", "namespace", OP_NS, check=False)
    log = Path(tempfile.mkdtemp(prefix="pd-bench-")) / "operator.log"
    op = common.OperatorProcess(kc, [OP_NS], log)
    client = kube.Client(kube.Credentials.load(kc), limit=64)
    try:
        probe = common.small("probe", OP_NS)
        probe["spec"]["prefill"]["tensorParallelSize"] = 3
        probe["spec"]["decode"]["tensorParallelSize"] = 2

        def hooked() -> bool:
            out = common.kubectl(kc, "create", "--dry-run=server", "-f", "-",
                                 input=json.dumps(probe), check=False)
            return out.returncode != 0 and "TP-DIVISIBLE" in out.stderr
        common.wait("webhook", hooked, 120)
        docs = [common.small(f"pdd-{i:03d}", OP_NS) for i in range(count)]
        t0 = time.monotonic()
        await _create_all(client, docs)
        t_created = time.monotonic() - t0
        last = -1
        while True:
            n = await _all_ready(client, OP_NS, count)
            if n != last:
                print(f"  operator: {n}/{count} Ready at {time.monotonic() - t0:.1f}s",
                      file=sys.stderr, flush=True)
                last = n
            if n == count:
                break
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"only {n}/{count} Ready after {timeout}s (log: {log})")
            await asyncio.sleep(1)
        t_ready = time.monotonic() - t0
        rss = op.peak_rss_mib()
    finally:
        await client.close()
        op.stop()
        for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
            common.kubectl(kc, "delete", kind, op.config_name, "--ignore-not-found",
                           check=False)
    return {"create_s": round(t_created, 2), "all_ready_s": round(t_ready, 2),
            "operator_peak_rss_mib": round(rss, 1), "log": str(log)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kubeconfig")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--json", default=str(Path(__file__).parent / "reconcile.json"))
    args = ap.parse_args()
    kc = common.kubeconfig(args.kubeconfig)
    info = common.machine()
    common.kubectl(kc, "apply", "--server-side", "--force-conflicts", "-f",
                   str(common.REPO / "crds" / "pddeployment.yaml"))
    # both runs' pods stay until the end: 2 x count x 2 GPUs, 2 x count x 3 pods
    bench_nodes = _bench_nodes(max(2, (4 * args.count) // 128 + 1))
    common.kubectl(kc, "apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": bench_nodes}))
    common.kubectl(kc, "wait", "--for=condition=Ready", "--timeout=120s",
                   *[f"node/{n['metadata']['name']}" for n in bench_nodes])
    try:
        base = baseline(kc, args.count, args.timeout)
        oper = asyncio.run(operator_run(kc, args.count, args.timeout))
    finally:
        for ns in (BASE_NS, OP_NS):
            common.kubectl(kc, "delete", "namespace", ns, "--wait=false", check=False)
        common.kubectl(kc, "delete", "nodes", "-l", f"{NODE_LABEL}=true", "--wait=false",
                       check=False)
    out = {
        "benchmark": "reconcile", "machine": info, "count": args.count,
        "baseline": base, "operator": oper,
        "ratio_vs_kubectl_apply": round(oper["all_ready_s"] / base["kubectl_apply_s"], 2),
        "ratio_vs_kubectl_apply_until_ready":
            round(oper["all_ready_s"] / base["kubectl_apply_until_workloads_ready_s"], 2),
        "target": "ratio <= 1.5, operator memory < 400 MB",
    }
    print(f"{'PDDeployments':>13} {'objects':>8} {'kubectl apply':>14} {'+ready':>8} "
          f"{'operator Ready':>15} {'ratio':>6} {'ratio(ready)':>13} {'peak RSS':>9}")
    print(f"{args.count:>13} {base['objects']:>8} {base['kubectl_apply_s']:>13}s "
          f"{base['kubectl_apply_until_workloads_ready_s']:>7}s {oper['all_ready_s']:>14}s "
          f"{out['ratio_vs_kubectl_apply']:>6} {out['ratio_vs_kubectl_apply_until_ready']:>13} "
          f"{oper['operator_peak_rss_mib']:>6} MiB")
    common.write_json(Path(args.json), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
