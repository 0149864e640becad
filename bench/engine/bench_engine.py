"""The bundled engine on this machine, against baselines measured in the same run.

1. Decode speed: tokens/s of `pd-runtime generate` (the CLI, greedy, its own generate-time
   figure) against Hugging Face transformers generating greedily with the same weights (the
   engine's own loaded checkpoint, put into a transformers model), same dtype, same prompt ids.
2. Time to first token: the same model served as P/D behind vllm-router (`pdctl run`) against
   one aggregated `pd-runtime serve`, streaming requests one at a time.

Prints a table and writes JSON.

    python bench/engine/bench_engine.py [--tokens 32] [--requests 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEPLOYMENT = ROOT / "deploy" / "examples" / "local" / "smollm2-builtin.yaml"
PROMPT = ("Disaggregated serving splits the prompt phase and the token phase of a language model "
          "across two pools of machines. Explain in a few sentences why this helps latency: ")
DTYPE = "bfloat16"


def engine_generate(gguf: str, prompt_ids: list[int], tokens: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "pd_runtime.cli", "generate", "--model", gguf,
            "--prompt-ids", ",".join(map(str, prompt_ids)), "--max-tokens", str(tokens),
            "--dtype", DTYPE, "--ignore-eos", "-o", "json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout)


def transformers_generate(gguf: str, prompt_ids: list[int], tokens: int) -> dict[str, Any]:
    """transformers' LlamaForCausalLM with exactly the weights the engine loads."""
    import torch
    import transformers

    from pd_runtime.engine.gguf import load_gguf

    cfg, weights, _ = load_gguf(gguf)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items()
                                         if k not in ("architectures", "torch_dtype")})
    model = transformers.LlamaForCausalLM(hf_cfg).to(getattr(torch, DTYPE)).eval()
    missing, unexpected = model.load_state_dict(
        {k: v.to(getattr(torch, DTYPE)) for k, v in weights.items()}, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             attention_mask=torch.ones_like(ids), pad_token_id=0)
        dt = time.perf_counter() - t0
    new = out[0, len(prompt_ids):].tolist()
    return {"token_ids": new, "generate_s": round(dt, 3), "tokens_per_s": round(len(new) / dt, 2)}


def _post_stream(url: str, body: dict[str, Any]) -> tuple[float, float]:
    """(time to the first content chunk, time to the end) of one streaming request."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if first is None and line.startswith("data: {"):  # the first token's chunk
                first = time.perf_counter() - t0
    return first if first is not None else float("nan"), time.perf_counter() - t0


def ttft(urls: dict[str, str], requests: int, tokens: int) -> dict[str, Any]:
    """Streaming requests one at a time, alternating between the servers so that a change in
    the machine's load (it is shared) hits both alike."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in urls}
    for url in urls.values():
        _post_stream(url, body)  # warm-up (first handshake, allocator)
    for _ in range(requests):
        for name, url in urls.items():
            samples[name].append(_post_stream(url, body))
    out: dict[str, Any] = {}
    for name, ss in samples.items():
        out[name] = {"ttft_s": [round(s[0], 4) for s in ss],
                     "total_s": [round(s[1], 4) for s in ss],
                     "ttft_median_s": round(statistics.median(s[0] for s in ss), 4),
                     "total_median_s": round(statistics.median(s[1] for s in ss), 4)}
    return out


def _wait(url: str, proc: subprocess.Popen[Any], timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def serving(gguf: str, requests: int, tokens: int, workdir: Path) -> dict[str, Any]:
    from pd_operator.localrun import free_ports

    port, agg_port = free_ports(1), free_ports(1)
    pd = subprocess.Popen([sys.executable, "-m", "pd_operator.cli.main", "run", str(DEPLOYMENT),
                           "--model-dir", f"{MODEL}={gguf}", "--port", str(port),
                           "--workdir", str(workdir / "pd")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    agg = subprocess.Popen([sys.executable, "-m", "pd_runtime.cli", "serve", "--role",
                            "aggregated", "--model", MODEL, "--model-dir", gguf, "--family",
                            "dense", "--dtype", DTYPE, "--num-kv-heads", "3", "--head-size", "64",
                            "--num-layers", "30", "--host", "127.0.0.1", "--port", str(agg_port),
                            "--device", "cpu"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        _wait(f"http://127.0.0.1:{port}/health", pd)
        _wait(f"http://127.0.0.1:{agg_port}/health", agg)
        return ttft({"disaggregated": f"http://127.0.0.1:{port}/v1/completions",
                     "aggregated": f"http://127.0.0.1:{agg_port}/v1/completions"},
                    requests, tokens)
    finally:
        _stop(pd)
        _stop(agg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--json", default=str(Path(__file__).parent / "result.json"))
    args = ap.parse_args()

    from pd_runtime.engine.gguf import load_gguf_tokenizer, smollm2_path

    gguf = smollm2_path()
    load_before = round(os.getloadavg()[0], 2)  # the machine may be shared: say how busy it was
    prompt_ids = load_gguf_tokenizer(gguf).encode(PROMPT)
    eng = engine_generate(gguf, prompt_ids, args.tokens)
    hf = transformers_generate(gguf, prompt_ids, args.tokens)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        serve = serving(gguf, args.requests, args.tokens, Path(tmp))
    import torch

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "load_average_1m_before_after": [load_before, round(os.getloadavg()[0], 2)]},
        "model": MODEL, "dtype": DTYPE, "prompt_tokens": len(prompt_ids),
        "new_tokens": args.tokens,
        "decode": {"engine": {k: eng[k] for k in ("generate_s", "tokens_per_s")},
                   "transformers": {k: hf[k] for k in ("generate_s", "tokens_per_s")},
                   "ratio": round(eng["tokens_per_s"] / hf["tokens_per_s"], 3),
                   "same_tokens": eng["token_ids"] == hf["token_ids"]},
        "serving": serve,
    }
    d, s = result["decode"], serve
    load = result["machine"]["load_average_1m_before_after"]
    print(f"SmolLM2-135M {DTYPE}, prompt {len(prompt_ids)} tokens, {args.tokens} new tokens, "
          f"{os.cpu_count()} cores, load average {load}")
    print(f"{'':34}{'engine':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'pd-runtime generate, tokens/s':34}{d['engine']['tokens_per_s']:>12}"
          f"{d['transformers']['tokens_per_s']:>14}{d['ratio']:>8}   same tokens: "
          f"{d['same_tokens']}")
    print(f"{'':34}{'P/D (router)':>12}{'aggregated':>14}{'ratio':>8}")
    pd_t, agg_t = s["disaggregated"]["ttft_median_s"], s["aggregated"]["ttft_median_s"]
    print(f"{'time to first token, median s':34}{pd_t:>12}{agg_t:>14}"
          f"{round(pd_t / agg_t, 2):>8}")
    pd_e, agg_e = s["disaggregated"]["total_median_s"], s["aggregated"]["total_median_s"]
    print(f"{'request latency, median s':34}{pd_e:>12}{agg_e:>14}{round(pd_e / agg_e, 2):>8}")
    Path(args.json).write_text(json.dumps(result, separators=(",", ":")) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
