"""A development CA and a serving certificate for the webhook, made with the openssl CLI
(`pdctl operator run --local-webhook` loads this module when it is given no certificate).

kopf's own self-signed generation fails on Debian 12 (oscrypto cannot detect libcrypto), and the
`cryptography` package is not a dependency, so this shells out to `openssl`, which every Linux
image has. In a cluster the chart provides the certificate in a Secret instead.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CertFiles:
    ca_cert: Path
    cert: Path
    key: Path

    def ca_pem(self) -> bytes:
        return self.ca_cert.read_bytes()


def _san(hosts: list[str]) -> str:
    parts = []
    for h in hosts:
        try:
            ipaddress.ip_address(h)
            parts.append(f"IP:{h}")
        except ValueError:
            parts.append(f"DNS:{h}")
    return ",".join(parts)


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {proc.stderr.strip()}")


def generate(directory: Path, hosts: list[str] | None = None, days: int = 30) -> CertFiles:
    """Write ca.crt, tls.crt and tls.key into `directory` (SANs: `hosts`, default 127.0.0.1
    and localhost; Go checks the SANs, never the CN)."""
    hosts = hosts or ["127.0.0.1", "localhost"]
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "tls.key", directory / "tls.csr", directory / "tls.crt"
    ext = directory / "tls.ext"
    # ECDSA P-256: a TLS handshake costs a fraction of RSA-2048's, and the API server opens
    # new connections to the webhook under concurrent admission load.
    _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
          "-nodes", "-keyout", str(ca_key),
          "-out", str(ca_crt), "-days", str(days), "-subj", "/CN=pd-operator-webhook-ca",
          "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    _run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
          "-nodes", "-keyout", str(key), "-out",
          str(csr), "-subj", f"/CN={hosts[0]}"])
    ext.write_text(f"subjectAltName={_san(hosts)}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth\n")
    _run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
          "-CAcreateserial", "-out", str(crt), "-days", str(days), "-extfile", str(ext)])
    for p in (key, ca_key):
        p.chmod(0o600)
    return CertFiles(ca_crt, crt, key)
