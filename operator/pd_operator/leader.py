"""Leader election with a coordination.k8s.io Lease, so two operator replicas are safe.

Only the holder runs the kopf handlers; every replica serves the webhook. The rules follow
client-go's leaderelection: a lease is free when its holder has not renewed it for
leaseDurationSeconds (judged both by the recorded renewTime and by how long this process has
seen the record unchanged); updates are optimistic (resourceVersion), so two candidates cannot
both win. A holder that cannot renew within the duration steps down.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass
from typing import Any

from . import kube, metrics

log = logging.getLogger(__name__)

API_VERSION = "coordination.k8s.io/v1"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _fmt(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text.replace("Z", ""), "%Y-%m-%dT%H:%M:%S.%f") \
            .replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        try:
            return datetime.datetime.strptime(text.replace("Z", ""), "%Y-%m-%dT%H:%M:%S") \
                .replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            return None


def not_serving(exc: kube.ApiError) -> bool:
    """The API server answered but is not serving requests yet or now (5xx, 429): a restarting
    kube-apiserver answers 503 and 429 until its storage and handlers are ready. Like an
    unreachable server, that stops every candidate, so the holder keeps the lease; any other
    refusal (409 conflict, 403, 404) counts toward stepping down."""
    return exc.status >= 500 or exc.status == 429


@dataclass
class LeaseConfig:
    name: str
    namespace: str
    identity: str
    duration: float = 15.0
    retry: float = 2.0


class Elector:
    def __init__(self, client: kube.Client, cfg: LeaseConfig):
        self.client = client
        self.cfg = cfg
        self._seen: tuple[Any, float] | None = None  # (record, monotonic when first seen)

    def _body(self, existing: dict[str, Any] | None, transitions: int) -> dict[str, Any]:
        now = _fmt(_now())
        body: dict[str, Any] = {
            "apiVersion": API_VERSION, "kind": "Lease",
            "metadata": {"name": self.cfg.name, "namespace": self.cfg.namespace},
            "spec": {"holderIdentity": self.cfg.identity,
                     "leaseDurationSeconds": max(1, int(self.cfg.duration)),
                     "acquireTime": now, "renewTime": now, "leaseTransitions": transitions},
        }
        if existing is not None:
            body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
        return body

    def _expired(self, lease: dict[str, Any]) -> bool:
        spec = lease.get("spec") or {}
        if not spec.get("holderIdentity"):
            return True
        duration = float(spec.get("leaseDurationSeconds") or self.cfg.duration)
        renew = _parse(spec.get("renewTime"))
        if renew is not None and (_now() - renew).total_seconds() > duration:
            return True
        record = (spec.get("holderIdentity"), spec.get("renewTime"))
        if self._seen is None or self._seen[0] != record:
            self._seen = (record, time.monotonic())
            return False
        return time.monotonic() - self._seen[1] > duration

    async def try_acquire(self) -> bool:
        lease = await self.client.get(API_VERSION, "Lease", self.cfg.namespace, self.cfg.name)
        try:
            if lease is None:
                await self.client.create(self._body(None, 0))
                return True
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") == self.cfg.identity or self._expired(lease):
                transitions = int(spec.get("leaseTransitions") or 0)
                if spec.get("holderIdentity") != self.cfg.identity:
                    transitions += 1
                await self.client.replace(self._body(lease, transitions))
                return True
        except kube.ApiError as exc:
            if exc.status in (409, 422):
                return False  # somebody else got there first
            raise
        return False

    async def acquire(self) -> None:
        log.info("waiting for the leader lease %s/%s as %s", self.cfg.namespace,
                 self.cfg.name, self.cfg.identity)
        while True:
            try:
                if await self.try_acquire():
                    log.info("acquired the leader lease")
                    metrics.LEADER.set(1)
                    return
            except Exception as exc:  # API server away: keep trying
                log.warning("lease acquire: %r", exc)
            await asyncio.sleep(self.cfg.retry)

    async def renew_until_lost(self) -> None:
        """Renew every `retry` seconds; return when someone else holds the lease, or the API
        server, while serving, refused the renewal for `duration` seconds."""
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.cfg.retry)
            try:
                lease = await self.client.get(API_VERSION, "Lease", self.cfg.namespace,
                                              self.cfg.name)
                if lease is not None and (lease.get("spec") or {}).get("holderIdentity") \
                        not in (self.cfg.identity, None, ""):
                    log.error("the leader lease is held by %s now; stepping down",
                              lease["spec"]["holderIdentity"])
                    break
                spec = (lease or {}).get("spec") or {}
                body = self._body(lease, int(spec.get("leaseTransitions") or 0))
                if lease is not None:
                    body["spec"]["acquireTime"] = spec.get("acquireTime") or \
                        body["spec"]["acquireTime"]
                    await self.client.replace(body)
                else:
                    await self.client.create(body)
                last_ok = time.monotonic()
            except kube.ApiError as exc:
                log.warning("lease renew: %s", exc)
                if not_serving(exc):
                    last_ok = time.monotonic()
            except Exception as exc:
                # The API server is unreachable (restarting): nobody can take the lease while
                # it is away, and we race for it again when it is back, so keep going.
                log.warning("lease renew: %r", exc)
                last_ok = time.monotonic()
            if time.monotonic() - last_ok > self.cfg.duration:
                log.error("could not renew the leader lease for %.0fs; stepping down",
                          self.cfg.duration)
                break
        metrics.LEADER.set(0)

    async def release(self) -> None:
        try:
            lease = await self.client.get(API_VERSION, "Lease", self.cfg.namespace,
                                          self.cfg.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.cfg.identity:
                body = self._body(lease, int(lease["spec"].get("leaseTransitions") or 0))
                body["spec"]["holderIdentity"] = ""
                body["spec"]["leaseDurationSeconds"] = 1
                await self.client.replace(body)
        except Exception as exc:
            log.warning("lease release: %r", exc)
        metrics.LEADER.set(0)
