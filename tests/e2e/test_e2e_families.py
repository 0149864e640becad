"""One cell per engine family through vllm-router (issue 12 item 9): `pdctl run` serves a tiny
random checkpoint of the family as a P/D pair, the greedy tokens through the router equal
`pd-runtime generate`, and D pulled the KV (its pull counter went up), never recomputed.
Plus a dense cell with P's KV in HND and D's in NHD (the pull permutes between them)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.e2e.runner import DEPLOYMENTS, MAX_TOKENS, PROMPTS, pdctl_run, post, reference

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PROMPT = PROMPTS[0]  # 21 tokens: more than a block (16) and than the sliding window (5)


def _family(name: str) -> Callable[[Path], str]:
    def write(path: Path) -> str:
        pytest.importorskip("transformers")
        from tests.engine_fixtures import write_family

        return _as_bfloat16(write_family(path, name, seed=4))

    return write


def _as_bfloat16(ckpt: str) -> str:
    """write_family's float32 checkpoint cast to bfloat16 in place: the builtin runtime serves
    bfloat16, and preflight refuses a spec.model.dtype the checkpoint is not."""
    import json

    from safetensors.torch import load_file, save_file

    for shard in Path(ckpt).glob("*.safetensors"):
        tensors = {n: t.to(torch.bfloat16) if t.is_floating_point() else t
                   for n, t in load_file(str(shard)).items()}
        save_file(tensors, str(shard), metadata={"format": "pt"})
    config = Path(ckpt) / "config.json"
    cfg = json.loads(config.read_text())
    cfg.update({k: "bfloat16" for k in ("dtype", "torch_dtype") if k in cfg} or
               {"torch_dtype": "bfloat16"})
    config.write_text(json.dumps(cfg, indent=1))
    return ckpt


def _dense(path: Path) -> str:
    from tests.engine_fixtures import write_tiny_llama

    return write_tiny_llama(path, seed=5, dtype="bfloat16")


# cell -> (deployment YAML, checkpoint writer); spec.model in each YAML is what
# `pdctl model-info` prints for the checkpoint (dtype bfloat16: what the builtin runtime serves)
CELLS: dict[str, tuple[str, Callable[[Path], str]]] = {
    "moe": ("tiny-moe.yaml", _family("moe")),
    "mla": ("tiny-mla.yaml", _family("mla")),
    "sliding": ("tiny-sliding.yaml", _family("sliding")),
    "hybrid-ssm": ("tiny-hybrid.yaml", _family("hybrid")),
    "dense-hnd-to-nhd": ("tiny-dense-hnd-nhd.yaml", _dense),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every cell's checkpoint directory, written lazily by the cell itself (a skip stays local)."""
    return {cell: tmp_path_factory.mktemp(cell) / "ckpt" for cell in CELLS}


def _model_name(deployment: Path) -> str:
    import yaml

    return yaml.safe_load(deployment.read_text())["spec"]["model"]["name"]


@pytest.mark.parametrize("cell", list(CELLS))
def test_family_greedy_through_the_router_equals_generate(cell: str, checkpoints,
                                                          tmp_path: Path):
    file, write = CELLS[cell]
    deployment = DEPLOYMENTS / file
    model = _model_name(deployment)
    ckpt = write(checkpoints[cell])
    with ThreadPoolExecutor(1) as pool:
        # the offline reference runs while `pdctl run` starts the pair and the router
        want = pool.submit(reference, ckpt, prompt_ids=PROMPT, max_tokens=MAX_TOKENS)
        with pdctl_run(deployment, {model: ckpt}, tmp_path) as running:
            before = running.metrics("decode-0").get("pd_runtime_kv_pulls_total", 0.0)
            status, out = post(running.url + "/v1/completions",
                               {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                "temperature": 0, "ignore_eos": True,
                                "return_token_ids": True})
            assert status == 200, (out, running.logs())
            d = running.metrics("decode-0")
            p = running.metrics("prefill-0")
        assert out["choices"][0]["token_ids"] == want.result()["token_ids"]
    assert d["pd_runtime_kv_pulls_total"] == before + 1
    assert d["pd_runtime_kv_pull_bytes_total"] > 0
    assert p.get("pd_runtime_kv_pulls_total", 0.0) == 0.0
