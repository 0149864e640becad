"""Bad inputs to pdctl: every one ends with exit 2 and a one-line reason, never a traceback
(issue 11 item 6). Each case failed on the code before: a traceback and exit 1, or a coerced
value that the API server would refuse."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pd_operator.cli import main as cli_main
from pd_operator.cli import validate_cmds
from pd_operator.cli.validate_cmds import InputError, check_documents, read_text
from tests.helpers import pdctl as pdctl_executable

ROOT = Path(__file__).resolve().parents[2]
BASIC = ROOT / "deploy" / "examples" / "accepted" / "llama-3.1-8b-basic.yaml"
PDCTL = [pdctl_executable()]
NOT_UTF8 = b"\xff\xfe apiVersion: x\n"

GOOD = """\
apiVersion: serving.pd-operator.dev/v1alpha1
kind: PDDeployment
metadata: {name: typed}
spec:
  model: {name: m, family: dense, numKVHeads: 8, headSize: 128, numHiddenLayers: 32}
  engine: {image: "vllm/vllm-openai:v0.33.0"}
  prefill: {attentionBackend: FLASH_ATTN}
  decode: {attentionBackend: FLASH_ATTN}
"""


def pdctl(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*PDCTL, *args], capture_output=True, cwd=ROOT, timeout=60, **kwargs)


def assert_clean_failure(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, and the words somewhere in what was printed."""
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    for word in words:
        assert word in out, (word, out)
    return out


# ------------------------------------------------------------------------- unreadable input
def test_non_utf8_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(NOT_UTF8)
    assert_clean_failure(pdctl("check", str(bad)), "not UTF-8")


def test_non_utf8_stdin():
    assert_clean_failure(pdctl("check", "-", input=NOT_UTF8), "stdin is not UTF-8")


def test_closed_stdin():
    proc = subprocess.run([*PDCTL, "check", "-"], capture_output=True, cwd=ROOT, timeout=60,
                          preexec_fn=lambda: os.close(0))
    assert_clean_failure(proc, "stdin", "closed")


def test_input_above_the_limit_and_the_flag_that_raises_it(tmp_path):
    size = BASIC.stat().st_size
    assert_clean_failure(pdctl("check", "--max-bytes", str(size - 1), str(BASIC)),
                         "larger than", "--max-bytes")
    assert pdctl("check", "--max-bytes", str(size), str(BASIC)).returncode == 0


def test_default_limit_stops_reading_early(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(validate_cmds.DEFAULT_MAX_BYTES + 10)  # sparse: no disk cost
    with pytest.raises(InputError, match="larger than"):
        read_text(str(big))


def test_bad_max_bytes_is_a_usage_error():
    assert_clean_failure(pdctl("check", "--max-bytes", "0", str(BASIC)), "not positive")


def test_closed_output_pipe():
    """`pdctl check ... | head` with the reader gone: exit 2, one line on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write gets EPIPE
    try:
        proc = subprocess.run([*PDCTL, "check", "-o", "json", str(BASIC)], stdout=write_end,
                              stderr=subprocess.PIPE, cwd=ROOT, timeout=60)
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "output closed" in err


# ------------------------------------------------------------------------- strict types
@pytest.mark.parametrize(("old", "new", "path"), [
    ("numKVHeads: 8", 'numKVHeads: "8"', "spec.model.numKVHeads"),
    ("headSize: 128", "headSize: true", "spec.model.headSize"),
    ("prefill: {attentionBackend", 'prefill: {tensorParallelSize: "4", attentionBackend',
     "spec.prefill.tensorParallelSize"),
    ("decode: {attentionBackend", 'decode: {prefixCaching: "no", attentionBackend',
     "spec.decode.prefixCaching"),
    ("decode: {attentionBackend", "decode: {replicas: true, attentionBackend",
     "spec.decode.replicas"),
])
def test_types_are_as_strict_as_the_api_server(tmp_path, old, new, path):
    doc = tmp_path / "typed.yaml"
    doc.write_text(GOOD.replace(old, new))
    (report,) = check_documents([str(doc)])
    assert report.invalid and path in [p for p, _ in report.errors], report.errors


def test_well_typed_document_still_passes(tmp_path):
    doc = tmp_path / "typed.yaml"
    doc.write_text(GOOD)
    (report,) = check_documents([str(doc)])
    assert not report.invalid and report.body["accepted"]


def test_strict_type_error_exits_2(tmp_path):
    doc = tmp_path / "typed.yaml"
    doc.write_text(GOOD.replace("numKVHeads: 8", 'numKVHeads: "8"'))
    assert_clean_failure(pdctl("check", str(doc)), "spec.model.numKVHeads")


# ------------------------------------------------------------------------- other commands
def test_model_info_bad_inputs(tmp_path):
    zero = tmp_path / "zero.json"
    zero.write_text('{"num_attention_heads": 0, "hidden_size": 4096, "num_hidden_layers": 2}')
    assert_clean_failure(pdctl("model-info", str(zero)), "error:")
    bad = tmp_path / "bad.json"
    bad.write_bytes(NOT_UTF8)
    assert_clean_failure(pdctl("model-info", str(bad)), "not UTF-8")


@pytest.mark.parametrize(("content", "words"), [
    (None, ("cannot read",)), (NOT_UTF8, ("not UTF-8",)), (b"a: [\n", ("not YAML",))])
def test_operator_render_bad_inputs(tmp_path, content, words):
    path = tmp_path / "in.yaml"
    if content is not None:
        path.write_bytes(content)
    assert_clean_failure(pdctl("operator", "render", "-f", str(path)), *words)


def test_unexpected_error_is_one_line(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("renderer fell over")

    monkeypatch.setattr(validate_cmds, "run_crd", boom)
    monkeypatch.delenv("PDCTL_TRACEBACK", raising=False)
    assert cli_main.main(["crd"]) == 2
    err = capsys.readouterr().err
    assert "RuntimeError: renderer fell over" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["--tokens", "0"], ["--p-block", "0"], ["--d-tp", "-2"],
                                  ["--timeout", "-1"], ["--kv-heads", "x"]])
def test_transfer_test_refuses_bad_numbers_before_running(args, capsys):
    """pd-runtime transfer-test: a zero block or token count raised ZeroDivisionError/KeyError
    deep in the test; now argparse refuses it (exit 2, one line)."""
    from pd_runtime.cli import main as runtime_main

    with pytest.raises(SystemExit) as exc:
        runtime_main(["transfer-test", *args])
    assert exc.value.code == 2
    assert args[0] in capsys.readouterr().err


@pytest.mark.parametrize("name,words", [("a" * 45, "at most 44"), ("Typed", "DNS-1035")])
def test_names_the_webhook_refuses_at_creation(tmp_path, name, words):
    f = tmp_path / "name.yaml"
    f.write_text(GOOD.replace("name: typed", f"name: {name}"))
    out = assert_clean_failure(pdctl("check", str(f)), "metadata.name", words)
    assert "Traceback" not in out
    f.write_text(GOOD.replace("name: typed", "name: " + "a" * 44))
    assert pdctl("check", str(f)).returncode == 0
