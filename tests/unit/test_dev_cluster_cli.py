"""`pdctl dev cluster up`: a real node by default when root, the fake nodes alone with
--no-real-node or without root (said), and a running cluster keeps its mode."""

from __future__ import annotations

import argparse

import pytest

from pd_dev import cli as dev_cli


def args(tmp_path, flag):
    return argparse.Namespace(dir=str(tmp_path), real_node=flag)


@pytest.mark.parametrize("flag", [True, False])
def test_an_explicit_flag_wins(tmp_path, flag, monkeypatch):
    monkeypatch.setattr(dev_cli.os, "geteuid", lambda: 1000)
    assert dev_cli._want_real_node(args(tmp_path, flag)) is flag


def test_default_is_a_real_node_for_root(tmp_path, monkeypatch):
    monkeypatch.setattr(dev_cli.os, "geteuid", lambda: 0)
    assert dev_cli._want_real_node(args(tmp_path, None)) is True


def test_default_without_root_is_the_fake_nodes_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dev_cli.os, "geteuid", lambda: 1000)
    assert dev_cli._want_real_node(args(tmp_path, None)) is False
    assert "need root" in capsys.readouterr().err


def test_flags_parse(tmp_path):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    dev_cli.register(sub)
    for argv, want in (([], None), (["--real-node"], True), (["--no-real-node"], False)):
        ns = parser.parse_args(["dev", "cluster", "up", *argv])
        assert ns.real_node is want


def test_a_running_cluster_keeps_its_mode(tmp_path, monkeypatch):
    from pd_dev.devcluster import cluster

    class Running:
        any_running = True

    monkeypatch.setattr(dev_cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster, "status", lambda d, with_nodes=True: Running())
    assert dev_cli._want_real_node(args(tmp_path, None)) is False  # no real node recorded
