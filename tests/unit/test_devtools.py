"""The product without the development tooling: pdctl still runs, `pdctl dev` is absent, and
`--local-webhook` without certificate files names what is missing."""

from __future__ import annotations

import sys

import pytest

from pd_operator.cli.main import build_parser
from pd_operator.devtools import dev_module


@pytest.fixture
def without_pd_dev(monkeypatch):
    for name in [m for m in sys.modules if m == "pd_dev" or m.startswith("pd_dev.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pd_dev", None)  # import pd_dev -> ModuleNotFoundError


def test_dev_module_when_installed():
    assert dev_module("cli").__name__ == "pd_dev.cli"


def test_dev_module_is_none_without_the_tooling(without_pd_dev):
    assert dev_module("cli") is None
    assert dev_module("certs") is None


def test_a_missing_module_inside_the_tooling_is_an_error():
    with pytest.raises(ModuleNotFoundError):
        dev_module("no_such_module")


def test_pdctl_without_the_tooling_has_no_dev_command(without_pd_dev):
    parser = build_parser()
    assert parser.parse_args(["check", "x.yaml"]).command == "check"
    with pytest.raises(SystemExit):
        parser.parse_args(["dev", "cluster", "up"])
