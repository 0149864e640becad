"""The bundled runtime's OpenAI-compatible server (`pd-runtime serve`).

protocol.py  request bodies and vLLM's P/D kv_transfer_params, validated at the edge
app.py       aiohttp handlers over the engine (completions, chat, SSE, models, health, metrics)
metrics.py   Prometheus registry per server (HTTP-side counters + the engine's stats)
preflight.py checks before serving: checkpoint vs declared model, devices, side-channel token
cli.py       the `pd-runtime serve` arguments (exactly what render/engine.py renders + local ones)
"""
