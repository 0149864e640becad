"""Admission cost: server-side dry-run creates of a PDDeployment through the API server with the
operator's webhooks (mutating + validating, served by `pdctl operator run --local-webhook`), next
to the same creates with the webhook configurations removed, in one run, at 1, 10 and 50
concurrent clients. Rounds alternate (with, without, with, without) so load drift on a shared
machine hits both sides alike. Prints a table and writes JSON.

    python bench/operator/bench_admission.py [--kubeconfig K] [--requests 200]
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

from pd_operator import kube  # noqa: E402

NS = f"pd-bench-admission-{time.strftime('%H%M%S')}"  # unique: deletion takes a while
CONCURRENCY = (1, 10, 50)


async def _run(client: kube.Client, doc: dict, n: int, conc: int) -> list[float]:
    lat: list[float] = []
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            queue.pop()
            t = time.perf_counter()
            await client.create(doc, dry_run=True)
            lat.append(time.perf_counter() - t)
    await asyncio.gather(*(worker() for _ in range(conc)))
    return lat


def _server_side(op: common.OperatorProcess) -> dict:
    """The operator's own view: time inside the webhook handler (JSON in to JSON out), from
    its histogram; mean and the bucket bound holding the 99th percentile."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics").read().decode()
    out = {}
    for hook in ("validate", "mutate"):
        buckets, count, total = [], 0.0, 0.0
        for line in text.splitlines():
            if f'webhook="{hook}"' not in line:
                continue
            value = float(line.rsplit(" ", 1)[1])
            if line.startswith("pd_operator_webhook_duration_seconds_bucket"):
                le = line.split('le="')[1].split('"')[0]
                buckets.append((float(le), value))
            elif line.startswith("pd_operator_webhook_duration_seconds_count"):
                count = value
            elif line.startswith("pd_operator_webhook_duration_seconds_sum"):
                total = value
        p99 = next((le for le, c in sorted(buckets) if count and c >= 0.99 * count), None)
        out[hook] = {"reviews": int(count), "mean_ms": round(1000 * total / count, 3)
                     if count else None, "p99_bucket_le_ms": p99 and 1000 * p99}
    return out


def _webhook_called(kc: str) -> bool:
    bad = common.small("probe", NS)
    bad["spec"]["prefill"]["tensorParallelSize"] = 3
    bad["spec"]["decode"]["tensorParallelSize"] = 2
    out = common.kubectl(kc, "create", "--dry-run=server", "-f", "-", input=json.dumps(bad),
                         check=False)
    return out.returncode != 0 and "TP-DIVISIBLE" in out.stderr


async def main_async(args: argparse.Namespace) -> dict:
    kc = common.kubeconfig(args.kubeconfig)
    common.kubectl(kc, "apply", "--server-side", "--force-conflicts", "-f",
                   str(common.REPO / "crds" / "pddeployment.yaml"))
    common.kubectl(kc, "create", "namespace", NS, check=False)
    log = Path(tempfile.mkdtemp(prefix="pd-bench-")) / "operator.log"
    op = common.OperatorProcess(kc, [NS], log)
    results: dict[str, dict[int, list[float]]] = {"with": {}, "without": {}}
    client = kube.Client(kube.Credentials.load(kc), limit=100)
    try:
        common.wait("webhook", lambda: _webhook_called(kc), 120)
        configs = [json.loads(common.kubectl(kc, "get", kind, op.config_name, "-o",
                                             "json").stdout)
                   for kind in ("validatingwebhookconfiguration",
                                "mutatingwebhookconfiguration")]
        for c in configs:
            for k in ("resourceVersion", "uid", "creationTimestamp", "managedFields",
                      "generation"):
                c["metadata"].pop(k, None)
        doc = common.small("bench", NS)
        if args.explicit:  # as stored objects are: the mutating webhook's matchCondition skips it
            from pd_operator.webhook import review
            for op_ in review.defaults_patch(doc["spec"]):
                node = doc
                parts = op_["path"].strip("/").split("/")
                for p in parts[:-1]:
                    node = node[p]
                node[parts[-1]] = op_["value"]
        for c in CONCURRENCY:  # warm-up: connections, caches
            await _run(client, doc, min(50, args.requests), c)
        for mode in ("with", "without", "with", "without"):
            if mode == "without":
                for c in configs:
                    common.kubectl(kc, "delete", c["kind"].lower(), op.config_name)
                common.wait("webhook gone", lambda: not _webhook_called(kc), 60)
            else:
                common.kubectl(kc, "apply", "-f", "-", input=json.dumps(
                    {"apiVersion": "v1", "kind": "List", "items": configs}))
                common.wait("webhook back", lambda: _webhook_called(kc), 60)
            for c in CONCURRENCY:
                n = max(args.requests // 2, c * 4)
                lat = await _run(client, doc, n, c)
                results[mode].setdefault(c, []).extend(lat)
                print(f"  {mode:8s} c={c:3d} n={n}: p50 {1000 * common.percentile(lat, .5):.1f}"
                      f" ms", file=sys.stderr, flush=True)
        server_side = _server_side(op)
    finally:
        await client.close()
        op.stop()
        for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
            common.kubectl(kc, "delete", kind, op.config_name, "--ignore-not-found",
                           check=False)
        common.kubectl(kc, "delete", "namespace", NS, "--wait=false", check=False)
    rows = []
    for c in CONCURRENCY:
        w, wo = results["with"][c], results["without"][c]
        row = {"clients": c, "requests_each": len(w)}
        for q, label in ((.5, "p50"), (.99, "p99")):
            a, b = 1000 * common.percentile(w, q), 1000 * common.percentile(wo, q)
            row[f"{label}_with_ms"] = round(a, 2)
            row[f"{label}_without_ms"] = round(b, 2)
            row[f"{label}_added_ms"] = round(a - b, 2)
        rows.append(row)
    return {"benchmark": "admission", "machine": common.machine(), "rows": rows,
            "document": "explicit (defaults already set)" if args.explicit
            else "defaults missing (mutating webhook called)",
            "webhook_handler_time": server_side,
            "target": "p99 added <= 10 ms at 10 clients"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kubeconfig")
    ap.add_argument("--requests", type=int, default=400,
                    help="requests per concurrency level and mode (split over two rounds)")
    ap.add_argument("--explicit", action="store_true",
                    help="create a spec whose defaults are already set (as stored objects, "
                    "and every update of them, are): the mutating webhook is not called")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = asyncio.run(main_async(args))
    print(f"{'clients':>7} {'p50 with':>9} {'p50 w/o':>8} {'added':>7} "
          f"{'p99 with':>9} {'p99 w/o':>8} {'added':>7}   (ms)")
    for r in out["rows"]:
        print(f"{r['clients']:>7} {r['p50_with_ms']:>9} {r['p50_without_ms']:>8} "
              f"{r['p50_added_ms']:>7} {r['p99_with_ms']:>9} {r['p99_without_ms']:>8} "
              f"{r['p99_added_ms']:>7}")
    print(f"inside the webhook handler: {json.dumps(out['webhook_handler_time'])}")
    default = "admission_explicit.json" if args.explicit else "admission.json"
    common.write_json(Path(args.json or Path(__file__).parent / default), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
