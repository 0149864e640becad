"""Shared fixtures of the e2e tier: the tiny random Llama and its offline reference."""

from __future__ import annotations

import pytest

from tests.e2e.runner import MAX_TOKENS, PROMPTS, reference


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.engine_fixtures import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "ckpt", seed=3, dtype="bfloat16")


@pytest.fixture(scope="session")
def expected(tiny_ckpt: str) -> list[list[int]]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # separate processes: overlap their start
        outs = list(pool.map(lambda p: reference(tiny_ckpt, prompt_ids=p,
                                                 max_tokens=MAX_TOKENS), PROMPTS))
    return [o["token_ids"] for o in outs]


