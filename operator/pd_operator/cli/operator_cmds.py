"""`pdctl operator run` (the operator process), `pdctl operator render` (print the children)
and `pdctl operator check-kv-path` (the KVPathVerified check of one PDDeployment, once).

run: parses the flags and hands them to pd_operator.process, which owns the process (webhook,
metrics, leader election, kopf, shutdown). Imported lazily: kopf is slow to import and
the other pdctl commands do not need it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from .. import process


def register(sub: argparse._SubParsersAction) -> None:
    op = sub.add_parser("operator", help="run the operator, or print what it would create")
    op_sub = op.add_subparsers(dest="operator_command", metavar="COMMAND")

    run = op_sub.add_parser("run", help="run the operator (webhook, reconciliation, status)")
    run.add_argument("--kubeconfig", help="kubeconfig (default: in-cluster, then $KUBECONFIG)")
    run.add_argument("-n", "--namespace", action="append", default=[],
                     help="watch only this namespace (repeatable; default: all namespaces)")
    run.add_argument("--local-webhook", action="store_true",
                     help="serve the webhook on 127.0.0.1 with a generated CA and register "
                     "webhook configurations that point at it (development, tests)")
    run.add_argument("--webhook-port", type=int, default=9443, help="0 picks a free port")
    run.add_argument("--webhook-addr", default="0.0.0.0",
                     help="listen address (in-cluster mode; --local-webhook uses 127.0.0.1)")
    run.add_argument("--webhook-certfile", help="serving certificate (the chart's Secret)")
    run.add_argument("--webhook-keyfile", help="serving key")
    run.add_argument("--webhook-config-name", default=None,
                     help="name of the registered webhook configurations (--local-webhook)")
    run.add_argument("--no-webhook", action="store_true", help="do not serve the webhook")
    run.add_argument("--forbid-validation-policies", default="", metavar="POLICIES",
                     help="comma-separated validation policies the webhook rejects, cluster-wide "
                     "(Warn, Disabled; e.g. Disabled,Warn); default: none forbidden. A namespace "
                     "forbids more with the label pd-operator.dev/forbid-validation-policies "
                     "(e.g. Disabled.Warn)")
    run.add_argument("--metrics-port", type=int, default=8080, help="0 disables metrics")
    run.add_argument("--metrics-addr", default="0.0.0.0", help="metrics listen address")
    run.add_argument("--no-leader-election", action="store_true")
    run.add_argument("--lease-name", default="pd-operator-leader")
    run.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    run.add_argument("--lease-duration", type=float, default=15.0)
    run.add_argument("--identity", default=None, help="leader identity (default host:pid)")
    run.add_argument("--apply-concurrency", type=int, default=8,
                     help="concurrent server-side applies per PDDeployment")
    run.add_argument("--api-concurrency", type=int, default=32,
                     help="API requests in flight at once (process-wide)")
    run.add_argument("--kv-path-verification", choices=("on", "off"), default="on",
                     help="KVPathVerified: prove the KV path between a ready prefill and decode "
                     "pod of builtin pools (a real pull) before Ready. 'off' is for fake nodes "
                     "(kwok) and development only: Ready then comes with KVPathVerified=Unknown "
                     "(VerificationDisabled)")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    rnd = op_sub.add_parser("render", help="print the children of a PDDeployment (YAML List)")
    rnd.add_argument("-f", "--filename", required=True, help="PDDeployment YAML ('-' = stdin)")
    rnd.add_argument("--namespace", default="default")
    rnd.add_argument("--uid", default="00000000-0000-0000-0000-000000000000",
                     help="owner uid written into the ownerReferences")
    rnd.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    rnd.set_defaults(func=cmd_render)

    kv = op_sub.add_parser("check-kv-path", help="run the KVPathVerified check of a "
                           "PDDeployment once, from here (a real pull between its pods)")
    kv.add_argument("name", help="the PDDeployment")
    kv.add_argument("-n", "--namespace", default="default")
    kv.add_argument("--kubeconfig", help="kubeconfig (default: in-cluster, then $KUBECONFIG)")
    kv.add_argument("-o", "--output", choices=("text", "json"), default="text")
    kv.set_defaults(func=cmd_check_kv_path)
    op.set_defaults(func=lambda a: (op.print_help(sys.stderr), 2)[1])


# ----------------------------------------------------------------------------- render
def cmd_render(args: argparse.Namespace) -> int:
    from ..render import Owner, render, router_image_from
    from ..validate import SpecError, parse_object, validate_spec
    from .validate_cmds import YAML_LOADER, InputError, read_text

    try:
        docs = list(yaml.load_all(read_text(args.filename), Loader=YAML_LOADER))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:
        label = "stdin" if args.filename == "-" else args.filename
        print(f"error: {label} is not YAML: {exc}", file=sys.stderr)
        return 2
    items: list[dict[str, Any]] = []
    for doc in docs:
        if not doc:
            continue
        try:
            pdd = parse_object(doc)
        except SpecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        name = pdd.metadata["name"]
        ns = pdd.metadata.get("namespace") or args.namespace
        items += render(Owner(name, ns, args.uid), validate_spec(pdd.spec),
                        router_image=router_image_from(os.environ)).children
    out = {"apiVersion": "v1", "kind": "List", "items": items}
    if args.output == "json":
        print(json.dumps(out, indent=1))
    else:
        print(yaml.safe_dump(out, sort_keys=False), end="")
    return 0


# ---------------------------------------------------------------------- check-kv-path
def cmd_check_kv_path(args: argparse.Namespace) -> int:
    """Exit 0 when the pull passed, 1 when it failed (the reason printed), 2 on usage errors."""
    import asyncio
    from dataclasses import asdict

    from .. import kube, kvpath, kvpath_check

    async def run() -> tuple[kvpath.Pair | None, kvpath.Outcome]:
        client = kube.Client(kube.Credentials.load(args.kubeconfig))
        try:
            return await kvpath_check.check_deployment(client, args.namespace, args.name)
        finally:
            await client.close()

    try:
        pair, outcome = asyncio.run(run())
    except (kube.ApiError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps({"pair": asdict(pair) if pair else None, **asdict(outcome)}, indent=1))
    elif pair is None:
        print(f"KVPathVerified not checked: {outcome.reason}: {outcome.message}")
    else:
        st, reason, message = kvpath.condition(kvpath.KVPathState(pair=pair, outcome=outcome),
                                               pools_ready=True)
        print(f"KVPathVerified {st} ({reason}): {message}")
    return 0 if outcome.ok else 1


# -------------------------------------------------------------------------------- run
FORBIDDABLE_POLICIES = ("Warn", "Disabled")  # Strict cannot be forbidden: it is the default


def forbidden_policies(text: str) -> frozenset[str]:
    """`--forbid-validation-policies` parsed ("" -> none); ValueError names a bad entry."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in FORBIDDABLE_POLICIES]
    if bad:
        raise ValueError(f"--forbid-validation-policies: {', '.join(map(repr, bad))} is not "
                         f"one of {', '.join(FORBIDDABLE_POLICIES)} (Strict, the default, "
                         f"cannot be forbidden)")
    return frozenset(names)


def options_from(args: argparse.Namespace) -> process.Options:
    """The process's options from the parsed flags (ValueError names a bad combination)."""
    from .. import process

    webhook = None
    forbidden = forbidden_policies(args.forbid_validation_policies)
    if not args.no_webhook and (args.local_webhook or args.webhook_certfile):
        if bool(args.webhook_certfile) != bool(args.webhook_keyfile):
            raise ValueError("--webhook-certfile and --webhook-keyfile go together")
        webhook = process.WebhookOptions(
            local=args.local_webhook, port=args.webhook_port, addr=args.webhook_addr,
            certfile=args.webhook_certfile, keyfile=args.webhook_keyfile,
            config_name=args.webhook_config_name, forbidden_policies=forbidden)
    lease = None if args.no_leader_election else process.LeaseOptions(
        name=args.lease_name, namespace=args.lease_namespace, duration=args.lease_duration,
        identity=args.identity)
    return process.Options(
        kubeconfig=args.kubeconfig, namespaces=tuple(args.namespace), webhook=webhook,
        lease=lease, metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
        apply_concurrency=args.apply_concurrency, api_concurrency=args.api_concurrency,
        kv_path_verification=args.kv_path_verification == "on", verbose=args.verbose)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        opts = options_from(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .. import process

    return process.main(opts)
