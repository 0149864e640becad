"""D's block-table upload on CUDA: the pinned path (kernels/kvcopy.upload_all) against a plain
copy from pageable memory, per table size, with the stream idle and with engine work queued.

H200 run of 2026-12-02 (docs/performance.md, "The host path"): D's plan at 64 blocks grew
159 -> 265 µs when the upload moved to the pinned buffer. This bench times the upload alone
(host wall time of the call, then of the call plus waiting for the copy), both paths alternating
call by call, so the small-table cost can be split from the rest of D's plan. "busy" queues
`--busy-us` of device work (torch.cuda._sleep) on the stream first, as the engine's decode step
does in serving: a copy from pageable memory waits for it, a pinned one is queued behind it.
"busy-own" queues that work on the engine's (default) stream and uploads on a stream of its own
at the highest priority, as D does since its transfer kernels got their own stream
(kernels/kvcopy.transfer_stream).

    python bench/transfer/bench_upload.py --out bench/transfer/results/h200_upload.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from pd_runtime.kernels.kvcopy import HDR, _headed, upload_all
from pd_runtime.template import Dyn


def pageable(device: torch.device, items: list[tuple[Dyn, int]]) -> list[torch.Tensor]:
    """The baseline: each table built in pageable memory and copied with a plain .to()."""
    out = []
    for dyn, lin_add in items:
        host = np.empty(HDR + dyn.tables.size, np.int64)
        _headed(dyn, lin_add, host)
        out.append(torch.from_numpy(host).to(device))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="64,512,2048")
    ap.add_argument("--peers", type=int, default=1, help="tables uploaded per call")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--busy-us", type=int, default=2000)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    dev = torch.device("cuda")
    cycles = a.busy_us * 1980  # _sleep counts SM clock cycles: the H200's 1980 MHz at most
    rng = np.random.default_rng(0)
    own = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1])  # type: ignore[call-arg]
    rows = []
    for nb in [int(x) for x in a.blocks.split(",")]:
        items = [(Dyn(nb * 16, 0, 0, 0, 0, rng.permutation(4 * nb).astype(np.int64)[:nb]), 0)
                 for _ in range(a.peers)]
        for load in ("idle", "busy", "busy-own"):
            t_call: dict[str, list[float]] = {"pinned": [], "pageable": []}
            t_done: dict[str, list[float]] = {"pinned": [], "pageable": []}
            for i in range(a.reps + 10):
                order = ("pinned", "pageable") if i % 2 == 0 else ("pageable", "pinned")
                for path in order:
                    torch.cuda.synchronize()
                    if load != "idle":
                        torch.cuda._sleep(cycles)
                    with torch.cuda.stream(own if load == "busy-own" else
                                           torch.cuda.current_stream()):
                        t0 = time.perf_counter()
                        bts = (upload_all if path == "pinned" else pageable)(dev, items)
                        t1 = time.perf_counter()
                        ev = torch.cuda.Event()
                        ev.record()
                        ev.synchronize()
                        t2 = time.perf_counter()
                    if i >= 10:
                        t_call[path].append(t1 - t0)
                        t_done[path].append(t2 - t0)
                    del bts
            for path in ("pinned", "pageable"):
                row = {"blocks": nb, "peers": a.peers, "load": load, "path": path,
                       "call_us_median": round(statistics.median(t_call[path]) * 1e6, 1),
                       "call_us_p90": round(np.percentile(t_call[path], 90) * 1e6, 1),
                       "done_us_median": round(statistics.median(t_done[path]) * 1e6, 1)}
                rows.append(row)
                print(f"{nb:5d} blocks x{a.peers} {load:8s} {path:8s} call "
                      f"{row['call_us_median']:8.1f} us (p90 {row['call_us_p90']:8.1f})  "
                      f"call+copy {row['done_us_median']:8.1f} us", flush=True)
    res = {"bench": "upload", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "busy_us": a.busy_us, "reps": a.reps, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, separators=(",", ":"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
