"""A PDDeployment served for real (issue 9 items 4, 5, 7): the chart's operator (in a pod on the
real node) launches SmolLM2 as P/D with the bundled engine from the runtime image; the pods run,
KVPathVerified turns True from a real pull, a completion sent to the router Service has the same
text as offline `pd-runtime generate`, and D's pull counter rises. Then a P pod is deleted under
load (clients see errors, never wrong text; the StatefulSet brings it back; KVPathVerified goes
False then True), a P TP 1 -> D TP 3 pair serves the same text, and `kubectl delete pdd` removes
every pod and the side-channel Secret.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.e2e.runner import reference
from tests.helpers import post_json, wait_for
from tests.realnode.release import Release, ensure_crd

# func_only: see test_chart_realnode.py (the cold session setup is not this test's time)
pytestmark = [pytest.mark.realnode, pytest.mark.cluster, pytest.mark.slow,
              pytest.mark.timeout(1500, func_only=True)]

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "deploy" / "examples" / "local"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
MAX_TOKENS = 8
ROLE = "serving.pd-operator.dev/role"


@pytest.fixture(scope="module")
def release(real_cluster, real_kubectl, real_images):
    ensure_crd(real_kubectl)
    rel = Release(real_cluster.kubeconfig, real_kubectl, namespace=None)
    real_kubectl("create", "namespace", rel.ns)
    try:
        rel.install()
        yield rel
    finally:
        rel.uninstall()
        real_kubectl("delete", "namespace", rel.ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def expected() -> dict:
    from pd_runtime.engine.gguf import smollm2_path

    return reference(smollm2_path(), prompt=PROMPT, max_tokens=MAX_TOKENS)


def _pdd(release: Release, name: str) -> dict:
    return json.loads(release.kubectl("get", "pdd", name, "-n", release.ns, "-o", "json").stdout)


def _condition(pdd: dict, kind: str) -> dict:
    return next((c for c in (pdd.get("status") or {}).get("conditions", [])
                 if c["type"] == kind), {})


def _pods(release: Release, name: str, role: str) -> list[dict]:
    return json.loads(release.kubectl(
        "get", "pods", "-n", release.ns, "-l",
        f"app.kubernetes.io/instance={name},{ROLE}={role}", "-o", "json").stdout)["items"]


def _apply(release: Release, example: str) -> str:
    obj = yaml.safe_load((LOCAL / example).read_text())
    obj["metadata"]["namespace"] = release.ns
    release.kubectl("apply", "-f", "-", input=json.dumps(obj))
    return obj["metadata"]["name"]


def _wait_ready(release: Release, name: str, timeout: float = 600) -> dict:
    return wait_for(f"{name} Ready (pods running, KVPathVerified)", lambda: (
        (p := _pdd(release, name)).get("status", {}).get("phase") == "Ready" and p),
        timeout=timeout, every=3, diagnose=lambda: release.diagnose(name))


def _router_url(release: Release, name: str) -> str:
    ip = release.kubectl("get", "svc", f"{name}-router", "-n", release.ns, "-o",
                         "jsonpath={.spec.clusterIP}").stdout
    return f"http://{ip}:8000"


def _complete(url: str, timeout: float = 180) -> tuple[int, dict]:
    return post_json(url + "/v1/completions",
                     {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                      "temperature": 0, "return_token_ids": True}, timeout)


def _first_answer(release: Release, name: str, url: str) -> dict:
    """The router discovers the pods a few seconds after they are Ready: retry until 200."""
    def answered():
        status, out = _complete(url)
        return out if status == 200 else None
    return wait_for(f"{name}: a completion through the router", answered, timeout=240,
                    every=2, diagnose=lambda: release.diagnose(name))


def _pulls(pod: dict) -> float:
    url = f"http://{pod['status']['podIP']}:8000/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("pd_runtime_kv_pulls_total "):
                return float(line.split()[1])
    return 0.0


@pytest.fixture(scope="module")
def smollm2(release):
    name = _apply(release, "smollm2-realnode.yaml")
    _wait_ready(release, name)
    return name


def test_completion_through_the_router_equals_offline_generate(release, smollm2, expected):
    pdd = _pdd(release, smollm2)
    verified = _condition(pdd, "KVPathVerified")
    assert verified["status"] == "True" and "pulled" in verified["message"], verified
    url = _router_url(release, smollm2)
    out = _first_answer(release, smollm2, url)
    assert out["choices"][0]["text"] == expected["text"]
    assert out["choices"][0]["token_ids"] == expected["token_ids"]
    (decode,) = _pods(release, smollm2, "decode")
    before = _pulls(decode)
    status, again = _complete(url)
    assert status == 200 and again["choices"][0]["text"] == expected["text"]
    assert _pulls(decode) == before + 1  # D pulled the prompt's KV from P, once


def test_deleting_a_prefill_pod_under_load(release, smollm2, expected):
    url = _router_url(release, smollm2)
    (old,) = _pods(release, smollm2, "prefill")
    answers: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                status, out = _complete(url, timeout=60)
            except OSError as exc:  # the router closed the connection: an error, not text
                answers.append((time.monotonic(), 0, repr(exc)))
                continue
            text = out["choices"][0]["text"] if status == 200 else None
            answers.append((time.monotonic(), status, text))

    workers = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        wait_for("answers before the deletion", lambda: len(answers) >= 2, timeout=120)
        release.kubectl("delete", "pod", old["metadata"]["name"], "-n", release.ns,
                        "--wait=false")
        deleted_at = time.monotonic()
        wait_for("KVPathVerified False while P is replaced", lambda: _condition(
            _pdd(release, smollm2), "KVPathVerified").get("status") == "False", timeout=120,
            every=0.5)
        pdd = _wait_ready(release, smollm2)
        assert _condition(pdd, "KVPathVerified")["status"] == "True"
        (new,) = _pods(release, smollm2, "prefill")
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        recovered = time.monotonic()
        wait_for("answers after P came back", lambda: sum(
            1 for t, s, _ in answers if t > recovered and s == 200) >= 2, timeout=240,
            diagnose=lambda: f"{answers[-5:]}\n{release.diagnose(smollm2)}")
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=90)
    texts = [text for _, status, text in answers if status == 200]
    assert texts and all(t == expected["text"] for t in texts), set(texts)
    errors = [(s, t) for when, s, t in answers if s != 200]
    assert all(s != 200 for s, _ in errors)
    assert any(when > deleted_at for when, _, _ in answers)


def test_delete_pdd_removes_every_pod_and_the_token_secret(release, smollm2):
    secret = f"{smollm2}-side-channel-token"
    assert release.kubectl("get", "secret", secret, "-n", release.ns,
                           check=False).returncode == 0
    release.kubectl("delete", "pdd", smollm2, "-n", release.ns, "--wait=true",
                    "--timeout=120s")

    def gone():
        pods = release.kubectl("get", "pods", "-n", release.ns, "-l",
                               f"app.kubernetes.io/instance={smollm2}", "-o", "name").stdout
        left = release.kubectl("get", "secret", secret, "-n", release.ns, check=False)
        return not pods.strip() and left.returncode != 0
    wait_for(f"{smollm2}'s pods and Secret deleted", gone, timeout=180, every=2,
             diagnose=lambda: release.diagnose(smollm2))


def test_p1_d3_serves_the_same_text(release, expected):
    name = _apply(release, "smollm2-realnode-p1-d3.yaml")
    try:
        _wait_ready(release, name, timeout=900)
        (decode,) = _pods(release, name, "decode")
        assert decode["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "3"
        out = _first_answer(release, name, _router_url(release, name))
        assert out["choices"][0]["text"] == expected["text"]
        assert _pulls(decode) >= 1
    finally:
        release.kubectl("delete", "pdd", name, "-n", release.ns, "--wait=false", check=False)
