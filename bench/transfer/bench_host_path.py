"""Per-pull host overhead of the KV transfer, the previous path and the current one in one run.

P (one process) and D (this process) each run two ranks: the *baseline* package (the transfer
engine as of a baseline commit, imported under the name `pd_runtime_base`) and the current
`pd_runtime`. Pulls alternate between the two (the order flips every round), so both see the
same machine load. Per pull it records the wall time and its parts:

    d_plan        D's table checks, packing and upload (plan_seconds - P's plan); a path that
                  uploads while P answers counts the upload in rpc too (then `other` < 0)
    rpc           PREPARE round trip minus P's plan and gather (frames, HMAC, TCP, wake-ups,
                  P's lease and table check)
    p_plan        P's template lookup, table check and slot (as P reports it)
    gather        P's gather kernel + its wait (as P reports it)
    read_post     posting the READ(s); read_wait: waiting for them (bytes included)
    scatter_run   D's scatter call (launch on CUDA; the copy itself on CPU); scatter_wait
    notif         release notifications; other: the rest of the wall time
    d_upload      D's table upload call alone (inside d_plan, and inside rpc where it overlaps)
    host          the issue's definition: wall - (gather + READ + scatter)
    p_hold        P's hold() of the request (outside the pull; tables are packed there, and a
                  P that gathers at hold() launches the gather there)

Between hold() and the pull the bench pauses --hold-gap-ms, untimed: in serving P's answer
goes through the router to D first.

The baseline source comes from `git archive <commit>` here, or from a tarball made with
`--pack-baseline` (for a machine without the repository's history). Raw JSON goes to --out.

    python bench/transfer/bench_host_path.py --device cpu --out bench/transfer/results/x.json
    python bench/transfer/bench_host_path.py --pack-baseline COMMIT   # .device-wheels/...tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "runtime"))
BASE_PKG = "pd_runtime_base"
BASE_TAR = os.path.join(ROOT, ".device-wheels", "pd_runtime_host_path_baseline.tar.gz")
# what the transfer engine imports (the engine, serving and selftest stay out of the baseline)
BASE_FILES = ["__init__.py", "worker.py", "handshake.py", "protocol.py", "transport.py",
              "template.py", "lease.py", "planner.py", "kvcache.py", "capabilities.py", "kernels",
              "compat", "switches.py"]
GEOMETRIES = {
    "llama8b": dict(num_layers=32, num_kv_heads=8, head_size=128),  # 128 KiB per token (bf16)
    "tiny": dict(num_layers=1, num_kv_heads=1, head_size=8),  # 32 B per token: host work only
}
PARTS = ["wall", "host", "d_plan", "rpc", "p_plan", "gather", "read_post", "read_wait",
         "scatter_run", "scatter_wait", "notif", "other"]
# timed beside the parts (0 when not probed)
EXTRA = ["d_upload", "pre_read_event", "pre_event", "scatter_rerun"]


def pack_baseline(commit: str, path: str = BASE_TAR) -> str:
    """The baseline package (as `pd_runtime_base/`) from `commit`, as a tarball."""
    raw = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", commit,
                          "runtime/pd_runtime"], check=True, capture_output=True).stdout
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, \
            tarfile.open(fileobj=buf, mode="w:gz") as dst:
        for m in src.getmembers():
            rel = m.name.removeprefix("runtime/pd_runtime/")
            if not m.isfile() or rel.split("/")[0] not in BASE_FILES:
                continue
            data = src.extractfile(m)
            m.name = f"{BASE_PKG}/{rel}"
            dst.addfile(m, data)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    with open(path + ".commit", "w") as f:
        f.write(subprocess.run(["git", "-C", ROOT, "rev-parse", commit], check=True,
                               capture_output=True, text=True).stdout)
    return path


def unpack_baseline(tar: str, dest: str) -> None:
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    sys.path.insert(0, dest)


def packages(base_dir: str | None) -> dict[str, str]:
    """mode -> package name; the baseline only when its source was found."""
    return {"base": BASE_PKG, "new": "pd_runtime"} if base_dir else {"new": "pd_runtime"}


def mods(pkg: str):
    g = lambda m: importlib.import_module(f"{pkg}.{m}")  # noqa: E731
    return g("worker"), g("kvcache"), g("planner"), g("compat.hashing"), g("kernels.kvcopy")


def specs(pkg: str, geo: str, max_blocks: int):
    _, kv, _, hashing, _ = mods(pkg)
    m = kv.ModelSpec(**GEOMETRIES[geo])
    nb = max_blocks + max_blocks // 4 + 1
    p = kv.RankSpec(m, 1, 0, 16, "HND", nb)
    d = kv.RankSpec(m, 1, 0, 16, "HND", nb)
    f = hashing.builtin_factors(runtime_version="bench", model="bench", dtype="bfloat16",
                                num_kv_heads=m.num_kv_heads, head_size=m.head_size,
                                num_hidden_layers=m.num_layers, cache_dtype="auto", family="dense")
    return p, d, f


def tables(n_blocks: int, total: int, seed: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return ([int(x) for x in rng.permutation(total)[:n_blocks]],
            [int(x) for x in rng.permutation(total)[:n_blocks]])


# ------------------------------------------------------------------------------------------------
# P


def _prefill_proc(base_dir, geo, device, max_blocks, conn, modes):
    if base_dir:
        sys.path.insert(0, base_dir)
    if device == "cpu":
        torch.set_num_threads(1)  # two cores, shared: no intra-op thread pool fighting for them
    pkgs = {m: pkg for m, pkg in packages(base_dir).items() if m in modes}
    ranks = {}
    arena = None
    for mode, pkg in pkgs.items():
        worker, kv = mods(pkg)[:2]
        p, _, f = specs(pkg, geo, max_blocks)
        nb = kv.arena_layout(p).nbytes
        if arena is None:  # one arena for both ranks: the same bytes behind both paths
            torch.manual_seed(7)
            arena = torch.randint(0, 256, (nb,), dtype=torch.uint8, device=device)
        # two slots of the largest pull: the poller frees one while the next pull uses the other
        ranks[mode] = worker.PrefillRank(p, f, b"bench", device, staging_bytes=2 * nb + (8 << 20),
                                         lease_s=600, arena=arena)
    conn.send({m: list(r.address) for m, r in ranks.items()})
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
        mode, rid, nbk = msg
        pkg = pkgs[mode]
        planner = mods(pkg)[2]
        p, _, _ = specs(pkg, geo, max_blocks)
        pt, _ = tables(nbk, p.num_blocks, nbk)
        req = planner.Request(nbk * 16, {0: pt})
        t0 = time.perf_counter()
        ranks[mode].hold(rid, req)  # P's own per-request cost (the new path packs here)
        conn.send(time.perf_counter() - t0)
    for r in ranks.values():
        r.close()


# ------------------------------------------------------------------------------------------------
# D


class _Timer:
    """Seconds spent in wrapped calls since the last reset (same wrappers on both paths)."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.replies: list = []

    def wrap(self, key: str, fn, capture: bool = False):
        def w(*a, **k):
            t0 = time.perf_counter()
            try:
                r = fn(*a, **k)
            finally:
                self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0
            if capture:
                self.replies.extend(r.values())
            return r
        return w

    def reset(self) -> None:
        self.t.clear()
        self.replies.clear()


def _probed_run(timer: _Timer, run, sleep_us: float = 0.0):
    """D's scatter call, probed (a diagnostic, --probe-scatter): after `sleep_us` of busy
    waiting (untimed), an event recorded on the stream (`pre_event`: does the first CUDA call
    after the READ absorb the cost?), the call (`scatter_run`), then the same call again
    (`scatter_rerun`: it writes the same bytes)."""
    def w(self, *a, **k):
        until = time.perf_counter() + sleep_us / 1e6
        while time.perf_counter() < until:
            pass
        t0 = time.perf_counter()
        torch.cuda.Event().record(torch.cuda.current_stream(self.device))
        t1 = time.perf_counter()
        r = run(self, *a, **k)
        t2 = time.perf_counter()
        run(self, *a, **k)
        t3 = time.perf_counter()
        for key, dt in (("pre_event", t1 - t0), ("scatter_run", t2 - t1),
                        ("scatter_rerun", t3 - t2)):
            timer.t[key] = timer.t.get(key, 0.0) + dt
        return r
    return w


def _event_first(timer: _Timer, read):
    """Posting the READ, after an event recorded on the current stream (`pre_read_event`: the
    first CUDA call after PREPARE's wait, for comparison with the one after the READ)."""
    def w(*a, **k):
        t0 = time.perf_counter()
        torch.cuda.Event().record()
        timer.t["pre_read_event"] = timer.t.get("pre_read_event", 0.0) + time.perf_counter() - t0
        return read(*a, **k)
    return w


def _instrument(dr, kvcopy, timer: _Timer, probe_scatter: bool = False,
                probe_sleep_us: float = 0.0) -> None:
    tr = dr.transport
    if probe_scatter:
        tr.read = _event_first(timer, tr.read)
    tr.read = timer.wrap("read_post", tr.read)
    tr.wait = timer.wrap("read_wait", tr.wait)
    tr.send_notif = timer.wrap("notif", tr.send_notif)
    worker = sys.modules[type(dr).__module__]  # D's upload, as the worker module calls it
    if not getattr(worker.upload_all, "_timed", False):
        up = timer.wrap("d_upload", worker.upload_all)
        up._timed = True  # type: ignore[attr-defined]
        worker.upload_all = up
    name = "_finish_all" if hasattr(dr, "_finish_all") else "_prepare_all"  # the replies
    setattr(dr, name, timer.wrap("prepare_all", getattr(dr, name), capture=True))
    if not getattr(kvcopy.KVProgram.run, "_timed", False):  # D only runs scatters here
        run = (_probed_run(timer, kvcopy.KVProgram.run, probe_sleep_us) if probe_scatter
               else timer.wrap("scatter_run", kvcopy.KVProgram.run))
        run._timed = True  # type: ignore[attr-defined]
        kvcopy.KVProgram.run = run


def parts(st, timer: _Timer) -> dict:
    t = timer.t
    p_plan = max((r.plan_s for r in timer.replies), default=0.0)
    gather = max((r.gather_s for r in timer.replies), default=0.0)
    out = dict(wall=st.seconds, host=st.seconds - st.gather_seconds - st.read_seconds
               - st.scatter_seconds, d_plan=st.plan_seconds - sum(r.plan_s for r in timer.replies),
               rpc=st.prepare_seconds - p_plan - gather, p_plan=p_plan, gather=gather,
               read_post=t.get("read_post", 0.0), read_wait=t.get("read_wait", 0.0),
               scatter_run=t.get("scatter_run", 0.0),
               scatter_wait=st.scatter_seconds - t.get("scatter_run", 0.0),
               notif=t.get("notif", 0.0))
    out["other"] = out["wall"] - sum(out[k] for k in PARTS[2:11])
    return out


def _pull(dr, timer: _Timer, rid: str, preq, dreq):
    """One pull; a full staging region on P (its poller had not freed the last slot yet) is
    waited out, not counted."""
    for attempt in range(20):
        timer.reset()
        try:
            return dr.pull(rid, preq, dreq)
        except Exception as e:
            if getattr(e, "code", None) != "staging-full" or attempt == 19:
                raise
            time.sleep(0.02)
    raise AssertionError("unreachable")


def _without_progress_thread(transport) -> None:
    """D's agents (this process) without NIXL's progress thread: D's own polls progress its
    READs. A diagnostic (--d-progress-thread off): is the thread what slows D's calls?"""
    get = transport.import_nixl

    def no_thread():
        agent_cls, cfg_cls = get()

        def cfg(**kw):
            return cfg_cls(**dict(kw, enable_prog_thread=False))

        return agent_cls, cfg

    transport.import_nixl = no_thread


def run(args, base_dir: str | None, modes: list[str]) -> dict:
    pkgs = {m: pkg for m, pkg in packages(base_dir).items() if m in modes}
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    sizes = [int(x) for x in args.blocks.split(",")]
    proc = ctx.Process(target=_prefill_proc,
                       args=(base_dir, args.geometry, args.device, max(sizes), child, modes))
    proc.start()

    def reply():
        if not conn.poll(300):  # a P that died says nothing: do not wait forever
            raise RuntimeError(f"the prefill process is silent (exit code {proc.exitcode})")
        return conn.recv()

    addrs = reply()
    ranks, timers, arena = {}, {}, None
    for mode, pkg in pkgs.items():
        if args.d_progress_thread == "off":
            _without_progress_thread(importlib.import_module(f"{pkg}.transport"))
        worker, kv, _, _, kvcopy = mods(pkg)
        _, d, f = specs(pkg, args.geometry, max(sizes))
        if arena is None:
            arena = torch.zeros(kv.arena_layout(d).nbytes, dtype=torch.uint8, device=args.device)
        dr = worker.DecodeRank(d, f, b"bench", args.device, arena=arena, timeout=120)
        dr.connect([tuple(addrs[mode])])
        timers[mode] = _Timer()
        _instrument(dr, kvcopy, timers[mode], args.probe_scatter, args.probe_sleep_us)
        ranks[mode] = dr
    rows, n = [], 0
    for nbk in sizes:
        res: dict[str, list[dict]] = {m: [] for m in pkgs}
        snap: dict[str, torch.Tensor] = {}
        reposts0 = {m: getattr(dr.transport, "reposts", 0) for m, dr in ranks.items()}
        for i in range(args.warm + args.reps):
            order = list(pkgs) if i % 2 == 0 else list(reversed(pkgs))
            for mode in order:
                pkg = pkgs[mode]
                planner = mods(pkg)[2]
                _, d, _ = specs(pkg, args.geometry, max(sizes))
                pt, dt = tables(nbk, d.num_blocks, nbk)
                rid = f"{mode}{n}"
                n += 1
                time.sleep(args.gap_ms / 1e3)  # lets P's poller free the last slot, untimed
                conn.send((mode, rid, nbk))
                hold_s = reply()
                preq, dreq = planner.Request(nbk * 16, {0: pt}), planner.Request(nbk * 16, {0: dt})
                if i == 0:
                    arena.zero_()
                # P's answer on its way through the router to D's pull (a P that gathers at
                # hold() does it meanwhile), untimed
                time.sleep(args.hold_gap_ms / 1e3)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                st = _pull(ranks[mode], timers[mode], rid, preq, dreq)
                if i == 0:
                    snap[mode] = arena.clone()
                if i >= args.warm:
                    res[mode].append(dict(parts(st, timers[mode]), p_hold=hold_s,
                                          **{k: timers[mode].t.get(k, 0.0) for k in EXTRA}))
        same = all(torch.equal(snap[m], snap[mode]) for m in snap) and bool(snap[mode].any())
        row = dict(blocks=nbk, tokens=nbk * 16, bytes=int(st.bytes), same_bytes=same,
                   digest=hashlib.sha256(snap[mode].cpu().numpy().tobytes()).hexdigest())
        for mode, lst in res.items():
            row[mode] = {k: float(np.median([r[k] for r in lst]))
                         for k in PARTS + ["p_hold"] + EXTRA}
            row[mode]["host_p90"] = float(np.percentile([r["host"] for r in lst], 90))
            # READs posted on a kept NIXL handle (a transport without repost has no counter)
            row[mode]["reposts"] = getattr(ranks[mode].transport, "reposts", 0) - reposts0[mode]
            row[mode]["raw"] = lst
        rows.append(row)
        line = " ".join(f"{m}: wall {row[m]['wall'] * 1e6:.0f} host {row[m]['host'] * 1e6:.0f} us"
                        for m in res)
        print(f"{nbk:5d} blocks ({row['bytes'] / 2**20:.1f} MiB): {line} same={same}", flush=True)
    conn.send("stop")
    proc.join(timeout=30)
    for dr in ranks.values():
        dr.close()
    return dict(rows=rows)


def micro(pkgs: dict[str, str], geo: str, device: str, sizes: list[int], reps: int) -> list[dict]:
    """CPU time (this thread's, so waiting for a core under load does not count) of the per-pull
    work that grows with the table, each path's own functions called as its pull calls them:
    D's plan + PREPARE encoding, the HMACs of both sides, P's decode + table check + dyn."""
    out = []
    for nbk in sizes:
        row: dict = dict(blocks=nbk)
        for mode, pkg in pkgs.items():
            row[mode] = _micro_one(pkg, geo, device, nbk, max(sizes), reps)
        out.append(row)
        print(f"micro {nbk:5d} blocks: " + "; ".join(
            f"{m}: " + " ".join(f"{k}={v * 1e6:.1f}" if k != "prepare_bytes" else f"{k}={v}"
                                for k, v in row[m].items()) for m in pkgs), flush=True)
    return out


def _micro_one(pkg: str, geo: str, device: str, nbk: int, max_blocks: int, reps: int) -> dict:
    import hashlib
    import hmac

    import msgspec

    worker, _, planner, _, kvcopy = mods(pkg)
    proto = importlib.import_module(f"{pkg}.protocol")
    tmpl = importlib.import_module(f"{pkg}.template")
    p, d, _ = specs(pkg, geo, max_blocks)
    tm = tmpl.PairTemplate(p, d)
    pt, dt = tables(nbk, d.num_blocks, nbk)
    T = nbk * 16
    preq, dreq = planner.Request(T, {0: pt}), planner.Request(T, {0: dt})
    pg = kvcopy.program_for(tm.scatter, device, gather=False)
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(proto.ClientMessage)
    new = hasattr(worker, "_held")
    held = worker._held(preq, None) if new else preq
    dev = torch.device(device)

    def d_plan():
        if new:
            dyn = tm.dyn("decode", dreq, T)  # one peer: pull() converts inside dyn
            kvcopy.upload_all(dev, [(dyn, 0)])
        else:
            pg.upload(tm.dyn("decode", dreq, T), 0)
        return enc.encode(proto.PrepareRequest("r", T, worker.req_to_wire(preq)))

    payload = d_plan()

    def macs():
        for _ in range(2):  # D signs, P verifies
            hmac.new(b"k" * 32, b"C" + bytes(8) + payload, hashlib.sha256).digest()

    def p_side():
        msg = dec.decode(payload)
        if new:
            assert msg.p_req.block_tables == held.packed
            tm.dyn("prefill", held.req, T)
        else:
            assert worker._same_request(held, msg.p_req)
            tm.dyn("prefill", held, T)

    def p_hold():
        if new:
            worker._held(preq, None)

    res: dict = {}
    for name, fn in (("d_plan", d_plan), ("hmac", macs), ("p_prepare", p_side),
                     ("p_hold", p_hold)):
        ts = []
        for _ in range(reps):
            t0 = time.thread_time_ns()
            fn()
            ts.append(time.thread_time_ns() - t0)
        res[name] = float(np.median(ts)) / 1e9
    res["prepare_bytes"] = len(payload)
    return res


def machine(device: str) -> dict:
    info = dict(host=platform.node(), cpu=platform.processor() or platform.machine(),
                cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                loadavg_before=os.getloadavg())
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f
                               if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default=None,
                    help="default: llama8b on CUDA, tiny on CPU")
    ap.add_argument("--blocks", default="64,512,2048")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--gap-ms", type=float, default=3.0, help="untimed pause before P holds")
    ap.add_argument("--hold-gap-ms", type=float, default=1.0,
                    help="untimed pause between P's hold() and D's pull")
    ap.add_argument("--separate", action="store_true",
                    help="the paths one after the other, each in its own P/D processes (on 2 "
                         "cores: NIXL's progress threads spin; two agents a process starve P)")
    ap.add_argument("--d-progress-thread", choices=("on", "off"), default="on",
                    help="off: D's NIXL agents without their progress thread (a diagnostic)")
    ap.add_argument("--probe-scatter", action="store_true",
                    help="D's scatter call probed: an event first, the call, the call again "
                         "(a diagnostic; the scatter parts then mean something else)")
    ap.add_argument("--probe-sleep-us", type=float, default=0.0,
                    help="with --probe-scatter: busy-wait this long after the READ first")
    ap.add_argument("--baseline", default=None,
                    help="commit (git archive) or tarball; default: the packed tarball if present")
    ap.add_argument("--pack-baseline", metavar="COMMIT", help="write the baseline tarball, exit")
    ap.add_argument("--out", required=False)
    args = ap.parse_args()
    if args.pack_baseline:
        print(pack_baseline(args.pack_baseline))
        return 0
    if args.probe_scatter and args.device != "cuda":
        ap.error("--probe-scatter probes CUDA launches: it needs --device cuda")
    if args.device == "cpu":
        torch.set_num_threads(1)
    args.geometry = args.geometry or ("llama8b" if args.device == "cuda" else "tiny")
    base = args.baseline or (BASE_TAR if os.path.exists(BASE_TAR) else None)
    base_dir, base_commit = None, None
    if base:
        base_dir = tempfile.mkdtemp(prefix="pd-host-path-")
        tar = base if os.path.exists(base) else pack_baseline(base, os.path.join(base_dir, "b.tgz"))
        unpack_baseline(tar, base_dir)
        if os.path.exists(tar + ".commit"):
            base_commit = open(tar + ".commit").read().strip()
    else:
        print("no baseline source: measuring the current path only", flush=True)
    t0 = time.time()
    info = machine(args.device)
    sizes = [int(x) for x in args.blocks.split(",")]
    res = dict(micro=micro(packages(base_dir), args.geometry, args.device, sizes, 200))
    modes = list(packages(base_dir))
    if not args.separate:
        res.update(run(args, base_dir, modes))
    else:  # one path at a time, each with its own P/D processes (fewer busy threads per core)
        parts_ = [run(args, base_dir, [m]) for m in modes]
        rows = [dict(r) for r in parts_[-1]["rows"]]
        for row, *others in zip(rows, *(p["rows"] for p in parts_[:-1]), strict=True):
            for o in others:
                row.update({m: o[m] for m in modes if m in o})
                row["same_bytes"] = row["same_bytes"] and o["same_bytes"] \
                    and o["digest"] == row["digest"]
        res["rows"] = rows
        res["separate"] = True
    info["loadavg_after"] = os.getloadavg()
    out = dict(bench="host_path", date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               machine=info, device=args.device, geometry=args.geometry,
               geometry_spec=GEOMETRIES[args.geometry], reps=args.reps, warm=args.warm,
               baseline=base_commit or base, d_progress_thread=args.d_progress_thread,
               probe_scatter=args.probe_scatter, probe_sleep_us=args.probe_sleep_us,
               seconds=time.time() - t0, **res)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, separators=(",", ":"))
    for row in res["rows"]:
        for mode in ("base", "new"):
            if mode in row:
                print(f"  {row['blocks']:5d} {mode:4s} " + " ".join(
                    f"{k}={row[mode][k] * 1e6:.0f}" for k in PARTS + ["p_hold"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
