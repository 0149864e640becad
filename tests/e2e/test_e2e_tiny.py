"""vllm-router in front of a real prefill and decode server, started by `pdctl run` from what the
operator renders, serving the tiny random Llama: greedy tokens through the router equal
`pd-runtime generate`, and D pulled the KV (never recomputed)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.e2e.runner import DEPLOYMENTS, MAX_TOKENS, PROMPTS, pdctl_run, post
from tests.e2e.runner import TINY_MODEL as MODEL
from tests.helpers import group_members, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def deployment(tiny_ckpt: str, tmp_path_factory: pytest.TempPathFactory):
    with pdctl_run(DEPLOYMENTS / "tiny-dense.yaml", {MODEL: tiny_ckpt},
                   tmp_path_factory.mktemp("run")) as running:
        yield running


def test_greedy_through_the_router_equals_generate(deployment, expected):
    before = deployment.metrics("decode-0").get("pd_runtime_kv_pulls_total", 0.0)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        status, out = post(deployment.url + "/v1/completions",
                           {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS,
                            "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert status == 200, (out, deployment.logs())
        assert out["choices"][0]["token_ids"] == want
        assert out["usage"]["completion_tokens"] == MAX_TOKENS
    d = deployment.metrics("decode-0")
    assert d["pd_runtime_kv_pulls_total"] == before + len(PROMPTS)
    assert d["pd_runtime_kv_pull_bytes_total"] > 0
    p = deployment.metrics("prefill-0")
    assert p.get("pd_runtime_kv_pulls_total", 0.0) == 0.0
    assert p['pd_runtime_requests_total{endpoint="/v1/completions",status="200"}'] >= 2


def test_streaming_through_the_router(deployment, expected):
    import json
    import urllib.request

    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    req = urllib.request.Request(deployment.url + "/v1/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read().decode()
    events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    ids = [t for e in events[:-1] for t in json.loads(e)["choices"][0].get("token_ids", [])]
    assert ids == expected[0]


def _kv_from_prefill(deployment, prompt: list[int]) -> dict:
    """The router's P leg, by hand: what P answers is what D would get."""
    status, out = post(deployment.replica("prefill-0")["url"] + "/v1/completions", {
        "model": MODEL, "prompt": prompt, "max_tokens": 1, "min_tokens": 1, "stream": False,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                               "remote_engine_id": None, "remote_block_ids": None,
                               "remote_host": None, "remote_port": None}})
    assert status == 200, out
    return out["kv_transfer_params"]


def _idle_free_blocks(deployment, target: str) -> float | None:
    m = deployment.metrics(target)
    busy = sum(m.get(f"pd_runtime_engine_{k}", 0) for k in ("held_blocks", "running", "waiting"))
    return None if busy else m["pd_runtime_engine_free_blocks"]


@pytest.mark.parametrize("target,kv,param", [
    ("prefill-0", {"do_remote_decode": True, "remote_host": "10.1.2.3"},
     "kv_transfer_params.remote_host"),
    ("decode-0", {"do_remote_prefill": True, "remote_engine_id": "x"},
     "kv_transfer_params.remote_block_ids"),
    ("decode-0", "garbage", "kv_transfer_params"),
])
def test_malformed_kv_transfer_params_are_400_and_leak_nothing(deployment, target, kv, param):
    # an earlier test's held KV is freed when D pulls it or its lease (8 s) runs out: start
    # from a server that holds and runs nothing, so the free count moves only by this request
    before = wait_for(f"{target} idle", lambda: _idle_free_blocks(deployment, target),
                      timeout=30)
    status, out = post(deployment.replica(target)["url"] + "/v1/completions",
                       {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 2,
                        "kv_transfer_params": kv})
    assert status == 400, out
    assert out["error"]["param"].startswith(param)
    assert deployment.metrics(target).get("pd_runtime_engine_free_blocks") == before


def test_d_refuses_stale_params_of_another_prompt(deployment):
    kv = _kv_from_prefill(deployment, PROMPTS[0])
    status, out = post(deployment.replica("decode-0")["url"] + "/v1/completions",
                       {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 2,
                        "kv_transfer_params": kv})
    assert status >= 400 and "choices" not in out


def test_multi_prompt_through_p_is_refused(deployment):
    status, out = post(deployment.replica("prefill-0")["url"] + "/v1/completions", {
        "model": MODEL, "prompt": PROMPTS, "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True}})
    assert status == 400 and out["error"]["param"] == "prompt"


def test_mismatched_decode_is_refused_by_the_handshake(deployment, tiny_ckpt):
    """A decode server started by hand with another model name (a hash factor) and the run's
    token: its pull from P is refused at the handshake, naming the factor; no tokens."""
    import subprocess
    import sys

    from tests.e2e.runner import free_port, wait_healthy

    token = deployment.workdir / "mounts/prefill-0/var/run/secrets/pd-runtime/token"
    port = free_port()
    argv = [sys.executable, "-m", "pd_runtime.cli", "serve", "--role", "decode",
            "--model", "pd-test/another-name", "--model-dir", tiny_ckpt, "--family", "dense",
            "--dtype", "bfloat16", "--num-kv-heads", "8", "--head-size", "8", "--num-layers", "2",
            "--port", str(port), "--side-channel-port", str(free_port()), "--host", "127.0.0.1",
            "--device", "cpu", "--side-channel-token-file", str(token)]
    log = deployment.workdir / "logs/mismatched-decode.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log)
        kv = _kv_from_prefill(deployment, PROMPTS[0])
        status, out = post(url + "/v1/completions",
                           {"model": "pd-test/another-name", "prompt": PROMPTS[0],
                            "max_tokens": 4, "kv_transfer_params": kv})
        assert status >= 500 and "choices" not in out, out
        msg = out["error"]["message"]
        assert "hash mismatch" in msg and "differing factors: model" in msg, out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_lease_expired_before_the_pull_is_an_error(deployment):
    """P's lease (8 s, spec.prefill.args) runs out before D pulls: an error, never tokens."""
    import time

    d0 = deployment.metrics("decode-0")
    held = deployment.metrics("prefill-0")["pd_runtime_engine_kv_held"]
    kv = _kv_from_prefill(deployment, PROMPTS[0])
    assert deployment.metrics("prefill-0")["pd_runtime_engine_kv_held"] == held + 1
    time.sleep(10)
    # P freed it (and whatever earlier tests left held without a pull)
    assert deployment.metrics("prefill-0")["pd_runtime_engine_kv_held"] == 0
    status, out = post(deployment.replica("decode-0")["url"] + "/v1/completions",
                       {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                        "temperature": 0, "ignore_eos": True, "kv_transfer_params": kv})
    assert status >= 500 and "choices" not in out, out
    assert out["error"]["code"] == "kv_pull_failed"
    d1 = deployment.metrics("decode-0")
    assert d1["pd_runtime_kv_pull_failures_total"] == d0["pd_runtime_kv_pull_failures_total"] + 1
    assert d1["pd_runtime_engine_free_blocks"] == d0["pd_runtime_engine_free_blocks"]


def test_zz_prefill_killed_mid_request_never_gives_wrong_tokens(deployment, expected):
    """Last in the module: it kills P. D gets P's params after P is gone -> an error, never
    tokens; through the router the client gets an error (or, with a retry, the right tokens)."""

    kv = _kv_from_prefill(deployment, PROMPTS[0])
    failures = deployment.metrics("decode-0")
    os.killpg(deployment.replica("prefill-0")["pid"], signal.SIGKILL)
    status, out = post(deployment.replica("decode-0")["url"] + "/v1/completions",
                       {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                        "temperature": 0, "ignore_eos": True, "return_token_ids": True,
                        "kv_transfer_params": kv}, timeout=120)
    assert status in (502, 503, 504), out
    assert out["error"]["code"] == "kv_pull_failed"
    after = deployment.metrics("decode-0")
    assert after.get("pd_runtime_kv_pull_failures_total", 0) > failures.get(
        "pd_runtime_kv_pull_failures_total", 0)
    assert after.get("pd_runtime_engine_free_blocks") == failures.get(
        "pd_runtime_engine_free_blocks")  # D freed what it had allocated for the pull
    status, out = post(deployment.url + "/v1/completions",
                       {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                        "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                       timeout=120)
    if status == 200:
        assert out["choices"][0]["token_ids"] == expected[0]
    else:
        assert status >= 500 and "choices" not in out


def test_zzz_pdctl_run_stops_everything(deployment):
    """Last: SIGTERM to `pdctl run` ends every replica's process group and the router, bounded
    (the P killed above included)."""
    import time

    state = deployment.state
    pids = [r["pid"] for r in state["replicas"]] + [state["router"]["pid"]]
    t0 = time.monotonic()
    deployment.proc.send_signal(signal.SIGTERM)
    deployment.proc.wait(40)
    assert deployment.proc.returncode == 0
    for pid in pids:
        for _ in range(50):
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            if not group_members(pid):  # only zombies left
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"process group {pid} still alive")
    assert time.monotonic() - t0 < 30
