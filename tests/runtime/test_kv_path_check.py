"""POST /pd/v1/kv-path-check between two real engine servers (`pd-runtime serve`, prefill and
decode, tiny Llama on CPU, NIXL over UCX), and the operator's check function against them.

The decode server pulls a fresh pattern from the prefill server's side channel: ok with the
bytes and the time; no bearer token -> 401 Unauthorized, a wrong one -> 403 Forbidden; a
prefill side channel that is down -> Unreachable; a prefill rank whose staged pattern is
corrupted (tests/runtime/faults.py) -> PatternMismatch; the prefill side keeps no lease and no
staging slot after any of them. A TP 2 prefill server (rank 1 a worker process, gloo) runs a
side channel per rank: the operator's plan (base port + rank) reaches both through the decode
server's endpoint, and KVPathVerified covers both ranks.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, nixl_import_error, post_json, stop_group, wait_for

NIXL_ERR = nixl_import_error()
pytestmark = [
    pytest.mark.nixl,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(NIXL_ERR is not None, reason=f"nixl cannot be imported here: {NIXL_ERR}"),
]

TOKEN = "kv-path-check-test-token"
MODEL = "pd-test/tiny"
CHECK = "/pd/v1/kv-path-check"
MIB = 1 << 20


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, side_port: int, log: Path):
        self.proc, self.url, self.side_port, self.log = proc, url, side_port, log


def _serve(role: str, model_dir: str, token_file: Path, tmp: Path, tp: int = 1) -> Server:
    from pd_operator.localrun import free_ports

    # rank r listens on side + r; one port more than the ranks stays free for the tests
    port, side = free_port(), (free_port() if tp == 1 else free_ports(tp + 1))
    argv = [sys.executable, "-m", "pd_runtime.cli", "serve", "--role", role, "--model", MODEL,
            "--model-dir", model_dir, "--family", "dense", "--dtype", "bfloat16",
            "--num-kv-heads", "8", "--head-size", "8", "--num-layers", "2",
            "--buffer-device", "cpu", "--device", "cpu", "--host", "127.0.0.1",
            "--port", str(port), "--side-channel-port", str(side),
            "--side-channel-host", "127.0.0.1", "--side-channel-token-file", str(token_file),
            "--kv-cache-memory", "8MiB", "--tensor-parallel-size", str(tp)]
    log = tmp / f"{role}-tp{tp}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Server(proc, f"http://127.0.0.1:{port}", side, log)


def _healthy(s: Server) -> bool:
    if s.proc.poll() is not None:
        raise AssertionError(f"server exited {s.proc.returncode}:\n{s.log.read_text()[-3000:]}")
    try:
        with urllib.request.urlopen(s.url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.engine_fixtures import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "ckpt", seed=5, dtype="bfloat16")


@pytest.fixture(scope="module")
def servers(model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("kvcheck")
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    started = [_serve("prefill", model_dir, token_file, tmp),
               _serve("decode", model_dir, token_file, tmp)]
    try:
        for s in started:
            wait_for(f"{s.url} healthy", lambda s=s: _healthy(s), timeout=180)
        yield started[0], started[1]
    finally:
        for s in started:
            stop_group(s.proc, grace_s=20)


@pytest.fixture(scope="module")
def prefill_tp2(model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """A prefill server with TP 2: side channels on side_port (rank 0) and side_port + 1."""
    tmp = tmp_path_factory.mktemp("kvcheck-tp2")
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    s = _serve("prefill", model_dir, token_file, tmp, tp=2)
    try:
        wait_for(f"{s.url} (TP 2) healthy", lambda: _healthy(s), timeout=180)
        yield s
    finally:
        stop_group(s.proc, grace_s=20)


def check(d: Server, prefill: str, token: str | None = TOKEN, **body: Any
          ) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        d.url + CHECK, method="POST",
        data=json.dumps({"version": 1, "prefill": prefill, **body}).encode(),
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {token}"} if token is not None else {})})
    try:
        with urllib.request.urlopen(req, timeout=90) as r:  # noqa: S310 - local URL
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_pull_from_a_real_prefill_server(servers):
    p, d = servers
    for _ in range(2):  # the second check reuses D's probe; P loads its agent once
        status, out = check(d, f"127.0.0.1:{p.side_port}", bytes=MIB)
        assert status == 200 and out["ok"] is True, out
        assert out["version"] == 1 and out["bytes"] == MIB and out["error"] is None
        assert 0 < out["read_seconds"] <= out["seconds"] < 30


def test_no_or_wrong_token_is_refused_by_name(servers):
    p, d = servers
    status, out = check(d, f"127.0.0.1:{p.side_port}", token=None)
    assert status == 401 and out["ok"] is False and out["error"]["code"] == "Unauthorized"
    status, out = check(d, f"127.0.0.1:{p.side_port}", token="not-the-token")
    assert status == 403 and out["error"]["code"] == "Forbidden"


def test_invalid_requests_are_named(servers):
    p, d = servers
    status, out = check(d, f"127.0.0.1:{p.side_port}", bytes=0)
    assert status == 400 and out["error"]["code"] == "InvalidRequest"
    assert "bytes" in out["error"]["message"]
    status, out = check(d, "no-port-here")
    assert status == 400 and "host:port" in out["error"]["message"]
    status, out = post_json(d.url + CHECK, {"version": 2, "prefill": "a:1"}, 30)
    assert status == 401  # the token comes first: nothing is parsed for a stranger
    status, out = check(d, "a:1", version=2)
    assert status == 400 and out["error"]["code"] == "UnsupportedVersion"


def test_prefill_server_refuses_to_check(servers):
    p, _ = servers
    status, out = check(p, f"127.0.0.1:{p.side_port}")
    assert status == 409 and out["error"]["code"] == "NotDecodeServer"


def test_prefill_down_is_unreachable(servers):
    _, d = servers
    status, out = check(d, f"127.0.0.1:{free_port()}", timeout_s=5)
    assert status == 200 and out["ok"] is False
    assert out["error"]["code"] == "Unreachable", out


def _in_process_prefill(model_dir: str, token: str):
    """A prefill rank in this process with the servers' geometry and factors (the same hash)."""
    import torch

    from pd_runtime.engine.checkpoint import load_checkpoint
    from pd_runtime.engine.core import rank_spec_for
    from pd_runtime.engine.pd import engine_factors, make_prefill_side
    from pd_runtime.kvcache import arena_layout

    cfg = load_checkpoint(model_dir).config
    spec = rank_spec_for(cfg, block_size=16, layout="HND", num_blocks=16)
    arena = torch.zeros(arena_layout(spec).nbytes, dtype=torch.uint8)
    return make_prefill_side(spec, engine_factors(cfg, MODEL), token, arena)


def _released(rank) -> bool:
    st = rank.stats()
    return st["held"] == 0 and st["staging_in_use"] == 0


def test_corrupted_pattern_is_a_mismatch_and_nothing_stays_held(servers, model_dir):
    from tests.runtime.faults import corrupt_patterns

    _, d = servers
    side = _in_process_prefill(model_dir, TOKEN)
    rank = side.ranks[0]
    try:
        addr = f"127.0.0.1:{rank.address[1]}"
        status, out = check(d, addr, bytes=MIB)
        assert status == 200 and out["ok"] is True, out
        wait_for("P's slot released", lambda: _released(rank), timeout=10, every=0.05)
        corrupt_patterns(rank)
        status, out = check(d, addr, bytes=MIB)
        assert status == 200 and out["ok"] is False, out
        assert out["error"]["code"] == "PatternMismatch"
        assert "1 of 1048576 bytes differ" in out["error"]["message"]
        wait_for("P's slot released", lambda: _released(rank), timeout=10, every=0.05)
        assert rank.stats()["completed"] == 2
    finally:
        side.close()


def test_prefill_refusals_are_named_and_hold_nothing(servers, model_dir):
    """A pattern larger than P's free staging is refused (staging-full -> PrefillRefused) and
    its lease ends at once; a pattern asked before the meta handshake is refused by name."""
    from pd_runtime.handshake import SideChannelClient
    from pd_runtime.protocol import PatternRequest, UnexpectedMessage

    _, d = servers
    side = _in_process_prefill(model_dir, TOKEN)  # 16 blocks: about 1.3 MiB of staging
    rank = side.ranks[0]
    try:
        status, out = check(d, f"127.0.0.1:{rank.address[1]}", bytes=8 * MIB)
        assert status == 200 and out["error"]["code"] == "PrefillRefused", out
        assert "staging" in out["error"]["message"]
        assert _released(rank) and rank.stats()["completed"] == 1
        client = SideChannelClient("127.0.0.1", rank.address[1], TOKEN.encode(), 5)
        try:
            with pytest.raises(UnexpectedMessage, match="before meta"):
                client.call(PatternRequest("kvcheck-x", MIB, 1))
        finally:
            client.close()
        assert _released(rank)
    finally:
        side.close()


def test_prefill_with_another_token_is_refused_by_the_side_channel(servers, model_dir):
    _, d = servers
    side = _in_process_prefill(model_dir, "another-token")
    try:
        status, out = check(d, f"127.0.0.1:{side.ranks[0].address[1]}", timeout_s=5)
        assert status == 200 and out["error"]["code"] == "SideChannelAuthFailed", out
    finally:
        side.close()


# ------------------------------------------------------------------ the operator's side
def test_operator_check_function_against_the_servers(servers):
    """pd_operator.kvpath_check.check: what KVPathVerified runs, against real servers."""
    from pd_operator import kvpath, kvpath_check

    p, d = servers
    decode = d.url.removeprefix("http://")
    prefill = f"127.0.0.1:{p.side_port}"
    t0 = time.monotonic()
    ok = asyncio.run(kvpath_check.check(decode, prefill, TOKEN))
    assert ok.ok and ok.reason == "Verified" and ok.bytes == kvpath.CHECK_BYTES, ok
    assert 0 < ok.seconds < time.monotonic() - t0
    wrong = asyncio.run(kvpath_check.check(decode, prefill, "wrong"))
    assert not wrong.ok and wrong.reason == "Forbidden"
    down = asyncio.run(kvpath_check.check(decode, f"127.0.0.1:{free_port()}", TOKEN,
                                          timeout_s=5))
    assert not down.ok and down.reason == "Unreachable"
    gone = asyncio.run(kvpath_check.check(f"127.0.0.1:{free_port()}", prefill, TOKEN,
                                          call_timeout_s=5))
    assert not gone.ok and gone.reason == kvpath_check.DECODE_UNREACHABLE


def test_every_rank_of_a_tp2_prefill_server_is_checked(servers, prefill_tp2):
    """The endpoint pulls from rank 1's side channel (a worker process of its own) as from rank
    0's; the operator's plan finds both at base + rank and needs both; a rank the pod does
    not run (base + 2) fails, named."""
    from pd_operator import kvpath, kvpath_check

    _, d = servers
    p2 = prefill_tp2
    for rank in (0, 1):
        status, out = check(d, f"127.0.0.1:{p2.side_port + rank}", bytes=MIB)
        assert status == 200 and out["ok"] is True, (rank, out)
        assert out["bytes"] == MIB and 0 < out["read_seconds"] <= out["seconds"]
    pair = kvpath.Pair(kvpath.PodRef("demo-prefill-0", "p", "127.0.0.1", 0),
                       kvpath.PodRef("demo-decode-0", "d", "127.0.0.1", 0))
    d_port = int(d.url.rsplit(":", 1)[1])
    checks = kvpath.plan(pair, d_port, (p2.side_port, p2.side_port + 1))
    assert [c.prefill for c in checks] == [f"127.0.0.1:{p2.side_port}",
                                           f"127.0.0.1:{p2.side_port + 1}"]
    ok = asyncio.run(kvpath_check.check_ranks(checks, TOKEN))
    assert ok.ok and ok.ranks == 2 and ok.bytes == kvpath.CHECK_BYTES, ok
    three = kvpath.plan(pair, d_port, tuple(p2.side_port + r for r in range(3)))
    bad = asyncio.run(kvpath_check.check_ranks(three, TOKEN, timeout_s=5))
    assert (bad.ok, bad.reason, bad.rank, bad.ranks) == (False, "Unreachable", 2, 3), bad


def test_the_operator_speaks_the_servers_wire():
    from pd_operator import kvpath
    from pd_runtime.serve import kvcheck

    assert kvpath.CHECK_PATH == kvcheck.KV_PATH_CHECK
    assert kvpath.WIRE_VERSION == kvcheck.WIRE_VERSION
    assert kvpath.CHECK_BYTES <= kvcheck.MAX_CHECK_BYTES
    assert kvpath.CHECK_TIMEOUT_S <= kvcheck.MAX_TIMEOUT_S


class _FakeAPI:
    """The API server as the operator's KV path check sees it: both pools' pods at 127.0.0.1
    (where the servers listen), the token Secret, and the statuses written."""

    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []

    async def apply(self, obj, **_):
        return obj

    async def create(self, obj, **_):
        return obj

    async def get(self, api_version, kind, namespace, name):
        import base64

        return {"data": {"token": base64.b64encode(TOKEN.encode()).decode()}} \
            if kind == "Secret" else None

    async def list(self, api_version, kind, namespace=None, label_selector=None):
        role = "prefill" if "component=prefill" in (label_selector or "") else "decode"
        return [{"metadata": {"name": f"demo-{role}-0", "uid": role},
                 "status": {"phase": "Running", "podIP": "127.0.0.1",
                            "conditions": [{"type": "Ready", "status": "True"}]}}]

    async def patch_merge(self, api_version, kind, namespace, name, patch, subresource=None):
        self.statuses.append(patch["status"])
        return patch


def test_the_operator_sets_kv_path_verified_against_the_servers(servers, monkeypatch):
    """The handlers' check (pods, token, status) end to end against the real servers: the
    decode port is the test server's (the operator calls the rendered engine port)."""
    p, d = servers
    message = _operator_check(p, d, 1, monkeypatch)
    assert message.startswith("pulled 4.0 MiB from demo-prefill-0 to demo-decode-0 in ")


def test_the_operator_verifies_both_ranks_of_a_tp2_prefill_pool(servers, prefill_tp2,
                                                                monkeypatch):
    _, d = servers
    message = _operator_check(prefill_tp2, d, 2, monkeypatch)
    assert message.startswith("pulled 4.0 MiB from each of 2 ranks of demo-prefill-0 to "
                              "demo-decode-0 in "), message


def _operator_check(p: Server, d: Server, prefill_tp: int, monkeypatch) -> str:
    """Run the handlers' check once against `p` and `d`; the KVPathVerified message (True)."""
    import kopf

    from pd_operator import handlers
    from tests.helpers import sample_pdd

    api = _FakeAPI()
    monkeypatch.setattr(handlers.RUNTIME, "client", api)
    monkeypatch.setattr(handlers.RUNTIME, "owned", {})
    monkeypatch.setattr(handlers.RUNTIME, "kv_path_verification", True)
    monkeypatch.setattr(handlers, "ENGINE_HTTP_PORT", int(d.url.rsplit(":", 1)[1]))
    monkeypatch.setattr(kopf, "event", lambda *a, **k: None)
    pdd = sample_pdd(name="demo", namespace="ns1",
                     model={"name": MODEL, "family": "dense", "dtype": "bfloat16",
                            "numKVHeads": 8, "headSize": 8, "numHiddenLayers": 2},
                     engine={"type": "builtin", "image": "ghcr.io/pd-operator/pd-runtime:0.1.0"},
                     prefill={"replicas": 1, "attentionBackend": "auto",
                              "tensorParallelSize": prefill_tp},
                     decode={"replicas": 1, "attentionBackend": "auto"},
                     kvTransfer={"sideChannelPort": p.side_port, "bufferDevice": "cpu"})
    pdd["metadata"].update(uid="u1", generation=1)

    async def scenario():
        import logging

        await handlers.reconcile(kopf.Body(pdd), logging.getLogger("t"))
        state = handlers.RUNTIME.owned[("ns1", "demo")]
        for child in state.desired_children.values():
            if child["kind"] in ("StatefulSet", "Deployment"):
                n = child["spec"]["replicas"]
                handlers._observe(state, {**child, "status": {"readyReplicas": n,
                                                              "updatedReplicas": n}})
        owner = handlers.labels.Owner("demo", "ns1", "u1")
        return await handlers._check_once(api, owner, state, 0)

    outcome = asyncio.run(scenario())
    assert outcome is not None and outcome.ok, outcome
    last = api.statuses[-1]
    cond = next(c for c in last["conditions"] if c["type"] == "KVPathVerified")
    assert cond["status"] == "True" and cond["reason"] == "Verified"
    assert last["phase"] == "Ready"
    assert outcome.ranks == prefill_tp
    return str(cond["message"])
