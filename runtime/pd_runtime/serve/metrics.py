"""Prometheus metrics of one server: what the HTTP layer sees (requests, tokens, latencies,
failures) plus the engine's own counters read at scrape time (KV pulls and bytes, blocks).

Each server owns its registry (several servers in one test process must not share counters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Engine stats (AsyncEngine.stats(), engine/core.py snapshot) that only grow. The KV ones are
# exported under their own names (`pd_runtime_kv_pulls_total`, ...) and exist from the start;
# the others as `pd_runtime_engine_<key>_total`. Every other numeric stat is a gauge
# `pd_runtime_engine_<key>` (free/held blocks, running, waiting, ...).
KV_COUNTERS = {
    "kv_pulls": "KV pulls this decode server completed",
    "kv_pull_bytes": "bytes of KV this decode server pulled",
    "kv_pull_failures": "KV pulls that failed (the request got an error, never tokens)",
    "kv_holds": "requests whose KV this prefill server held for a decode server",
    "kv_releases": "held KV released by a decode server's pull or by lease expiry",
}
ENGINE_COUNTERS = {"requests", "finished", "aborted", "failed", "prompt_tokens",
                   "generation_tokens", "steps", "preemptions"}
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)


class _EngineStats(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, Any]]):
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        try:
            stats = dict(self._stats())
        except Exception:  # noqa: BLE001 - a dead engine must not break /metrics
            return
        for key in ("kv_pulls", "kv_pull_bytes", "kv_pull_failures"):
            stats.setdefault(key, 0)  # an aggregated or prefill server pulls nothing: 0, truly
        for key, value in sorted(stats.items()):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key in KV_COUNTERS:
                c = CounterMetricFamily(f"pd_runtime_{key}", KV_COUNTERS[key])
            elif key in ENGINE_COUNTERS:
                c = CounterMetricFamily(f"pd_runtime_engine_{key}", f"engine counter {key}")
            else:
                g = GaugeMetricFamily(f"pd_runtime_engine_{key}", f"engine stat {key}")
                g.add_metric([], float(value))
                yield g
                continue
            c.add_metric([], float(value))
            yield c


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], Mapping[str, Any]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pd_runtime_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("pd_runtime_prompt_tokens", "prompt tokens of finished "
                                     "requests", registry=r)
        self.generation_tokens = Counter("pd_runtime_generation_tokens", "tokens generated",
                                         registry=r)
        self.failures = Counter("pd_runtime_request_failures", "requests that ended in an error",
                                ["reason"], registry=r)
        self.ttft = Histogram("pd_runtime_time_to_first_token_seconds", "request arrival to "
                              "its first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pd_runtime_inter_token_latency_seconds", "time between "
                             "consecutive output tokens", buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("pd_runtime_request_latency_seconds", "request arrival to its "
                                 "last token", buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineStats(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_text(text: str) -> dict[str, float]:
    """Sample name (with labels as written) -> value; enough for tests and `pdctl run`."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out
