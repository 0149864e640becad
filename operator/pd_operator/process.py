"""The operator process: start, webhook server, metrics, leader election, kopf, shutdown.

`pdctl operator run` parses its flags into `Options` and calls `main`. Every replica serves the
webhook and the metrics; only the holder of the leader Lease runs kopf (the handlers of
pd_operator.handlers). There is no periodic resync: kopf re-lists on every reconnect, and a watch
never gives up (handlers.RetryForever), so no event is lost for good.

Shutdown (SIGINT/SIGTERM, or the lease lost) undoes start-up in reverse: the lease is released,
the webhook configurations registered by `--local-webhook` are removed, the webhook server and
the API client are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf

from . import handlers, kube, leader, metrics
from .devtools import dev_module
from .webhook import configs, server
from .webhook import namespaces as ns_labels

log = logging.getLogger("pd_operator")

EXIT_OK = 0
EXIT_LEASE_LOST = 1  # the Deployment restarts the pod, which then waits for the lease again


@dataclass(frozen=True)
class WebhookOptions:
    """Where and how the admission webhook is served (None in Options: not served)."""

    local: bool = False  # 127.0.0.1, own CA, registers the webhook configurations itself
    port: int = 9443  # 0 picks a free port (local only)
    addr: str = "0.0.0.0"
    certfile: str | None = None
    keyfile: str | None = None
    config_name: str | None = None  # name of the registered configurations (local only)
    # validation policies the administrator forbids cluster-wide (--forbid-validation-policies)
    forbidden_policies: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LeaseOptions:
    name: str = "pd-operator-leader"
    namespace: str = "default"
    duration: float = 15.0
    identity: str | None = None  # default host:pid


@dataclass(frozen=True)
class Options:
    kubeconfig: str | None = None
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    webhook: WebhookOptions | None = None
    lease: LeaseOptions | None = field(default_factory=LeaseOptions)  # None: no election
    metrics_port: int = 8080  # 0: no metrics server
    metrics_addr: str = "0.0.0.0"
    apply_concurrency: int = 8
    api_concurrency: int = 32
    kv_path_verification: bool = True  # False: fake nodes / development only (KVPathVerified)
    verbose: bool = False


def main(opts: Options) -> int:
    """Configure logging and run the process until it is stopped; return the exit code."""
    kopf.configure(verbose=opts.verbose, log_format=kopf.LogFormat.FULL)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not opts.verbose:  # kopf logs every handler success at INFO: one line per child event
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    return asyncio.run(run(opts))


async def run(opts: Options) -> int:
    stop = _stop_on_signals()
    async with contextlib.AsyncExitStack() as undo:  # undone in reverse order on the way out
        code = await _start_and_serve(opts, stop, undo)
    return code


async def _start_and_serve(opts: Options, stop: asyncio.Event,
                           undo: contextlib.AsyncExitStack) -> int:
    if opts.kubeconfig:
        os.environ["KUBECONFIG"] = opts.kubeconfig  # kopf's own login reads it
    client = kube.Client(kube.Credentials.load(opts.kubeconfig), limit=opts.api_concurrency)
    undo.push_async_callback(client.close)
    handlers.RUNTIME.client = client
    handlers.RUNTIME.apply_concurrency = opts.apply_concurrency
    handlers.RUNTIME.kv_path_verification = opts.kv_path_verification
    if not opts.kv_path_verification:
        log.warning("--kv-path-verification=off: builtin pools become Ready without a KV path "
                    "check (fake nodes and development only)")
    if opts.metrics_port:
        metrics.serve(opts.metrics_port, opts.metrics_addr)
    if opts.webhook is not None:
        await _serve_webhook(undo, client, opts.webhook, opts.namespaces)
    elector = None
    if opts.lease is not None:
        elector = _elector(client, opts.lease)
        acquired = await _acquire(elector, stop)
        if acquired:
            undo.push_async_callback(elector.release)
        if not acquired or stop.is_set():
            return EXIT_OK  # stopped while waiting for the lease
    return await _reconcile_until_stopped(opts.namespaces, stop, elector)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


# ---------------------------------------------------------------------------------- webhook
async def _serve_webhook(undo: contextlib.AsyncExitStack, client: kube.Client,
                         opts: WebhookOptions, namespaces: tuple[str, ...]) -> None:
    if not opts.local:
        if not (opts.certfile and opts.keyfile):
            raise ValueError("the webhook needs --webhook-certfile and --webhook-keyfile")
        runner = await server.start(opts.addr, opts.port, Path(opts.certfile),
                                    Path(opts.keyfile), opts.forbidden_policies,
                                    _namespace_policies(client))
        undo.push_async_callback(runner.cleanup)
        return
    cert, key, ca_pem = _local_certificate(undo, opts)
    port = opts.port or _free_port()
    runner = await server.start("127.0.0.1", port, cert, key, opts.forbidden_policies,
                                _namespace_policies(client))
    undo.push_async_callback(runner.cleanup)
    base = f"https://127.0.0.1:{port}"
    name = opts.config_name or configs.NAME
    registered = [configs.validating(base, ca_pem, name), configs.mutating(base, ca_pem, name)]
    scope_to_namespaces(registered, namespaces)
    for cfg in registered:
        undo.push_async_callback(_remove_quietly, client, cfg)
        await client.apply(cfg)
    log.info("registered webhook configurations %s -> %s", name, base)


def _namespace_policies(client: kube.Client) -> ns_labels.NamespacePolicies:
    """The per-namespace forbidden policies (namespace label), read with `list namespaces`."""
    return ns_labels.NamespacePolicies(ns_labels.label_reader(client))


def _local_certificate(undo: contextlib.AsyncExitStack,
                       opts: WebhookOptions) -> tuple[Path, Path, bytes]:
    """(certificate, key, CA PEM) for --local-webhook: the given files (the certificate is its
    own CA), or a fresh CA and serving certificate in a temporary directory."""
    if opts.certfile and opts.keyfile:
        cert = Path(opts.certfile)
        return cert, Path(opts.keyfile), cert.read_bytes()
    certs = dev_module("certs")  # a development CA (openssl), from the tooling
    if certs is None:
        raise ValueError("--local-webhook makes a development CA with the development tooling "
                         "(pd_dev), which is not installed: pass --webhook-certfile and "
                         "--webhook-keyfile")
    tmp = tempfile.TemporaryDirectory(prefix="pd-operator-webhook-")
    undo.callback(tmp.cleanup)
    files = certs.generate(Path(tmp.name))
    return files.cert, files.key, files.ca_pem()


def scope_to_namespaces(cfgs: list[dict[str, Any]], namespaces: tuple[str, ...]) -> None:
    """Let the API server call the webhook only for objects in `namespaces` (all when empty)."""
    if not namespaces:
        return
    for cfg in cfgs:
        for hook in cfg["webhooks"]:
            hook["namespaceSelector"] = {"matchExpressions": [{
                "key": "kubernetes.io/metadata.name", "operator": "In",
                "values": sorted(namespaces)}]}


async def _remove_quietly(client: kube.Client, cfg: dict[str, Any]) -> None:
    try:
        await client.delete(cfg["apiVersion"], cfg["kind"], None, cfg["metadata"]["name"])
    except Exception as exc:  # best effort on the way out: the API server may be gone
        log.warning("could not remove %s %s: %r", cfg["kind"], cfg["metadata"]["name"], exc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ----------------------------------------------------------------------------- leadership
def _elector(client: kube.Client, opts: LeaseOptions) -> leader.Elector:
    return leader.Elector(client, leader.LeaseConfig(
        name=opts.name, namespace=opts.namespace,
        identity=opts.identity or f"{socket.gethostname()}:{os.getpid()}",
        duration=opts.duration, retry=max(0.5, opts.duration / 5)))


async def _acquire(elector: leader.Elector, stop: asyncio.Event) -> bool:
    """Wait for the lease; False when stopped first (True also when both happened: the lease
    is then released on the way out)."""
    acquire = asyncio.create_task(elector.acquire())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for task in (acquire, stopped):
        task.cancel()
    return acquire.done() and not acquire.cancelled() and acquire.exception() is None


# ------------------------------------------------------------------------------ reconcile
async def _reconcile_until_stopped(namespaces: tuple[str, ...], stop: asyncio.Event,
                                   elector: leader.Elector | None) -> int:
    """Run kopf until `stop` is set or the lease is lost."""
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    kopf_task = asyncio.create_task(kopf.operator(
        registry=kopf.get_default_registry(), settings=settings, standalone=True,
        clusterwide=not namespaces, namespaces=list(namespaces), stop_flag=stop))
    lease_lost = asyncio.create_task(elector.renew_until_lost()) if elector else None
    exit_code = EXIT_OK
    try:
        done, _ = await asyncio.wait({kopf_task} | ({lease_lost} if lease_lost else set()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if kopf_task not in done:  # lost the lease: stop reconciling at once
            exit_code = EXIT_LEASE_LOST
            stop.set()
        await kopf_task
    finally:
        if lease_lost is not None:
            lease_lost.cancel()
    return exit_code
