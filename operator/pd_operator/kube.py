"""The one module that calls the API server from the operator's own code (aiohttp, async).

kopf watches and patches the PDDeployments; this client does what kopf does not: server-side
apply of the children, reads of them, status patches from child events, the leader Lease and the
webhook configurations. Credentials come from the kubeconfig or the in-cluster service account
(read with the `kubernetes` package, which only parses them here).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from .kinds import CHILD_KINDS

FIELD_MANAGER = "pd-operator"

# (apiVersion, kind) -> (plural, namespaced)
RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    # the children the operator renders (all namespaced): pd_operator.kinds is their table
    **{(k.api_version, k.kind): (k.plural, True) for k in CHILD_KINDS},
    ("v1", "Pod"): ("pods", True),
    ("v1", "Secret"): ("secrets", True),  # the side-channel token (created, never applied)
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "Node"): ("nodes", False),
    ("coordination.k8s.io/v1", "Lease"): ("leases", True),
    ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration"):
        ("validatingwebhookconfigurations", False),
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"):
        ("mutatingwebhookconfigurations", False),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"):
        ("customresourcedefinitions", False),
    ("serving.pd-operator.dev/v1alpha1", "PDDeployment"): ("pddeployments", True),
}


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        msg = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {msg}")


@dataclass
class Credentials:
    host: str
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    token: str | None
    verify: bool = True
    token_file: str | None = None  # in-cluster: the projected token, which the kubelet rotates

    @classmethod
    def load(cls, kubeconfig: str | None = None) -> Credentials:
        from kubernetes import client, config

        cfg = client.Configuration()
        token_file = None
        try:
            config.load_incluster_config(client_configuration=cfg)
            token_file = config.incluster_config.SERVICE_TOKEN_FILENAME
        except config.ConfigException:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        # kubernetes>=30 keeps both kubeconfig and in-cluster tokens under "BearerToken"
        keys = cfg.api_key or {}
        token = keys.get("BearerToken") or keys.get("authorization")
        if token and token.lower().startswith("bearer "):
            token = token[7:]
        return cls(cfg.host, cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file, token,
                   bool(cfg.verify_ssl), token_file)

    def current_token(self) -> str | None:
        """The token to send now (re-read from the rotated file when in-cluster)."""
        if self.token_file:
            try:
                with open(self.token_file) as fh:
                    self.token = fh.read().strip() or self.token
            except OSError:
                pass
        return self.token

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def path_for(api_version: str, kind: str, namespace: str | None, name: str | None = None,
             subresource: str | None = None) -> str:
    plural, namespaced = RESOURCES[(api_version, kind)]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{plural}"
    if name:
        base += f"/{quote(name)}"
    if subresource:
        base += f"/{subresource}"
    return base


class Client:
    """A small async Kubernetes client. Create inside the running loop; close() when done."""

    def __init__(self, creds: Credentials, *, limit: int = 32, timeout: float = 60.0):
        """`limit`: requests in flight at once, process-wide. Waiting for a slot has no
        deadline; `timeout` applies to each request once it is sent. Flooding a busy API
        server only makes every request slower (and time out), so the bound is low."""
        self.creds = creds
        headers = {"Accept": "application/json"}
        self._token_read = time.monotonic()
        if creds.current_token():
            headers["Authorization"] = f"Bearer {creds.token}"
        self._slots = asyncio.Semaphore(limit)
        self._session = aiohttp.ClientSession(
            base_url=None, headers=headers,
            connector=aiohttp.TCPConnector(ssl=creds.ssl_context(), limit=limit),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout),
        )

    async def close(self) -> None:
        await self._session.close()

    async def request(self, method: str, path: str, *, body: Any = None,
                      content_type: str = "application/json",
                      params: dict[str, str] | None = None) -> Any:
        url = self.creds.host.rstrip("/") + path
        if params:
            url += "?" + urlencode(params)
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        if self.creds.token_file and time.monotonic() - self._token_read > 60:
            self._token_read = time.monotonic()  # the kubelet rotates the projected token
            headers["Authorization"] = f"Bearer {self.creds.current_token()}"
            self._session.headers["Authorization"] = headers["Authorization"]
        async with self._slots, \
                self._session.request(method, url, data=data, headers=headers) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else None
            except json.JSONDecodeError:
                payload = text
            if resp.status >= 400:
                raise ApiError(resp.status, payload)
            return payload

    # ------------------------------------------------------------------------ verbs
    async def apply(self, obj: dict[str, Any], *, force: bool = True,
                    field_manager: str = FIELD_MANAGER, dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply: the operator owns exactly the fields it renders."""
        meta = obj["metadata"]
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        if dry_run:
            params["dryRun"] = "All"
        return await self.request(
            "PATCH", path_for(obj["apiVersion"], obj["kind"], meta.get("namespace"),
                              meta["name"]),
            body=obj, content_type="application/apply-patch+yaml", params=params)

    async def create(self, obj: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        meta = obj["metadata"]
        params = {"dryRun": "All"} if dry_run else None
        return await self.request("POST", path_for(obj["apiVersion"], obj["kind"],
                                                   meta.get("namespace")),
                                  body=obj, params=params)

    async def get(self, api_version: str, kind: str, namespace: str | None,
                  name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path_for(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: str | None = None,
                   label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        out = await self.request("GET", path_for(api_version, kind, namespace), params=params)
        return out.get("items", [])

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str,
                     *, propagation: str = "Background") -> bool:
        try:
            await self.request("DELETE", path_for(api_version, kind, namespace, name),
                               body={"propagationPolicy": propagation})
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self.request("PUT", path_for(obj["apiVersion"], obj["kind"],
                                                  meta.get("namespace"), meta["name"]), body=obj)

    async def patch_merge(self, api_version: str, kind: str, namespace: str | None, name: str,
                          body: dict[str, Any], subresource: str | None = None) -> Any:
        return await self.request(
            "PATCH", path_for(api_version, kind, namespace, name, subresource), body=body,
            content_type="application/merge-patch+json")


async def apply_all(client: Client, objs: list[dict[str, Any]], *, concurrency: int = 8,
                    dry_run: bool = False) -> list[dict[str, Any]]:
    """Apply several objects concurrently (bounded); raises the first error after all finish."""
    sem = asyncio.Semaphore(concurrency)

    async def one(o: dict[str, Any]) -> dict[str, Any]:
        async with sem:
            return await client.apply(o, dry_run=dry_run)

    results = await asyncio.gather(*(one(o) for o in objs), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]
