"""Command lines and health probes of the control-plane processes (pure).

Everything listens on 127.0.0.1 only. Order matters: etcd, kube-apiserver, then the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
PORT_NAMES = ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager",
              "kube-scheduler", "kwok")
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.0.0.0/16"  # kwok hands out FAKE pod IPs from here; never send traffic to them
NODE_IP = "10.255.0.1"  # likewise fake
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Layout:
    """Where one cluster keeps its files."""

    dir: Path  # state.json, kubeconfig, pki/, logs/
    etcd_data: Path  # on /dev/shm when available

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"


@dataclass(frozen=True)
class Probe:
    url: str
    client_cert: bool = False  # present the admin client certificate
    verify_ca: bool = False  # verify against the cluster CA (else: loopback, self-signed)


@dataclass(frozen=True)
class Component:
    name: str
    argv: tuple[str, ...]
    probe: Probe


def commands(
    bins: dict[str, Path],
    layout: Layout,
    ports: dict[str, int],
    stages: list[Path],
    apiserver_extra: tuple[str, ...] = (),
) -> dict[str, Component]:
    """The five processes of the cluster, keyed by name, in start order. `apiserver_extra`:
    flags for a real node (realnode.apiserver_flags); each replaces a default flag of the same
    name."""
    pki = layout.pki
    kubeconfig = str(layout.kubeconfig)
    etcd_url = f"http://{HOST}:{ports['etcd']}"
    peer_url = f"http://{HOST}:{ports['etcd-peer']}"
    etcd = (
        str(bins["etcd"]),
        "--name=n0",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={etcd_url}",
        f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=n0={peer_url}",
        "--listen-metrics-urls=",
        "--unsafe-no-fsync=true",
        "--auto-compaction-retention=1",
        "--quota-backend-bytes=8589934592",
        "--log-level=warn",
    )
    apiserver = (
        str(bins["kube-apiserver"]),
        f"--etcd-servers={etcd_url}",
        f"--bind-address={HOST}",
        f"--advertise-address={HOST}",
        f"--secure-port={ports['kube-apiserver']}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--service-account-issuer={SA_ISSUER}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=RBAC",
        "--allow-privileged=true",
        # a loopback advertise address is not a valid Endpoints IP: don't reconcile it
        "--endpoint-reconciler-type=none",
        # no client-side throttling in the server: scale tests create many objects fast
        "--max-requests-inflight=0",
        "--max-mutating-requests-inflight=0",
        "--enable-priority-and-fairness=false",
        "--profiling=false",
    )
    replaced = {f.split("=", 1)[0] for f in apiserver_extra}
    apiserver = tuple(f for f in apiserver if f.split("=", 1)[0] not in replaced)
    apiserver += apiserver_extra
    always_allow = "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics"
    kcm = (
        str(bins["kube-controller-manager"]),
        f"--kubeconfig={kubeconfig}",
        f"--bind-address={HOST}",
        f"--secure-port={ports['kube-controller-manager']}",
        always_allow,
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        "--leader-elect=false",
        "--use-service-account-credentials=false",
        "--kube-api-qps=500",
        "--kube-api-burst=1000",
        "--profiling=false",
    )
    scheduler = (
        str(bins["kube-scheduler"]),
        f"--kubeconfig={kubeconfig}",
        f"--bind-address={HOST}",
        f"--secure-port={ports['kube-scheduler']}",
        always_allow,
        "--leader-elect=false",
        "--kube-api-qps=500",
        "--kube-api-burst=1000",
        "--profiling=false",
    )
    kwok = (
        str(bins["kwok"]),
        f"--kubeconfig={kubeconfig}",
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        "--manage-nodes-with-label-selector=",
        "--manage-single-node=",
        "--node-lease-duration-seconds=40",
        f"--cidr={POD_CIDR}",
        f"--node-ip={NODE_IP}",
        f"--server-address={HOST}:{ports['kwok']}",
        *(f"--config={s}" for s in stages),
    )
    api = f"https://{HOST}:{ports['kube-apiserver']}"
    return {
        "etcd": Component("etcd", etcd, Probe(f"{etcd_url}/health")),
        "kube-apiserver": Component(
            "kube-apiserver", apiserver, Probe(f"{api}/readyz", client_cert=True, verify_ca=True)
        ),
        "kube-controller-manager": Component(
            "kube-controller-manager", kcm,
            Probe(f"https://{HOST}:{ports['kube-controller-manager']}/healthz"),
        ),
        "kube-scheduler": Component(
            "kube-scheduler", scheduler, Probe(f"https://{HOST}:{ports['kube-scheduler']}/healthz")
        ),
        "kwok": Component("kwok", kwok, Probe(f"http://{HOST}:{ports['kwok']}/healthz")),
    }


def kubeconfig_yaml(server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> dict:
    """An admin kubeconfig with the credentials embedded (portable, one file)."""
    import base64

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "pd-dev", "cluster": {
            "server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": "pd-dev-admin", "user": {
            "client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}}],
        "contexts": [{"name": "pd-dev", "context": {"cluster": "pd-dev", "user": "pd-dev-admin"}}],
        "current-context": "pd-dev",
        "preferences": {},
    }
