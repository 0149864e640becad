"""Load a model: a Hugging Face directory (config.json + *.safetensors [+ tokenizer.json]) or a
GGUF file (engine.gguf.load_gguf, dequantized at load). Weights keep Hugging Face names and full
(unsharded) shapes; ModelRunner slices them per TP rank."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or field."""


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # Hugging Face names, full tensors, config.dtype
    tokenizer: Any  # engine.tokenizer.Tokenizer, or None for test checkpoints without one
    source: str


def load_checkpoint(path: str, dtype: str | None = None) -> Checkpoint:
    """`path`: a directory with config.json and *.safetensors, or a .gguf file. `dtype` overrides
    the config's dtype (the weights are cast to it)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return _load_gguf(p, dtype)
    if not p.is_dir():
        raise CheckpointError(f"{path}: neither a checkpoint directory nor a .gguf file")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not JSON ({e})") from e
    cfg = _config(raw, cfg_file, dtype)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            weights[name] = t.to(cfg.torch_dtype) if t.is_floating_point() else t
    tok = None
    if (p / "tokenizer.json").is_file():
        from .tokenizer import load_tokenizer_json

        tok = load_tokenizer_json(str(p / "tokenizer.json"))
    return Checkpoint(cfg, weights, tok, str(p))


def _config(raw: dict, where: object, dtype: str | None) -> ModelConfig:
    try:
        return ModelConfig.from_hf(raw).with_dtype(dtype)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e


def _load_gguf(p: Path, dtype: str | None) -> Checkpoint:
    from .gguf import load_gguf

    raw, weights, tok = load_gguf(str(p))
    cfg = _config(raw, p, dtype)
    weights = {
        k: (v.to(cfg.torch_dtype) if v.is_floating_point() else v) for k, v in weights.items()
    }
    return Checkpoint(cfg, weights, tok, str(p))
