"""Pinned versions and where things live.

The versions are read from ``deploy/local/versions.env`` (the one place they are pinned); the
wrapper ``go.mod`` files under ``deploy/local/`` must agree, which `build.check_wrappers` enforces.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_ENV_LINE = re.compile(r"^\s*([A-Z_][A-Z0-9_]*)\s*=\s*(\S*)\s*$")


def repo_root() -> Path:
    """The repository root: the directory holding deploy/local/versions.env."""
    override = os.environ.get("PD_REPO_ROOT")
    if override:
        return Path(override).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "deploy" / "local" / "versions.env").is_file():
            return parent
    cwd = Path.cwd().resolve()
    for parent in (cwd, *cwd.parents):
        if (parent / "deploy" / "local" / "versions.env").is_file():
            return parent
    raise FileNotFoundError(
        "deploy/local/versions.env not found: run from a pd-operator checkout or set PD_REPO_ROOT"
    )


def local_dir() -> Path:
    return repo_root() / "deploy" / "local"


def parse_env(text: str) -> dict[str, str]:
    """Parse KEY=VALUE lines; blank lines and # comments are ignored."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _ENV_LINE.match(line)
        if not m:
            raise ValueError(f"versions.env line {lineno}: not KEY=VALUE: {line!r}")
        out[m.group(1)] = m.group(2)
    return out


@dataclass(frozen=True)
class Versions:
    kubernetes: str  # v1.36.3
    etcd: str  # v3.6.16
    kwok: str  # v0.8.0
    helm: str  # v3.22.0
    coredns: str = "v1.15.0"  # the real node only; versions.env pins it

    @property
    def kube_minor(self) -> str:
        return self.kubernetes.lstrip("v").split(".")[1]

    @property
    def staging(self) -> str:
        """The staging-module twin of the Kubernetes version: v1.36.3 -> v0.36.3."""
        _major, minor, patch = self.kubernetes.lstrip("v").split(".")
        return f"v0.{minor}.{patch}"


def load(path: Path | None = None) -> Versions:
    path = path or local_dir() / "versions.env"
    env = parse_env(path.read_text())
    try:
        return Versions(
            kubernetes=env["KUBERNETES_VERSION"],
            etcd=env["ETCD_VERSION"],
            kwok=env["KWOK_VERSION"],
            helm=env["HELM_VERSION"],
            coredns=env["COREDNS_VERSION"],
        )
    except KeyError as exc:
        raise ValueError(f"{path}: missing {exc.args[0]}") from None


def cache_root() -> Path:
    """Where built binaries live (outside the repository)."""
    env = os.environ.get("PD_OPERATOR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pd-operator"
