"""`pdctl dev images build`: the project's images, built here and imported into the real node."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    from . import build
    from .host import ImageBuildError

    overrides = {}
    if args.torch_index is not None:
        overrides["TORCH_INDEX"] = args.torch_index
    try:
        results = build.build(
            [n.strip() for n in (args.only or "").split(",")],
            cluster_dir=Path(args.dir) if args.dir else None,
            do_import=not args.no_import, force=args.force, overrides=overrides,
            progress=_progress)
    except (ImageBuildError, ValueError) as exc:
        _progress(f"images build failed: {exc}")
        return 1
    rows = [{"image": r.name, "ref": r.ref, "action": r.action, "key": r.key[:16],
             "seconds": round(r.seconds, 1),
             "size_mib": None if r.size_mib is None else round(r.size_mib),
             "tar": str(r.tar) if r.tar else None} for r in results]
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['ref']}\t{r['action']}\tkey={r['key']}" + (f"\t{r['tar']}" if r["tar"]
                                                                     else ""))
    return 0


def register(dev_sub) -> None:
    img = dev_sub.add_parser("images", help="the operator and runtime images, built here "
                             "(no registry) and imported into the real node")
    img_sub = img.add_subparsers(dest="images_command", metavar="COMMAND")
    p = img_sub.add_parser(
        "build", help="debootstrap base -> docker build (private dockerd) -> import into the "
        "real node's containerd; skipped when the content key matches")
    p.add_argument("--dir", help="cluster state directory holding the real node (default: "
                   "$PD_DEV_CLUSTER_DIR or ~/.cache/pd-operator/clusters/default)")
    p.add_argument("--only", help="comma-separated subset of operator,runtime")
    p.add_argument("--no-import", action="store_true",
                   help="no real node needed: write docker-archive tars under "
                   "~/.cache/pd-operator/images/tars/ instead of importing")
    p.add_argument("--force", action="store_true", help="rebuild and re-import even when the "
                   "key matches (docker's layer cache is still used)")
    p.add_argument("--torch-index", help="pip index for torch (default: PyPI, the CUDA 13 "
                   "build; it runs on CPU too)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_build)

    def show(_args: argparse.Namespace) -> int:
        img.print_help(sys.stderr)
        return 2

    img.set_defaults(func=show)
