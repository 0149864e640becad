"""A ValidatingWebhookConfiguration with clientConfig.url pointing at an HTTPS server on
127.0.0.1 (own CA, started here) is called by the real apiserver; its denial reaches kubectl.
This is exactly how the operator's webhook is served on the host during development."""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from pd_dev.devcluster import pki

pytestmark = pytest.mark.cluster

DENY_MESSAGE = "denied by pd test webhook: verdict=deny"


class _Webhook:
    def __init__(self, certfile, keyfile):
        self.calls: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                req = review["request"]
                outer.calls.append({"path": self.path, **req})
                labels = (req.get("object") or {}).get("metadata", {}).get("labels") or {}
                allowed = labels.get("verdict") != "deny"
                response = {"uid": req["uid"], "allowed": allowed}
                if not allowed:
                    response["status"] = {"code": 403, "reason": "Forbidden",
                                          "message": DENY_MESSAGE}
                body = json.dumps({"apiVersion": "admission.k8s.io/v1",
                                   "kind": "AdmissionReview", "response": response}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(certfile), str(keyfile))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def names(self) -> set[str]:
        return {c.get("name") for c in self.calls}


def _cm(name: str, verdict: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": name, "labels": {"verdict": verdict}},
                           "data": {"k": "v"}})


def test_webhook_on_host_denial_reaches_kubectl(tmp_path, kubectl, namespace):
    ca = pki.make_ca(tmp_path, name="webhook-ca", cn="pd-test-webhook-ca")
    serving = pki.issue(ca, tmp_path, "webhook", "127.0.0.1",
                        sans=("IP:127.0.0.1", "DNS:localhost"), server=True)
    tag = secrets.token_hex(3)
    with _Webhook(serving.crt, serving.key) as hook:
        vwc = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": f"pd-test-{tag}"},
            "webhooks": [{
                "name": f"deny-{tag}.test.pd-operator.dev",
                "clientConfig": {
                    "url": f"https://127.0.0.1:{hook.port}/validate-configmaps",
                    "caBundle": base64.b64encode(ca.crt.read_bytes()).decode(),
                },
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"],
                           "operations": ["CREATE", "UPDATE"], "resources": ["configmaps"],
                           "scope": "Namespaced"}],
                # only this test's namespace: never interfere with other tests
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 5,
            }],
        }
        kubectl("apply", "-f", "-", input=json.dumps(vwc))
        try:
            # the apiserver picks up new webhook configurations after a moment: probe until seen
            deadline = time.monotonic() + 30
            i = 0
            while True:
                i += 1
                kubectl("apply", "-n", namespace, "-f", "-", input=_cm(f"probe-{i}", "allow"))
                if f"probe-{i}" in hook.names():
                    break
                assert time.monotonic() < deadline, "webhook never called by the apiserver"
                time.sleep(0.5)

            denied = kubectl("apply", "-n", namespace, "-f", "-",
                             input=_cm("forbidden", "deny"), check=False)
            assert denied.returncode != 0
            assert f'admission webhook "deny-{tag}.test.pd-operator.dev" denied the request' \
                in denied.stderr
            assert DENY_MESSAGE in denied.stderr
            assert "forbidden" in hook.names()
            call = next(c for c in hook.calls if c.get("name") == "forbidden")
            assert call["namespace"] == namespace and call["operation"] == "CREATE"
            assert call["path"].split("?")[0] == "/validate-configmaps"
            gone = kubectl("get", "configmap", "forbidden", "-n", namespace, check=False)
            assert gone.returncode != 0 and "NotFound" in gone.stderr

            ok = kubectl("apply", "-n", namespace, "-f", "-", input=_cm("fine", "allow"))
            assert ok.returncode == 0
        finally:
            kubectl("delete", "validatingwebhookconfiguration", f"pd-test-{tag}", check=False)
