"""The cached binaries are the pinned versions, and the running apiserver is that version."""

from __future__ import annotations

import subprocess

import pytest
from kubernetes import client

from pd_dev.devcluster import build, versions

pytestmark = pytest.mark.cluster


def test_binaries_report_pinned_versions(dev_cluster):
    v = versions.load()
    for tool in build.tools(v):
        for b in tool.binaries:
            path = build.binary_path(b.name)
            out = subprocess.run([str(path), *b.version_args], capture_output=True, text=True,
                                 check=False)
            assert b.expect in out.stdout + out.stderr, (b.name, out.stdout, out.stderr)
            assert str(versions.cache_root()) in str(path)  # cached outside the repository


def test_server_version_and_loopback_only(kube_api):
    info = client.VersionApi(kube_api).get_code()
    assert info.git_version == versions.load().kubernetes
    assert kube_api.configuration.host.startswith("https://127.0.0.1:")


def _listening(pid: int) -> list[str]:
    """Local addresses of the TCP sockets process `pid` listens on (from /proc)."""
    import os
    from pathlib import Path

    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addrs = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                addrs.append(f[1])
    return addrs


def test_all_components_listen_on_loopback_only(dev_cluster):
    from pd_dev.devcluster import cluster

    st = cluster.status(dev_cluster.dir, with_nodes=False)
    assert st.ok
    for comp in st.components:
        addrs = _listening(comp.pid)
        assert addrs, f"{comp.name} listens on nothing?"
        for a in addrs:
            host = a.split(":")[0]
            # 127.0.0.1 as /proc/net/tcp writes it, or ::ffff:127.0.0.1 / ::1 in tcp6
            assert host in ("0100007F", "0000000000000000FFFF00000100007F",
                            "00000000000000000000000001000000"), (comp.name, a)
