"""`pdctl operator render` and the `operator run` argument surface (no cluster)."""

from __future__ import annotations

import json

import yaml
from op_fixtures import BASE

from pd_operator.cli.main import build_parser, main


def test_render_prints_every_child(tmp_path, capsys):
    f = tmp_path / "pdd.yaml"
    f.write_text(yaml.safe_dump(BASE))
    assert main(["operator", "render", "-f", str(f), "-o", "json", "--uid", "u-9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "List" and len(out["items"]) == 15
    assert {i["metadata"]["ownerReferences"][0]["uid"] for i in out["items"]} == {"u-9"}
    assert {i["metadata"]["namespace"] for i in out["items"]} == {"ns1"}


def test_render_reports_schema_errors(tmp_path, capsys):
    bad = json.loads(json.dumps(BASE))
    bad["spec"]["prefill"]["bogus"] = 1
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    assert main(["operator", "render", "-f", str(f)]) == 1
    assert "spec.prefill.bogus" in capsys.readouterr().err


def test_run_flags():
    args = build_parser().parse_args(["operator", "run", "--local-webhook", "-n", "a", "-n",
                                      "b", "--lease-duration", "5", "--webhook-port", "0"])
    assert args.local_webhook and args.namespace == ["a", "b"]
    assert args.lease_duration == 5.0 and args.webhook_port == 0
    assert callable(args.func)
