"""Build the template kernels (v1, v2 and the bench's v2 settings) for sm_90 with the installed
Triton, no GPU needed, and report what decides their occupancy: registers a thread, stack
(spills), 16-byte vector loads, and from those the programs and warps an H100/H200 SM holds
(65,536 registers, 64 warps) and the tile bytes in flight per SM.

    python bench/transfer/kernel_regs.py [--out results.json]
    PYTHONPATH=/tmp/triton36 python bench/transfer/kernel_regs.py   # another Triton version
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "runtime"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pd_runtime.kernels import kvcopy  # noqa: E402

SIG = {"src": "*i64", "dst": "*i64", "ent": "*i64", "bt": "*i64"}
# (name, kernel, constexprs, warps, options): the four bench cases' classes (512 B rows of int64
# words; the NHD head merge's merged 2 KiB rows), block 16 (gather) / 32 (scatter to NHD)
CONFIGS = []
for gather, bs in ((True, 16), (False, 32)):
    side = "gather" if gather else "scatter"
    CONFIGS.append((f"v1 {side}, tile 32K, 8 warps", "v1",
                    dict(NC=11, RB=64, VEC=2, WORD=8, TT=64, GATHER=gather), 8, {}))
    for label, rb, tt, nw, b, kind, ef, opt in [
        ("v2 default, tile 32K, 16 warps", 64, 64, 16, bs, 0, True, {}),
        ("v2 merged 2 KiB rows, tile 32K, 16 warps", 256, 16, 16, bs, 0, True, {}),
        ("v2 generic (block size, kind per entity)", 64, 64, 16, 0, -1, True, {}),
        ("v2 tile-fast grid", 64, 64, 16, bs, 0, False, {}),
        ("v2 8 warps", 64, 64, 8, bs, 0, True, {}),
        ("v2 16K tile (8 warps)", 64, 32, 8, bs, 0, True, {}),
        ("v2 64K tile (16 warps)", 64, 128, 16, bs, 0, True, {}),
        ("v2 maxnreg 32", 64, 64, 16, bs, 0, True, {"maxnreg": 32}),
    ]:
        CONFIGS.append((f"{label} {side}", "v2",
                        dict(NC=11, RB=rb, VEC=2, WORD=8, TT=tt, GATHER=gather, BS=b, KIND=kind,
                             EFAST=ef), nw, opt))


def _cuobjdump() -> str:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return here if os.path.exists(here) else (shutil.which("cuobjdump") or "cuobjdump")


def build(kernel: str, cst: dict, warps: int, opts: dict) -> dict:
    fn = kvcopy._kv_kernel if kernel == "v1" else kvcopy._kv_kernel2
    src = ASTSource(fn, {**SIG, **{k: "constexpr" for k in cst}}, cst,
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(4)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, **opts})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        ru = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                            text=True).stdout
    regs = int(ru.split("REG:")[1].split()[0])
    stack = int(ru.split("STACK:")[1].split()[0])
    ptx = k.asm["ptx"]
    threads = 32 * warps
    per_sm = min(65536 // (((regs + 7) // 8 * 8) * threads), 64 // warps, 32)
    tile = cst["TT"] * cst["RB"] * cst["WORD"]
    return dict(registers=regs, stack_bytes=stack, warps=warps,
                vector16_loads=ptx.count("ld.global.cg.v2.b64"),
                programs_per_sm=per_sm, warps_per_sm=per_sm * warps,
                tile_bytes=tile, tile_kib_in_flight_per_sm=per_sm * tile // 1024)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    print(f"Triton {triton.__version__}, sm_90")
    for name, kernel, cst, warps, opts in CONFIGS:
        try:
            r = dict(name=name, kernel=kernel, **build(kernel, cst, warps, opts))
        except Exception as e:  # noqa: BLE001 - report, keep going
            r = dict(name=name, kernel=kernel, error=f"{type(e).__name__}: {e}")
        rows.append(r)
        if "error" in r:
            print(f"  {name:55s} {r['error']}")
        else:
            print(f"  {name:55s} {r['registers']:3d} regs, stack {r['stack_bytes']:2d} B, "
                  f"{r['programs_per_sm']} programs x {r['warps']:2d} warps / SM, "
                  f"{r['tile_kib_in_flight_per_sm']:3d} KiB in flight / SM, "
                  f"{r['vector16_loads']} 16-byte loads a thread")
    if args.out:
        json.dump(dict(triton=triton.__version__, target="sm_90", rows=rows), open(args.out, "w"),
                  indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
