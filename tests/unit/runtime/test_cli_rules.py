"""`pd-runtime transfer-test` exit code 2: a pairing the rules reject, with the rule."""

from __future__ import annotations

import json

from pd_runtime import capabilities
from pd_runtime.cli import main


def test_rejected_pairing_exits_2_with_reason(capsys):
    rc = main(["transfer-test", "--kv-heads", "4", "--p-tp", "3", "--rules", "capabilities",
               "-o", "json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 2
    assert out["result"] == "rejected"
    assert any("TP 3" in r for r in out["rules"])


def test_capabilities_accept_what_vllm_rejects():
    pre = dict(family="dense", num_kv_heads=2, tp=4, block_size=32, layout="NHD",
               kv_cache_dtype="fp8", dtype="bfloat16", model="m")
    dec = dict(pre, tp=1, block_size=16, layout="HND")
    assert capabilities.unsupported(pre, dec) == []
    assert capabilities.unsupported(pre, dict(dec, kv_cache_dtype="auto"))  # dtype must match
    assert not capabilities.tp_fits_heads(3, 4)
