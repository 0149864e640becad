"""`pdctl dev cluster build|up|down|status|kubeconfig` (the local control plane) and
`pdctl dev generate [--check]` (every generated file).

See docs/development.md. The heavy lifting is in pd_dev.devcluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _dir(args: argparse.Namespace) -> Path | None:
    return Path(args.dir) if args.dir else None


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    from pd_dev.devcluster import build

    only = tuple(x for x in (args.only or "").split(",") if x)
    try:
        real_node = os.geteuid() == 0 if args.real_node is None else args.real_node
        paths = build.ensure_built(force=args.force, only=only, real_node=real_node)
    except RuntimeError as exc:
        _err(f"build failed: {exc}")
        return 1
    for name, path in sorted(paths.items()):
        print(f"{name}\t{path}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from pd_dev.devcluster import cluster

    try:
        cluster.up(
            _dir(args),
            node_count=args.nodes,
            gpus_per_node=args.gpus_per_node,
            build_missing=not args.no_build,
            timeout=args.timeout,
            real_node=_want_real_node(args),
        )
    except RuntimeError as exc:
        _err(f"up failed: {exc}")
        return 1
    return 0


def _want_real_node(args: argparse.Namespace) -> bool:
    """--real-node / --no-real-node as given; without either: the running cluster's mode, else
    a real node when this process may make one (root), else the fake nodes alone, said."""
    from pd_dev.devcluster import cluster

    if args.real_node is not None:
        return bool(args.real_node)
    if cluster.status(_dir(args), with_nodes=False).any_running:  # `up` after a crash too
        return bool(cluster.State.load(cluster.layout_for(_dir(args))).real_node.get("enabled"))
    if os.geteuid() != 0:
        _err("note: no real node (kubelet, containerd and a bridge need root): pods will stay "
             "on the fake nodes and never run; run as root, or pass --no-real-node to say so")
        return False
    return True


def cmd_down(args: argparse.Namespace) -> int:
    from pd_dev.devcluster import cluster

    stopped = cluster.down(_dir(args), purge=args.purge)
    if not stopped:
        _err("nothing was running")
    return 0


def _table(st) -> str:
    rows = [("COMPONENT", "PID", "RUNNING", "HEALTHY", "RSS(MiB)", "DETAIL")]
    for c in st.components:
        rows.append((c.name, str(c.pid or "-"), "yes" if c.running else "NO",
                     "yes" if c.healthy else "NO", f"{c.rss_mib:.0f}", c.detail[:50]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    nodes = ("-" if st.nodes_total is None else f"{st.nodes_ready}/{st.nodes_total} Ready")
    total = sum(c.rss_mib for c in st.components)
    lines += ["", f"nodes (kwok): {nodes}", f"memory (RSS, all components): {total:.0f} MiB",
              f"kubeconfig: {st.kubeconfig}", f"state: {'OK' if st.ok else 'DEGRADED'}"]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from pd_dev.devcluster import cluster

    st = cluster.status(_dir(args))
    if args.output == "json":
        print(json.dumps(st.to_dict(), indent=2))
    elif args.output == "yaml":
        import yaml

        print(yaml.safe_dump(st.to_dict(), sort_keys=False), end="")
    else:
        print(_table(st))
    return 0 if st.ok else 1


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    from pd_dev.devcluster import cluster

    path = cluster.layout_for(_dir(args)).kubeconfig
    print(path)
    if not path.is_file():
        _err("no kubeconfig yet: run `pdctl dev cluster up`")
        return 1
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from . import generate

    return generate.main(["--check"] if args.check else [])


def register(sub) -> None:
    dev = sub.add_parser("dev", help="development helpers (local control plane, generators)")
    dev_sub = dev.add_subparsers(dest="dev_command", metavar="COMMAND")
    cl = dev_sub.add_parser(
        "cluster",
        help="local Kubernetes control plane with fake GPU nodes (etcd, apiserver, "
        "controller-manager, scheduler, kwok)",
    )
    cl_sub = cl.add_subparsers(dest="cluster_command", metavar="COMMAND")

    def with_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--dir", help="cluster state directory (default: $PD_DEV_CLUSTER_DIR or "
                       "~/.cache/pd-operator/clusters/default)")
        return p

    p = cl_sub.add_parser("build", help="build/install the binaries into the cache only")
    p.add_argument("--force", action="store_true", help="rebuild even if present and right")
    p.add_argument("--only", help="comma-separated subset of k8s,etcd,kwok,helm,k8s-node "
                   "(k8s-node: the real node's kubelet and kube-proxy)")
    p.add_argument("--real-node", action=argparse.BooleanOptionalAction, default=None,
                   help="also the real node's kubelet, kube-proxy and CoreDNS (default: when "
                   "root, as `up` makes a real node then)")
    p.set_defaults(func=cmd_build)

    p = with_dir(cl_sub.add_parser("up", help="build if needed, start, create fake GPU nodes"))
    p.add_argument("--nodes", type=int, default=4, help="fake GPU nodes (default 4)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="nvidia.com/gpu per node")
    p.add_argument("--no-build", action="store_true", help="fail instead of building")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per component")
    p.add_argument("--real-node", action=argparse.BooleanOptionalAction, default=None,
                   help="one real node (kubelet, containerd + runc, CNI) where pods run, beside "
                   "the fake ones; label/taint pd-operator.dev/real-node=true; kept until "
                   "`down`. Default: on when root (a running cluster keeps its mode); "
                   "--no-real-node: the fake GPU nodes only")
    p.set_defaults(func=cmd_up)

    p = with_dir(cl_sub.add_parser("down", help="stop the processes `up` started"))
    p.add_argument("--purge", action="store_true", help="also delete the state dir (PKI, logs)")
    p.set_defaults(func=cmd_down)

    p = with_dir(cl_sub.add_parser("status", help="components, health, nodes, memory"))
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.set_defaults(func=cmd_status)

    p = with_dir(cl_sub.add_parser("kubeconfig", help="print the kubeconfig path"))
    p.set_defaults(func=cmd_kubeconfig)

    def _help(parser: argparse.ArgumentParser):
        def show(_args: argparse.Namespace) -> int:
            parser.print_help(sys.stderr)
            return 2
        return show

    gen = dev_sub.add_parser("generate", help="rewrite every generated file (CRD, chart "
                             "values, docs); --check: exit 1 when one differs")
    gen.add_argument("--check", action="store_true", help="write nothing; exit 1 on a difference")
    gen.set_defaults(func=cmd_generate)

    dev.set_defaults(func=_help(dev))
    cl.set_defaults(func=_help(cl))

    from .images import cli as images_cli  # `pdctl dev images build`

    images_cli.register(dev_sub)
