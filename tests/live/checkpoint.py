"""The live tier's model: a tiny random-weight Llama (tests/engine_fixtures.py) plus a tokenizer
vLLM accepts, so that the router's text requests work. No hub access.

The tokenizer is byte-level BPE without merges: every byte is a token (ids 0-255), plus <s> and
</s>; any text encodes and decodes. The model's vocabulary is larger than the tokenizer's, as
real checkpoints' often are.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.engine_fixtures import write_tiny_llama

# The geometry the spec in deployments/tiny-vllm.yaml declares (and the hash includes).
NUM_KV_HEADS, HEAD_SIZE, NUM_LAYERS = 2, 64, 2
VOCAB = 320
BOS, EOS = 256, 257


def write_byte_tokenizer(path: str | Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    vocab |= {"<s>": BOS, "</s>": EOS}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    out = Path(path)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": False, "model_max_length": 1024, "clean_up_tokenization_spaces": False,
    }))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>",
                                                             "eos_token": "</s>"}))


def write_live_checkpoint(path: str | Path, seed: int = 0) -> str:
    """config.json + model.safetensors (bfloat16) + tokenizer files in `path`."""
    out = write_tiny_llama(path, seed=seed, layers=NUM_LAYERS, hidden=256, heads=4,
                           kv_heads=NUM_KV_HEADS, head_dim=HEAD_SIZE, intermediate=512,
                           vocab=VOCAB, dtype="bfloat16", eos_token_id=EOS,
                           max_position=1024)
    write_byte_tokenizer(out)
    return out
