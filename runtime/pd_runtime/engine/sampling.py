"""Sampling parameters, the batched sampler and stop handling.

The sampler is batch-independent by construction: each row's randomness comes from that
request's own torch.Generator (seeded requests) and is drawn for the whole vocabulary, so a
request with a given seed gets the same tokens whatever else shares its batch. Sampling uses the
exponential race (argmax of p / q with q ~ Exp(1)), which is exact multinomial sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidSamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise InvalidSamplingParams(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidSamplingParams(f"temperature must be >= 0, got {self.temperature}")
        _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParams(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, low=-1)
        if self.seed is not None:
            _check_int("seed", self.seed, low=-(2**63))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidSamplingParams("ignore_eos must be a boolean")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidSamplingParams(f"at most {MAX_STOP_STRINGS} stop strings")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_LEN:
                raise InvalidSamplingParams(
                    f"stop strings must be non-empty strings of at most {MAX_STOP_LEN} characters")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids[]", t, low=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_int(name: str, v: object, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidSamplingParams(f"{name} must be an integer, got {v!r}")
    if v < low:
        raise InvalidSamplingParams(f"{name} must be >= {low}, got {v}")


def _check_float(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidSamplingParams(f"{name} must be a finite number, got {v!r}")


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None], banned: Sequence[Sequence[int]],
           default_generator: torch.Generator | None = None) -> list[int]:
    """One token per row of float32 `logits` [B, V].

    `banned[i]`: token ids row i may not produce now (EOS / stop ids before min_tokens).
    Rows without a generator draw from `default_generator` (the engine's unseeded stream).
    """
    logits = logits.float().cpu()
    if any(banned):
        logits = logits.clone()
        for i, ids in enumerate(banned):
            if ids:
                logits[i, list(ids)] = -math.inf
    out = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    sub = logits[rows]
    temp = torch.tensor([params[i].temperature for i in rows], dtype=torch.float32)
    sub = sub / temp[:, None]
    sorted_logits, order = sub.sort(dim=-1, descending=True)
    vocab = sub.shape[-1]
    pos = torch.arange(vocab)[None, :]
    top_k = torch.tensor([params[i].top_k if params[i].top_k > 0 else vocab for i in rows])
    sorted_logits = sorted_logits.masked_fill(pos >= top_k[:, None], -math.inf)
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([params[i].top_p if params[i].top_p < 1.0 else math.inf for i in rows],
                         dtype=torch.float32)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    probs = probs.masked_fill((before > top_p[:, None]) & (pos > 0), 0.0)
    for j, i in enumerate(rows):
        g = generators[i] or default_generator
        q = torch.empty(vocab).exponential_(1.0, generator=g)
        out[i] = int(order[j, int((probs[j] / q).argmax())])
    return out


class TextStream:
    """A request's output text: stop strings cut it, and while streaming, text that could still
    become a stop string is held back until it cannot."""

    def __init__(self, detok: Any, stop: Sequence[str]):
        """`detok`: None (no text), a callable token -> text, or an incremental detokenizer
        with push(token) -> text and flush() -> the text it still holds back at the end."""
        self.detok: Callable[[int], str] | None = getattr(detok, "push", detok)
        self.tail: Callable[[], str] | None = getattr(detok, "flush", None)
        self.stop = list(stop)
        self.text = ""
        self.sent = 0

    def push(self, token_id: int, check_stop: bool) -> tuple[str, bool]:
        """Add a token's text; (text releasable now, whether a stop string matched)."""
        if self.detok is None:
            return "", False
        old = len(self.text)
        self.text += self.detok(token_id)
        if check_stop and self.stop:
            cut = self._find_stop(old)
            if cut is not None:
                self.text = self.text[:cut]
                return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held()), False

    def flush(self) -> str:
        """Everything not released yet (the request ended without a stop string)."""
        if self.tail is not None:
            self.text += self.tail()
            self.tail = None
        return self._release(len(self.text))

    def _find_stop(self, old: int) -> int | None:
        hits = []
        for s in self.stop:
            i = self.text.find(s, max(0, old - len(s) + 1))
            if i >= 0:
                hits.append(i)
        return min(hits) if hits else None

    def _held(self) -> int:
        """Length of the longest tail that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent:upto]
        self.sent = upto
        return delta
