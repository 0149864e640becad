"""The operator process module without a cluster: flags -> options, webhook scoping, and waiting
for the lease ends when the process is told to stop."""

from __future__ import annotations

import asyncio

import pytest

from pd_operator import process
from pd_operator.cli.main import build_parser, main
from pd_operator.cli.operator_cmds import options_from
from pd_operator.webhook import configs


def _opts(*argv: str) -> process.Options:
    return options_from(build_parser().parse_args(["operator", "run", *argv]))


def test_flags_become_options():
    opts = _opts("--local-webhook", "-n", "a", "-n", "b", "--webhook-port", "0",
                 "--lease-duration", "5", "--identity", "me", "--metrics-port", "0",
                 "--metrics-addr", "127.0.0.1", "--api-concurrency", "4")
    assert opts.namespaces == ("a", "b")
    assert opts.webhook == process.WebhookOptions(local=True, port=0)
    assert opts.lease == process.LeaseOptions(duration=5.0, identity="me")
    assert (opts.metrics_port, opts.metrics_addr, opts.api_concurrency) == (0, "127.0.0.1", 4)


def test_no_webhook_and_no_election():
    opts = _opts("--local-webhook", "--no-webhook", "--no-leader-election")
    assert opts.webhook is None and opts.lease is None
    assert _opts().webhook is None  # neither --local-webhook nor a certificate: not served


def test_a_certificate_needs_its_key(capsys):
    with pytest.raises(ValueError, match="go together"):
        _opts("--webhook-certfile", "/tmp/cert.pem")
    assert main(["operator", "run", "--webhook-certfile", "/tmp/cert.pem"]) == 2
    assert "go together" in capsys.readouterr().err


def test_webhook_configurations_scoped_to_the_namespaces():
    cfgs = [configs.validating("https://127.0.0.1:1", b"ca", "n"),
            configs.mutating("https://127.0.0.1:1", b"ca", "n")]
    process.scope_to_namespaces(cfgs, ("b", "a"))
    for cfg in cfgs:
        for hook in cfg["webhooks"]:
            assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["a", "b"]
    unscoped = [configs.validating("https://127.0.0.1:1", b"ca", "n")]
    process.scope_to_namespaces(unscoped, ())
    assert "namespaceSelector" not in unscoped[0]["webhooks"][0]


class _NeverLeader:
    async def acquire(self) -> None:
        await asyncio.Event().wait()


def test_waiting_for_the_lease_ends_on_stop():
    async def run() -> bool:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, stop.set)
        return await process._acquire(_NeverLeader(), stop)  # type: ignore[arg-type]

    assert asyncio.run(asyncio.wait_for(run(), 5)) is False
