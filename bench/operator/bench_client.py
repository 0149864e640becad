"""The operator's own API client (pd_operator.kube, aiohttp) beside lightkube's AsyncClient, on
the work the operator gives it: server-side apply of the 15 rendered children of one
PDDeployment, one after another and 8 at a time (the operator's --apply-concurrency), against
the same API server in the same run; plus what each costs the process (import time, memory) and
the image (packages it adds). Prints a table and writes JSON.

    pip install lightkube   # not an operator dependency; only this benchmark imports it
    python bench/operator/bench_client.py [--kubeconfig K] [--rounds 30]

lightkube's rows include its dict <-> model conversion (codecs.from_dict before the request,
.to_dict() of the answer): the operator renders dicts and reads dicts back (drift checks,
status), so that is the work a move would add.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from pd_operator import kube  # noqa: E402
from pd_operator.render import Owner, render  # noqa: E402
from pd_operator.validate import parse_spec, validate_spec  # noqa: E402

NS = f"pd-bench-client-{time.strftime('%H%M%S')}"
OUT = Path(__file__).resolve().parent / "client.json"
# What the operator process imports anyway (kopf brings aiohttp; the webhook server uses it).
OPERATOR_BASE = "import kopf, aiohttp"
IMPORT_PROBES = {  # imported after OPERATOR_BASE: the cost a client adds to the operator
    "pd_operator.kube": "import pd_operator.kube",
    "lightkube": "import lightkube, lightkube.codecs, lightkube.resources.apps_v1, "
                 "lightkube.resources.core_v1",
}


def children(name: str) -> list[dict[str, Any]]:
    spec = validate_spec(parse_spec(common.small(name, NS)["spec"]))
    return render(Owner(name, NS, "00000000-0000-0000-0000-000000000000"), spec).children


async def bounded(coros: list[Any], concurrency: int) -> list[Any]:
    slots = asyncio.Semaphore(concurrency)

    async def one(c: Any) -> Any:
        async with slots:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))


class OwnClient:
    label = "pd_operator.kube"

    def __init__(self, kc: str):
        self.client = kube.Client(kube.Credentials.load(kc), limit=32)

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await self.client.apply(obj)

    async def close(self) -> None:
        await self.client.close()


class Lightkube:
    label = "lightkube"

    def __init__(self, kc: str):
        from lightkube import AsyncClient, KubeConfig, codecs

        self.codecs = codecs
        self.client = AsyncClient(config=KubeConfig.from_file(kc),
                                  field_manager=kube.FIELD_MANAGER)

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        res = await self.client.apply(self.codecs.from_dict(obj), force=True)
        return res.to_dict()  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self.client.close()


async def apply_rounds(kc: str, objs: list[dict[str, Any]], rounds: int,
                       concurrency: int) -> dict[str, list[float]]:
    """Seconds per round (all children applied) for each client; the clients take turns, in
    alternating order, so that drift of the machine or the API server hits both alike."""
    clients = [OwnClient(kc), Lightkube(kc)]
    times: dict[str, list[float]] = {c.label: [] for c in clients}
    try:
        for c in clients:  # warm: connections, and the objects exist from here on
            await bounded([c.apply(o) for o in objs], concurrency)
        await asyncio.sleep(5)  # let the controllers settle after the objects were created
        for i in range(rounds):
            for c in clients if i % 2 == 0 else clients[::-1]:
                t = time.perf_counter()
                results = await bounded([c.apply(o) for o in objs], concurrency)
                times[c.label].append(time.perf_counter() - t)
                assert all(r["metadata"]["name"] for r in results)
        return times
    finally:
        for c in clients:
            await c.close()


def import_cost(stmt: str) -> dict[str, float]:
    """Seconds to import `stmt` after OPERATOR_BASE, and resident memory (MiB, VmRSS) then, in
    a fresh interpreter."""
    code = ("import re, time; " + OPERATOR_BASE + "; t = time.perf_counter(); " + stmt +
            "; dt = time.perf_counter() - t; "
            "rss = re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()); "
            "print(dt, int(rss.group(1)) / 1024)")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(5)]
    return {"import_s": statistics.median(float(r[0]) for r in runs),
            "rss_mib": statistics.median(float(r[1]) for r in runs)}


def added_packages() -> dict[str, float]:
    """Installed size (MiB) of what lightkube needs that the operator does not have already."""
    out: dict[str, float] = {}
    for name in ("lightkube", "lightkube-models", "httpx2", "httpcore", "msgspec"):
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            continue
        out[name] = round(sum(f.size or 0 for f in files if f.size) / 2**20, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    kc = common.kubeconfig(args.kubeconfig)
    common.kubectl(kc, "create", "namespace", NS)
    objs = children("bench")
    rows: dict[str, Any] = {}
    try:
        for concurrency in (1, 8):
            by_client = asyncio.run(apply_rounds(kc, objs, args.rounds, concurrency))
            for label, times in by_client.items():
                rows.setdefault(label, {})[f"apply15_c{concurrency}_ms"] = {
                    "median": round(statistics.median(times) * 1e3, 1),
                    "p90": round(common.percentile(times, 0.9) * 1e3, 1)}
        bare = import_cost("pass")
        for label, stmt in IMPORT_PROBES.items():
            cost = import_cost(stmt)
            rows[label].update(import_added_s=round(cost["import_s"], 3),
                               rss_added_mib=round(cost["rss_mib"] - bare["rss_mib"], 1))
    finally:
        common.kubectl(kc, "delete", "namespace", NS, "--wait=false", check=False)
    result = {"machine": common.machine(), "rounds": args.rounds, "children": len(objs),
              "clients": rows, "lightkube_adds_mib": added_packages()}
    own, lk = rows["pd_operator.kube"], rows["lightkube"]
    print(f"{'':28}{'pd_operator.kube':>18}{'lightkube':>12}{'ratio':>8}")
    for key in ("apply15_c1_ms", "apply15_c8_ms"):
        a, b = own[key]["median"], lk[key]["median"]
        print(f"{key + ' (median)':28}{a:>18.1f}{b:>12.1f}{b / a:>8.2f}")
    for key in ("import_added_s", "rss_added_mib"):
        ratio = lk[key] / own[key] if own[key] else float("nan")
        print(f"{key:28}{own[key]:>18.3f}{lk[key]:>12.3f}{ratio:>8.2f}")
    print("packages lightkube adds (MiB):", json.dumps(result["lightkube_adds_mib"]))
    common.write_json(OUT, result)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
