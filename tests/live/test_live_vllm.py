"""The live tier: what the operator renders for `engine.type: vllm` runs in real vLLM 0.32.0.

- every flag rendered for 0.32.0, for every vLLM example in deploy/examples/accepted, is taken
  by vLLM 0.32.0's own argument parser (parse only, no model load); the same for 0.33.0 and
  0.28.0, whose CUDA wheels import on a CPU;
- the rendered router command is taken by vllm-router 0.1.17 (started, then stopped);
- `pdctl run` starts the rendered P and D and router: greedy output through the router equals
  P alone, D pulled the KV over NIXL, and the hash D logs at the handshake is the decodeHash
  `pdctl check -o json` predicts;
- a pair the rules reject for a hash factor (the model string; the KV cache dtype) fails in
  vLLM too, at the handshake, with hashes that differ in exactly that factor.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import stop_group
from tests.live import live

pytestmark = [pytest.mark.live]

EXAMPLES = sorted((live.ROOT / "deploy" / "examples" / "accepted").glob("*.yaml"))
LIVE_VERSION = "0.32.0"
# Parsers checked: the live version, and CUDA wheels whose parser imports on a CPU over the live
# environment's packages (0.33.0: the newest the rules know; 0.28.0: the last with
# cross_layers_blocks in the hash). 0.22.0 needs packages the live environment lacks (gguf).
PARSER_VERSIONS = [LIVE_VERSION, "0.33.0", "0.28.0"]
PROMPTS = ["The quick brown fox", "pd-operator live tier: prefill here, decode there."]


def _vllm_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            engine = doc.get("spec", {}).get("engine", {}) if isinstance(doc, dict) else {}
            if engine.get("type") == "vllm":
                out.append((f"{path.name}:{doc['metadata']['name']}", doc))
    return out


def _at_version(doc: dict[str, Any], version: str) -> dict[str, Any]:
    """The example with every vLLM engine (spec-wide and per pool) set to `version`."""
    doc = copy.deepcopy(doc)
    spec = doc["spec"]
    pinned = {"version": version, "image": f"vllm/vllm-openai:v{version}"}
    spec["engine"].update(pinned)
    for role in ("prefill", "decode"):
        pool_engine = (spec.get(role) or {}).get("engine")
        if pool_engine and pool_engine.get("type", "vllm") == "vllm":
            pool_engine.update(pinned)
    return doc


def _rendered(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> the rendered container of each pool's StatefulSet and of the router."""
    from pd_operator.render import Owner, render
    from pd_operator.validate import parse_object, validate_spec

    pdd = parse_object(doc)
    owner = Owner(name=doc["metadata"]["name"], namespace="default", uid="live")
    rendered = render(owner, validate_spec(pdd.spec))
    return {c["metadata"]["name"]: c["spec"]["template"]["spec"]["containers"][0]
            for c in rendered.children if c["kind"] in ("StatefulSet", "Deployment")}


def _parse_jobs(version: str) -> list[dict[str, Any]]:
    """Every rendered `vllm serve` of the accepted vLLM examples at `version`, plus two controls
    that must be refused (so the check can fail)."""
    jobs = []
    for label, doc in _vllm_docs():
        for name, container in _rendered(_at_version(doc, version)).items():
            argv = container["command"]
            if argv[:2] != ["vllm", "serve"]:
                continue
            env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
            jobs.append({"name": f"{label}/{name}", "args": argv[2:], "env": env})
    jobs.append({"name": "control/unknown-flag", "args": [*jobs[0]["args"], "--no-such-flag"],
                 "env": {}})
    jobs.append({"name": "control/bad-layout", "args": jobs[0]["args"],
                 "env": {"VLLM_KV_CACHE_LAYOUT": "XYZ"}})
    return jobs


@pytest.mark.timeout(1500)  # includes installing the live environment when it is missing
@pytest.mark.parametrize("version", PARSER_VERSIONS)
def test_rendered_vllm_flags_parse_in_that_vllm_version(live_python: Path, version: str,
                                                        tmp_path: Path) -> None:
    from pd_operator import live_vllm

    if version == LIVE_VERSION:
        python = live_python
    else:  # the CUDA wheel, layered over the live environment: imports on a CPU, parses
        try:
            python = live_vllm.parser_python(version)
        except live_vllm.LiveEnvError as exc:
            pytest.skip(f"vllm=={version} cannot be installed for its parser: {exc}")
    jobs = _parse_jobs(version)
    assert len(jobs) >= 20, "the accepted examples should hold many vLLM deployments"
    result_file = tmp_path / "parsed.json"
    out = subprocess.run([str(python), str(Path(__file__).with_name("vllm_parse_args.py")),
                          str(result_file)], input=json.dumps(jobs), capture_output=True,
                         text=True, timeout=500, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = {r["name"]: r for r in json.loads(result_file.read_text())}
    assert {r["version"] for r in results.values()} == {version}
    controls = [results.pop("control/unknown-flag"), results.pop("control/bad-layout")]
    assert not any(c["ok"] for c in controls), controls
    assert "--no-such-flag" in controls[0]["error"]
    refused = {n: r["error"] for n, r in results.items() if not r["ok"]}
    assert not refused, json.dumps(refused, indent=1)
    # the JSON flag became vLLM's own config object, with the rendered connector
    for job in jobs:
        if job["name"] in results:
            cfg = json.loads(job["args"][job["args"].index("--kv-transfer-config") + 1])
            assert f"'{cfg['kv_connector']}'" in results[job["name"]]["kv_transfer_config"]


def _router_argv(container: dict[str, Any], router_bin: str, dead: list[int]) -> list[str]:
    from pd_operator.localrun import LOCALHOST, _drop_discovery, _set_flag, free_ports

    argv = _drop_discovery(list(container["command"]))
    for flag, value in (("--host", LOCALHOST), ("--port", str(free_ports(1))),
                        ("--prometheus-host", LOCALHOST),
                        ("--prometheus-port", str(free_ports(1)))):
        argv = _set_flag(argv, flag, value)
    return [router_bin, *argv[1:], "--prefill", f"http://{LOCALHOST}:{dead[0]}",
            "--decode", f"http://{LOCALHOST}:{dead[1]}"]


def _start_and_stop(argv: list[str], alive_s: float) -> tuple[int | None, str]:
    """Start `argv`; (None, output) when it is still running after alive_s (then stopped), else
    (exit code, output)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        proc.wait(alive_s)
    except subprocess.TimeoutExpired:
        pass
    code = proc.poll()
    stop_group(proc, grace_s=10)
    output = proc.stdout.read() if proc.stdout else ""
    return code, output[-2000:]


@pytest.mark.timeout(300)
def test_rendered_router_command_starts_in_vllm_router_0_1_17(live_python: Path) -> None:
    from pd_operator import live_vllm
    from pd_operator.localrun import free_ports

    router_bin = str(live_vllm.router(live_python.parents[2]))
    version = subprocess.run([str(live_python), "-m", "pip", "show", "vllm-router"],
                             capture_output=True, text=True, timeout=60).stdout
    assert f"Version: {live_vllm.ROUTER_VERSION}" in version
    commands = {}
    for label, doc in _vllm_docs():
        for c in _rendered(_at_version(doc, LIVE_VERSION)).values():
            if c["command"][0] == "vllm-router":
                commands.setdefault(tuple(c["command"][1:]), (label, c))  # distinct commands
    assert any("--kv-connector" in k for k in commands), "a push example renders --kv-connector"
    dead = [free_ports(1), free_ports(1)]  # nothing listens: the router waits for its workers
    for label, container in commands.values():
        code, output = _start_and_stop(_router_argv(container, router_bin, dead), alive_s=6.0)
        assert code is None, f"{label}: vllm-router exited {code}:\n{output}"
    # the control: an argument it does not know ends it at once
    label, container = next(iter(commands.values()))
    code, output = _start_and_stop([*_router_argv(container, router_bin, dead), "--no-such-flag"],
                                   alive_s=20.0)
    assert code not in (None, 0) and "no-such-flag" in output, output


def _handshake_hashes(log: str) -> list[str]:
    return live.HASH_PASSED.findall(log)


# Admitted variants that must start and pair (issue 10 item 4): the spec as written, and one
# run that changes several admitted settings at once (a quantized KV cache CPU_ATTN has, the
# hybrid KV cache manager off, another block size), each a hash factor or a geometry.
POOL_VARIANTS: dict[str, dict[str, Any]] = {
    "as-written": {},
    "fp8-e5m2-kv-hma-off-block-64": {"kvCacheDtype": "fp8_e5m2", "hybridKVCacheManager": False,
                                     "blockSize": 64},
}


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("variant", list(POOL_VARIANTS))
def test_pd_through_router_equals_prefill_alone_and_hash_is_predicted(
        live_python: Path, live_checkpoint: str, tmp_path: Path, variant: str) -> None:
    pool = POOL_VARIANTS[variant]
    if str(pool.get("kvCacheDtype", "")).startswith("fp8"):
        live.skip_unless_cpu_fp8_kv()
    spec = live.write_spec(tmp_path / "tiny-vllm.yaml",
                           live.spec_doc(live_checkpoint, prefill=pool, decode=pool))
    predicted = live.pdctl_check(spec)
    assert predicted["accepted"] and predicted["rules"] == "vllm 0.32", predicted
    assert predicted["decodeHash"] and not predicted["hashNotes"], predicted
    with live.pdctl_run(spec, tmp_path / "run") as run:
        p_url, d_url = run.replica("prefill-0")["url"], run.replica("decode-0")["url"]
        assert any("vllm.entrypoints" in a for a in run.replica("decode-0")["argv"])
        live.warm_up_pd(run, live_checkpoint)
        pulls_before = live.metric_sum(d_url, live.XFER_COUNT)
        for prompt in PROMPTS:
            code, via_router = live.complete(run.url, live_checkpoint, prompt)
            assert code == 200, via_router
            code, alone = live.complete(p_url, live_checkpoint, prompt)
            assert code == 200, alone
            assert via_router == alone and via_router, (prompt, via_router, alone)
        pulls = live.metric_sum(d_url, live.XFER_COUNT) - pulls_before
        assert pulls >= len(PROMPTS), f"D pulled {pulls} times for {len(PROMPTS)} requests"
        hashes = _handshake_hashes(run.log("decode-0"))
        assert hashes, "D logged no NIXL compatibility check"
        assert set(hashes) == {predicted["decodeHash"]}, (hashes, predicted)
        assert predicted["prefillHash"] == predicted["decodeHash"]


def _factors(spec: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The factors pd_runtime.compat predicts for P and D of `spec` (what the hashes hash)."""
    from pd_operator.validate import parse_object, validate_spec
    from pd_runtime.compat.hashing import vllm_factors
    from pd_runtime.compat.versions import parse_version

    v = validate_spec(parse_object(yaml.safe_load(spec.read_text())).spec)
    version = parse_version(LIVE_VERSION)
    (pf, _), (df, _) = vllm_factors(v.prefill, version), vllm_factors(v.decode, version)
    assert pf is not None and df is not None
    return pf, df


# A hash factor made to differ on D, the rule that rejects it, and the factor it names.
MISMATCHES = {
    "model-string": ("MODEL-NAME-MATCH", "model"),
    "kv-cache-dtype": ("KV-DTYPE-MATCH", "cache_dtype"),
}


def _mismatched_decode(case: str, checkpoint: str, tmp_path: Path) -> dict[str, Any]:
    if case == "model-string":  # the same weights under another path string
        alias = tmp_path / "same-weights-other-path"
        alias.symlink_to(checkpoint)
        return {"model": {"name": str(alias)}}
    return {"kvCacheDtype": "fp8_e5m2"}  # a KV dtype CPU_ATTN has (vLLM 0.32.0 cpu_attn.py)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_hash_factor_rejected_by_rules_fails_in_vllm_at_the_handshake(
        live_python: Path, live_checkpoint: str, tmp_path: Path, case: str) -> None:
    from pd_runtime.compat.hashing import differing_factors, hash_factors

    rule, factor = MISMATCHES[case]
    if case == "kv-cache-dtype":  # D's KV cache is fp8_e5m2
        live.skip_unless_cpu_fp8_kv()
    # policy Warn: the rules still say what they would reject, and pdctl run starts the pair
    doc = live.spec_doc(live_checkpoint, validation={"policy": "Warn"},
                        decode=_mismatched_decode(case, live_checkpoint, tmp_path))
    spec = live.write_spec(tmp_path / "mismatch.yaml", doc)
    predicted = live.pdctl_check(spec)
    rules = {v["rule"]: v for v in predicted["verdicts"]}
    assert rule in rules, predicted
    assert "would reject" in json.dumps(rules[rule])
    pf, df = _factors(spec)
    assert differing_factors(pf, df) == [factor]
    assert (hash_factors(pf), hash_factors(df)) == (predicted["prefillHash"],
                                                    predicted["decodeHash"])
    with live.pdctl_run(spec, tmp_path / "run") as run:
        d_url = run.replica("decode-0")["url"]

        def send() -> None:  # every request through the router fails (no KV pulled)
            code, body = live.complete(run.url, live_checkpoint, PROMPTS[0])
            assert code != 200 or "error" in json.dumps(body), (code, body)

        # sent again only when D's handshake with P timed out (live.request_until_handshake)
        assert live.request_until_handshake(run, send) == "mismatch", \
            live.handshake_outcomes(run.log("decode-0"))
        log = run.log("decode-0")
        mismatch = [line for line in log.splitlines() if live.HASH_MISMATCH in line][0]
        # vLLM's message: "Local: <D's hash>, Remote: <P's hash>": exactly the predictions,
        # which differ in the one factor the rule names
        assert f"Local: {predicted['decodeHash']}" in mismatch, mismatch
        assert f"Remote: {predicted['prefillHash']}" in mismatch, mismatch
        assert not _handshake_hashes(log)
        assert live.metric_sum(d_url, live.XFER_COUNT) == 0
