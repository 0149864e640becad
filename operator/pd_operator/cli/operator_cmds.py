"""`pdctl operator run` (the operator process) and `pdctl operator render` (print the children).

run: the webhook server (every replica), metrics, leader election with a Lease, then kopf with
the handlers of pd_operator.handlers while the lease is held. `--local-webhook` serves the
webhook on 127.0.0.1 with a fresh CA (openssl) and registers Validating/Mutating webhook
configurations whose clientConfig.url points at it; they are removed again on a clean exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml


def register(sub) -> None:
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
    run.add_argument("--metrics-port", type=int, default=8080, help="0 disables metrics")
    run.add_argument("--no-leader-election", action="store_true")
    run.add_argument("--lease-name", default="pd-operator-leader")
    run.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    run.add_argument("--lease-duration", type=float, default=15.0)
    run.add_argument("--identity", default=None, help="leader identity (default host:pid)")
    run.add_argument("--apply-concurrency", type=int, default=8,
                     help="concurrent server-side applies per PDDeployment")
    run.add_argument("--api-concurrency", type=int, default=32,
                     help="API requests in flight at once (process-wide)")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    rnd = op_sub.add_parser("render", help="print the children of a PDDeployment (YAML List)")
    rnd.add_argument("-f", "--filename", required=True, help="PDDeployment YAML ('-' = stdin)")
    rnd.add_argument("--namespace", default="default")
    rnd.add_argument("--uid", default="00000000-0000-0000-0000-000000000000",
                     help="owner uid written into the ownerReferences")
    rnd.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    rnd.set_defaults(func=cmd_render)
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


# -------------------------------------------------------------------------------- run
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scope(configs: list[dict[str, Any]], namespaces: list[str]) -> None:
    if not namespaces:
        return
    for cfg in configs:
        for hook in cfg["webhooks"]:
            hook["namespaceSelector"] = {"matchExpressions": [{
                "key": "kubernetes.io/metadata.name", "operator": "In",
                "values": sorted(namespaces)}]}


async def _run(args: argparse.Namespace) -> int:
    import kopf

    from .. import handlers, kube, leader, metrics
    from ..webhook import certs, configs, server

    log = logging.getLogger("pd_operator")
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf's own login reads it
    creds = kube.Credentials.load(args.kubeconfig)
    client = kube.Client(creds, limit=args.api_concurrency)
    handlers.RUNTIME.client = client
    handlers.RUNTIME.apply_concurrency = args.apply_concurrency
    if args.metrics_port:
        metrics.serve(args.metrics_port)

    runner = None
    registered: list[dict[str, Any]] = []
    tmp: tempfile.TemporaryDirectory | None = None
    if not args.no_webhook and (args.local_webhook or args.webhook_certfile):
        if args.local_webhook:
            port = args.webhook_port or _free_port()
            if args.webhook_certfile:
                files = certs.CertFiles(Path(args.webhook_certfile), Path(args.webhook_certfile),
                                        Path(args.webhook_keyfile))
            else:
                tmp = tempfile.TemporaryDirectory(prefix="pd-operator-webhook-")
                files = certs.generate(Path(tmp.name))
            runner = await server.start("127.0.0.1", port, files.cert, files.key)
            base = f"https://127.0.0.1:{port}"
            name = args.webhook_config_name or configs.NAME
            registered = [configs.validating(base, files.ca_pem(), name),
                          configs.mutating(base, files.ca_pem(), name)]
            _scope(registered, args.namespace)
            for cfg in registered:
                await client.apply(cfg)
            log.info("registered webhook configurations %s -> %s", name, base)
        else:
            runner = await server.start(args.webhook_addr, args.webhook_port,
                                        Path(args.webhook_certfile), Path(args.webhook_keyfile))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    elector = None
    exit_code = 0
    try:
        if not args.no_leader_election:
            elector = leader.Elector(client, leader.LeaseConfig(
                name=args.lease_name, namespace=args.lease_namespace,
                identity=args.identity or f"{socket.gethostname()}:{os.getpid()}",
                duration=args.lease_duration, retry=max(0.5, args.lease_duration / 5)))
            acquire = asyncio.create_task(elector.acquire())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                acquire.cancel()
                return 0
            stopped.cancel()
        settings = kopf.OperatorSettings()
        handlers.configure(settings)
        kopf_task = asyncio.create_task(kopf.operator(
            registry=kopf.get_default_registry(), settings=settings, standalone=True,
            clusterwide=not args.namespace, namespaces=args.namespace, stop_flag=stop))
        watchers = {kopf_task}
        resync = asyncio.create_task(handlers.resync_forever(args.namespace))
        if elector is not None:
            watchers.add(asyncio.create_task(elector.renew_until_lost()))
        done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
        if kopf_task not in done:  # lost the lease: stop reconciling at once
            exit_code = 1
            stop.set()
        await kopf_task
        resync.cancel()
        for t in watchers - {kopf_task}:
            t.cancel()
    finally:
        if elector is not None:
            await elector.release()
        for cfg in registered:
            try:
                await client.delete(cfg["apiVersion"], cfg["kind"], None, cfg["metadata"]["name"])
            except Exception as exc:  # best effort on the way out
                log.warning("could not remove %s: %r", cfg["kind"], exc)
        if runner is not None:
            await runner.cleanup()
        await client.close()
        if tmp is not None:
            tmp.cleanup()
    return exit_code


def cmd_run(args: argparse.Namespace) -> int:
    import kopf

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.FULL)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not args.verbose:  # kopf logs every handler success at INFO: one line per child event
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    return asyncio.run(_run(args))
