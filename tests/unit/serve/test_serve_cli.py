"""`pd-runtime serve` accepts exactly what the operator renders, and its preflight names the
field of every problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pd_operator.render import Owner, render
from pd_operator.validate import parse_object, validate_spec
from pd_runtime.serve import cli as serve_cli
from pd_runtime.serve import preflight as pf

ROOT = Path(__file__).resolve().parents[3]
ACCEPTED = sorted((ROOT / "deploy" / "examples" / "accepted").glob("*.yaml"))
LLAMA_CONFIG = ROOT / "deploy" / "examples" / "hf-configs" / "Llama-3.1-8B-Instruct.config.json"
pytestmark = pytest.mark.timeout(60)


def rendered_commands(doc: dict) -> list[list[str]]:
    pdd = parse_object(doc)
    out = render(Owner("x", "default", "uid"), validate_spec(pdd.spec))
    return [c["spec"]["template"]["spec"]["containers"][0]["command"]
            for c in out.children if c["kind"] == "StatefulSet"]


def builtin_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in ACCEPTED:
        doc = yaml.safe_load(path.read_text())
        if doc["spec"]["engine"]["type"] == "builtin":
            docs.append((path.name, doc))
    return docs


def test_there_are_builtin_examples():
    assert builtin_docs(), "no engine.type: builtin example under deploy/examples/accepted"


@pytest.mark.parametrize("name,doc", builtin_docs(), ids=[n for n, _ in builtin_docs()])
def test_rendered_command_of_every_builtin_example_parses(name, doc):
    for cmd in rendered_commands(doc):
        assert cmd[:2] == ["pd-runtime", "serve"]
        args = serve_cli.build_parser().parse_args(cmd[2:])
        spec = doc["spec"]
        assert args.model == spec["model"]["name"]
        assert args.num_kv_heads == spec["model"]["numKVHeads"]
        assert args.num_layers == spec["model"]["numHiddenLayers"]
        assert args.role in ("prefill", "decode")
        assert args.tensor_parallel_size == spec[args.role].get("tensorParallelSize", 1)
        assert args.config.endswith(f"/{args.role}.json")


def test_the_top_level_cli_has_serve():
    from pd_runtime import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--help"])
    assert exc.value.code == 0


def test_unknown_rendered_flag_is_refused(capsys):
    (doc,) = [d for _, d in builtin_docs()][:1]
    cmd = rendered_commands(doc)[0] + ["--no-such-flag"]
    with pytest.raises(SystemExit):
        serve_cli.build_parser().parse_args(cmd[2:])
    assert "--no-such-flag" in capsys.readouterr().err


def parse(*extra: str, role: str = "prefill", **over: str) -> object:
    flags = {"--role": role, "--model": "meta-llama/Llama-3.1-8B-Instruct", "--family": "dense",
             "--dtype": "bfloat16", "--num-kv-heads": "8", "--head-size": "128",
             "--num-layers": "32"}
    flags.update({f"--{k.replace('_', '-')}": v for k, v in over.items()})
    argv = [x for kv in flags.items() for x in kv] + list(extra)
    return serve_cli.build_parser().parse_args(argv)


@pytest.fixture
def llama_dir(tmp_path: Path) -> str:
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(LLAMA_CONFIG.read_text())
    return str(d)


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    for k in (pf.TOKEN_ENV, pf.TOKEN_FILE_ENV, "PD_RUNTIME_MOUNT_ROOT",
              serve_cli.MODEL_DIR_ENV):
        monkeypatch.delenv(k, raising=False)
    t = tmp_path / "token"
    t.write_text("s3cret")
    return str(t)


def test_preflight_passes_on_a_matching_checkpoint(llama_dir, token):
    a = parse("--model-dir", llama_dir, "--side-channel-token-file", token, "--device", "cpu")
    r = serve_cli.run_preflight(a)
    assert r.checkpoint == llama_dir and r.token_file == token and r.device == "cpu"
    kw = serve_cli.engine_kwargs(a, r)
    assert kw["served_model_name"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert kw["backends"] == ["UCX"] and kw["token_file"] == token


@pytest.mark.parametrize("over,field", [
    ({"num_kv_heads": "4"}, "spec.model.numKVHeads (--num-kv-heads 4)"),
    ({"head_size": "64"}, "spec.model.headSize (--head-size 64)"),
    ({"num_layers": "30"}, "spec.model.numHiddenLayers (--num-layers 30)"),
    ({"dtype": "float16"}, "spec.model.dtype (--dtype float16)"),
    ({"family": "moe"}, "spec.model.family (--family moe)"),
    ({"family": "multimodal"}, "spec.model.family (--family multimodal)"),
    ({"pipeline_parallel_size": "2"}, "pipelineParallelSize (--pipeline-parallel-size 2)"),
    ({"data_parallel_size": "2"}, "dataParallelSize (--data-parallel-size 2)"),
    ({"tensor_parallel_size": "3"}, "tensorParallelSize (--tensor-parallel-size 3)"),
])
def test_preflight_names_the_field(llama_dir, token, over, field):
    a = parse("--model-dir", llama_dir, "--side-channel-token-file", token, "--device", "cpu",
              **over)
    with pytest.raises(pf.PreflightError) as exc:
        serve_cli.run_preflight(a)
    assert any(field in p for p in exc.value.problems), exc.value.problems


def test_preflight_token_for_p_and_d_only(llama_dir, token, tmp_path, monkeypatch):
    for role in ("prefill", "decode"):
        with pytest.raises(pf.PreflightError) as exc:
            serve_cli.run_preflight(parse("--model-dir", llama_dir, "--device", "cpu",
                                          role=role))
        assert any("side-channel token" in p and pf.DEFAULT_TOKEN_FILE in p
                   for p in exc.value.problems)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(pf.PreflightError, match="is empty"):
        serve_cli.run_preflight(parse("--model-dir", llama_dir, "--device", "cpu",
                                      "--side-channel-token-file", str(empty)))
    serve_cli.run_preflight(parse("--model-dir", llama_dir, "--device", "cpu",
                                  role="aggregated"))
    monkeypatch.setenv(pf.TOKEN_ENV, "from-env")
    assert serve_cli.run_preflight(parse("--model-dir", llama_dir, "--device", "cpu")) \
        .token_file is None
    monkeypatch.delenv(pf.TOKEN_ENV)
    root = tmp_path / "root"
    (root / "var/run/secrets/pd-runtime").mkdir(parents=True)
    (root / "var/run/secrets/pd-runtime/token").write_text("t")
    monkeypatch.setenv("PD_RUNTIME_MOUNT_ROOT", str(root))
    r = serve_cli.run_preflight(parse("--model-dir", llama_dir, "--device", "cpu"))
    assert r.token_file == str(root / "var/run/secrets/pd-runtime/token")


def test_preflight_model_and_config_document(llama_dir, token, tmp_path, monkeypatch):
    with pytest.raises(pf.PreflightError, match="not a local checkpoint"):
        serve_cli.run_preflight(parse("--side-channel-token-file", token, "--device", "cpu"))
    monkeypatch.setenv(serve_cli.MODEL_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(pf.PreflightError, match="no such file"):
        serve_cli.run_preflight(parse("--side-channel-token-file", token, "--device", "cpu"))
    monkeypatch.delenv(serve_cli.MODEL_DIR_ENV)
    doc = tmp_path / "etc/pd-operator/prefill.json"
    doc.parent.mkdir(parents=True)
    doc.write_text(json.dumps({"role": "prefill", "num_kv_heads": 4, "tp": 1}))
    monkeypatch.setenv("PD_RUNTIME_MOUNT_ROOT", str(tmp_path))
    a = parse("--model-dir", llama_dir, "--side-channel-token-file", token, "--device", "cpu",
              config="/etc/pd-operator/prefill.json")
    with pytest.raises(pf.PreflightError, match="num_kv_heads is 4 there"):
        serve_cli.run_preflight(a)
    a = parse("--model-dir", llama_dir, "--side-channel-token-file", token, "--device", "cpu",
              config="/etc/pd-operator/decode.json")
    with pytest.raises(pf.PreflightError, match="ConfigMap is not mounted"):
        serve_cli.run_preflight(a)


def test_cuda_devices_against_tp_pp_dp():
    d = pf.Declared("dense", "bfloat16", 8, 128, 32, tp=4, pp=1, dp=1)
    (problem,) = pf.check_devices(d, "cuda", 2)
    assert "= 4 GPUs, but this pod sees 2" in problem
    assert pf.check_devices(d, "cuda", 4) == []


def test_sizes():
    assert serve_cli._bytes("2GiB") == 2 << 30
    assert serve_cli._bytes("512M") == 512 << 20
    assert serve_cli._bytes("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        serve_cli._bytes("lots")


def test_preflight_reads_a_gguf_without_loading_it(token):
    from pd_runtime.engine.gguf import smollm2_path

    try:
        path = smollm2_path()
    except Exception as exc:  # noqa: BLE001 - the package is an install step of the venv
        pytest.skip(str(exc))
    a = parse("--model-dir", path, "--side-channel-token-file", token, "--device", "cpu",
              model="HuggingFaceTB/SmolLM2-135M-Instruct", num_kv_heads="3", head_size="64",
              num_layers="30")
    assert serve_cli.run_preflight(a).checkpoint == path  # bfloat16 declared: a GGUF casts
    with pytest.raises(pf.PreflightError, match=r"numKVHeads \(--num-kv-heads 8\)"):
        serve_cli.run_preflight(parse("--model-dir", path, "--side-channel-token-file", token,
                                      "--device", "cpu", num_kv_heads="8", head_size="64",
                                      num_layers="30"))


def test_a_bundled_model_needs_no_model_dir(token):
    from pd_runtime.engine.gguf import smollm2_path

    try:
        path = smollm2_path()
    except Exception as exc:  # noqa: BLE001 - the package is an install step of the venv
        pytest.skip(str(exc))
    a = parse("--side-channel-token-file", token, "--device", "cpu",
              model="HuggingFaceTB/SmolLM2-135M-Instruct", num_kv_heads="3", head_size="64",
              num_layers="30")
    assert serve_cli.run_preflight(a).checkpoint == path
    assert serve_cli.bundled_model_path("HuggingFaceTB/SmolLM2-360M-Instruct") is None


def test_gil_switch_interval_is_set_before_anything_runs(monkeypatch, capsys):
    """Python's 5 ms switch interval becomes --gil-switch-interval-us (500 us by default) at the
    start of serve, before preflight; 0 is refused by the parser."""
    assert parse().gil_switch_interval_us == serve_cli.GIL_SWITCH_US == 500
    with pytest.raises(SystemExit):
        parse("--gil-switch-interval-us", "0")
    assert "--gil-switch-interval-us" in capsys.readouterr().err
    seen: list[float] = []
    monkeypatch.setattr(serve_cli.sys, "setswitchinterval", seen.append)

    def refuse(a: object) -> None:
        raise pf.PreflightError(["stop here"])

    monkeypatch.setattr(serve_cli, "run_preflight", refuse)
    assert serve_cli.main(parse("--gil-switch-interval-us", "200")) == 2
    assert seen == [0.0002]
