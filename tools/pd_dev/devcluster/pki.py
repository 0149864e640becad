"""The cluster's own PKI, made with the openssl CLI (no extra Python dependency).

`ensure_cluster_pki` is idempotent: files that exist are kept, so restarting a component never
changes the certificates the others trust. `make_ca` and `issue` are reusable for webhook serving
certificates (SAN IP:127.0.0.1), e.g. in tests and for the operator's webhook on the host.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

DAYS = "3650"
APISERVER_SANS = (
    "IP:127.0.0.1",
    "DNS:localhost",
    "IP:10.96.0.1",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class Pair:
    crt: Path
    key: Path


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("the `openssl` CLI is needed to make the cluster's certificates")
    out = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {out.stderr.strip()}")


def make_ca(directory: Path, name: str = "ca", cn: str = "pd-operator-dev-ca") -> Pair:
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    if pair.crt.is_file() and pair.key.is_file():
        return pair
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", DAYS,
        "-keyout", str(pair.key), "-out", str(pair.crt), "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )
    pair.key.chmod(0o600)
    return pair


def extensions(sans: tuple[str, ...], server: bool, client: bool) -> str:
    """The x509v3 extension text for a leaf certificate (pure)."""
    eku = [u for u, on in (("serverAuth", server), ("clientAuth", client)) if on]
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
    ]
    if eku:
        lines.append("extendedKeyUsage=" + ",".join(eku))
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    return "\n".join(lines) + "\n"


def issue(
    ca: Pair,
    directory: Path,
    name: str,
    cn: str,
    orgs: tuple[str, ...] = (),
    sans: tuple[str, ...] = (),
    server: bool = False,
    client: bool = False,
) -> Pair:
    """A CA-signed leaf certificate; kept if it already exists."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    if pair.crt.is_file() and pair.key.is_file():
        return pair
    subj = "".join(f"/O={o}" for o in orgs) + f"/CN={cn}"
    with tempfile.TemporaryDirectory() as tmp:
        csr = Path(tmp) / "req.csr"
        ext = Path(tmp) / "ext.cnf"
        ext.write_text(extensions(sans, server, client))
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pair.key),
                 "-out", str(csr), "-subj", subj)
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.crt), "-CAkey", str(ca.key),
                 "-set_serial", "0x" + secrets.token_hex(16), "-days", DAYS, "-sha256",
                 "-extfile", str(ext), "-out", str(pair.crt))
    pair.key.chmod(0o600)
    return pair


def make_rsa_pair(directory: Path, name: str) -> Pair:
    """An RSA key (name.key) and its public half (name.pub), for service-account tokens."""
    key, pub = directory / f"{name}.key", directory / f"{name}.pub"
    if not (key.is_file() and pub.is_file()):
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                 "-out", str(key))
        _openssl("pkey", "-in", str(key), "-pubout", "-out", str(pub))
        key.chmod(0o600)
    return Pair(pub, key)


@dataclass(frozen=True)
class ClusterPKI:
    ca: Pair
    apiserver: Pair
    admin: Pair
    sa: Pair  # crt = public key, key = private key


def cert_sans(crt: Path) -> set[str]:
    """The subjectAltName entries of a certificate, as `IP:1.2.3.4` / `DNS:name`."""
    out = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-ext",
                          "subjectAltName"], capture_output=True, text=True, check=False)
    text = out.stdout.replace("IP Address:", "IP:")
    return {s.strip() for line in text.splitlines()[1:] for s in line.split(",") if s.strip()}


def ensure_cluster_pki(directory: Path, extra_sans: tuple[str, ...] = ()) -> ClusterPKI:
    """`extra_sans`: more names for the API server (a real node's pods reach it at the host's
    address); a kept certificate without them is issued again (same CA, so clients still
    trust it)."""
    ca = make_ca(directory)
    crt = directory / "apiserver.crt"
    if extra_sans and crt.is_file() and not set(extra_sans) <= cert_sans(crt):
        crt.unlink()
    return ClusterPKI(
        ca=ca,
        apiserver=issue(ca, directory, "apiserver", "kube-apiserver",
                        sans=APISERVER_SANS + tuple(extra_sans), server=True),
        admin=issue(ca, directory, "admin", "admin", orgs=("system:masters",), client=True),
        sa=make_rsa_pair(directory, "sa"),
    )
