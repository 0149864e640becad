"""`helm test`: the release's admission webhook rejects a known-bad PDDeployment.

Runs in the operator image (its Python and Kubernetes client), as the test's ServiceAccount,
which may only create PDDeployments in NAMESPACE (the release's, or the first namespace it
watches). The object (the chart's copy of
deploy/examples/rejected/tp-not-divisible.yaml) is created with server-side dry-run
(dryRun=All): nothing is stored, and the webhooks still review it (sideEffects: None). The test
passes only when this release's validating webhook denies it with the rule the object's
`pd-operator.dev/expect-rule` annotation names; admitted, denied for another reason, or refused
by the schema fails at once. What may be transient right after an install (the webhook not
answering yet, the RoleBinding not effective yet, the CRD not established, a denial from
another webhook reviewing the same namespace) is retried until the deadline.

Environment: MANIFEST (path of the YAML object), NAMESPACE, WEBHOOK_NAME (the release's
validating webhook), DEADLINE_S.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass

import yaml

GROUP, VERSION, PLURAL = "serving.pd-operator.dev", "v1alpha1", "pddeployments"
EXPECT_ANNOTATION = "pd-operator.dev/expect-rule"
DENIED = re.compile(r'admission webhook "([^"]+)" denied the request')
RETRY_EVERY_S = 2.0


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "pass" | "fail" | "retry"
    reason: str


def judge(status: int | None, body: str, rule: str, webhook: str) -> Verdict:
    """What one dry-run create's answer means. `status` None: the object was admitted."""
    if status is None:
        return Verdict("fail", "admitted: no webhook rejected the known-bad object (does "
                       "webhook.namespaceSelector leave this namespace out?)")
    try:
        message = str(json.loads(body).get("message", body))
    except (ValueError, AttributeError):
        message = body
    denied = DENIED.search(message)
    if denied:
        by = denied.group(1)
        if f"[{rule}]" not in message:  # the webhook lists each rule as [RULE-ID]
            return Verdict("fail", f"denied by {by} without {rule}: {message}")
        if by != webhook:
            return Verdict("retry", f"denied with {rule} by {by}, another webhook than this "
                           f"release's ({webhook}): two configurations review this namespace")
        return Verdict("pass", f"denied by {by} with {rule}")
    if status == 422:
        return Verdict("fail", f"refused by the schema before the webhook: {message}")
    if status == 403 and "cannot create resource" in message:
        return Verdict("retry", f"RBAC: {message}")
    if status in (404, 429, 500, 502, 503, 504):
        return Verdict("retry", f"HTTP {status}: {message}")
    return Verdict("fail", f"HTTP {status}: {message}")


def _attempt(api, obj: dict, namespace: str) -> tuple[int | None, str]:
    from kubernetes.client import ApiException

    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj,
                                            dry_run="All")
    except ApiException as exc:
        return exc.status, exc.body or str(exc.reason)
    return None, ""


def main() -> int:
    from kubernetes import client, config

    obj = yaml.safe_load(open(os.environ["MANIFEST"], encoding="utf-8"))
    rule = obj["metadata"]["annotations"][EXPECT_ANNOTATION]
    namespace, webhook = os.environ["NAMESPACE"], os.environ["WEBHOOK_NAME"]
    obj["metadata"]["namespace"] = namespace
    config.load_incluster_config()
    api = client.CustomObjectsApi()
    deadline = time.monotonic() + float(os.environ.get("DEADLINE_S", "90"))
    print(f"dry-run create of PDDeployment {obj['metadata']['name']} in {namespace}; "
          f"expecting {webhook} to deny it with {rule}", flush=True)
    while True:
        try:
            verdict = judge(*_attempt(api, obj, namespace), rule, webhook)
        except Exception as exc:  # the API server unreachable: retried like a 503
            verdict = Verdict("retry", f"{type(exc).__name__}: {exc}")
        print(f"{verdict.outcome.upper()}: {verdict.reason}", flush=True)
        if verdict.outcome != "retry":
            return 0 if verdict.outcome == "pass" else 1
        if time.monotonic() > deadline:
            print("FAIL: still not rejected by this release's webhook at the deadline",
                  flush=True)
            return 1
        time.sleep(RETRY_EVERY_S)


if __name__ == "__main__":
    sys.exit(main())
