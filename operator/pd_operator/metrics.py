"""Prometheus metrics of the operator (reconciles, errors, webhook latency, verdicts by rule).

Served by `pdctl operator run --metrics-port` with prometheus_client's own HTTP server.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("pd_operator_reconciles_total", "Reconciles of a PDDeployment", ["result"])
RECONCILE_ERRORS = Counter("pd_operator_reconcile_errors_total", "Failed reconciles", ["reason"])
RECONCILE_SECONDS = Histogram("pd_operator_reconcile_duration_seconds",
                              "Time to render and apply every child of one PDDeployment")
APPLIES = Counter("pd_operator_applies_total", "Server-side applies of children", ["kind"])
DRIFT_REPAIRS = Counter("pd_operator_drift_repairs_total", "Children re-applied after a hand "
                        "edit or deletion", ["kind"])
WEBHOOK_SECONDS = Histogram(
    "pd_operator_webhook_duration_seconds", "Admission review handling time",
    ["webhook"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0))
WEBHOOK_REFUSED = Counter("pd_operator_webhook_refused_total",
                          "Webhook requests refused before review (bad body, too large, slow)",
                          ["webhook", "code"])
WEBHOOK_REVIEWS = Counter("pd_operator_webhook_reviews_total", "Admission reviews",
                          ["webhook", "allowed"])
VERDICTS = Counter("pd_operator_verdicts_total", "Compatibility verdicts returned by the webhook",
                   ["rule", "severity"])
KV_PATH_CHECKS = Counter("pd_operator_kv_path_checks_total", "KV path checks (KVPathVerified) "
                         "by outcome: Verified or the failure's reason", ["reason"])
KV_PATH_SECONDS = Histogram("pd_operator_kv_path_check_duration_seconds",
                            "A passed KV path check as the decode pod measured it",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
MANAGED = Gauge("pd_operator_pddeployments", "PDDeployments by phase", ["phase"])
LEADER = Gauge("pd_operator_leader", "1 while this replica holds the leader lease")


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr)
