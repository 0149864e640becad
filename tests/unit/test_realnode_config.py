"""The real node's pure parts (pd_dev.devcluster.realnode): the iptables undo plan, the image
archive, the workarounds in the generated configuration, and the API server flags."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from pd_dev.devcluster import build, components
from pd_dev.devcluster import realnode as rn
from pd_dev.devcluster import versions as _v

BEFORE = """-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
-N DOCKER
-N CNI-OLD
-A FORWARD -j DOCKER
-A FORWARD -j CNI-OLD
"""

AFTER = BEFORE + """-N CNI-FORWARD
-N CNI-ADMIN
-N KUBE-FIREWALL
-N OTHER-NEW
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "CNI firewall plugin rules" -j CNI-FORWARD
-A FORWARD -j OTHER-NEW
-A FORWARD -o pdrn0 -j ACCEPT
-A CNI-FORWARD -j CNI-ADMIN
-A KUBE-FIREWALL -d 127.0.0.0/8 -j DROP
"""


def test_iptables_undo_removes_only_what_the_node_added():
    cmds = rn.iptables_undo("filter", BEFORE, AFTER)
    deletes = [c for c in cmds if c[2] == "-D"]
    assert ["-t", "filter", "-D", "INPUT", "-j", "KUBE-FIREWALL"] in deletes
    # a quoted comment comes back as one argument, without the shell quotes
    assert ["-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment",
            "CNI firewall plugin rules", "-j", "CNI-FORWARD"] in deletes
    assert ["-t", "filter", "-D", "FORWARD", "-o", "pdrn0", "-j", "ACCEPT"] in deletes
    assert len(deletes) == 3  # not DOCKER's, not CNI-OLD's (there before), not OTHER-NEW's
    flushed = {c[3] for c in cmds if c[2] == "-F"}
    removed = [c[3] for c in cmds if c[2] == "-X"]
    assert flushed == set(removed) == {"CNI-FORWARD", "CNI-ADMIN", "KUBE-FIREWALL"}
    # every chain is flushed before any is deleted (CNI-FORWARD jumps to CNI-ADMIN)
    last_flush = max(i for i, c in enumerate(cmds) if c[2] == "-F")
    assert all(i > last_flush for i, c in enumerate(cmds) if c[2] == "-X")


def test_iptables_undo_of_an_unchanged_table_is_empty():
    assert rn.iptables_undo("nat", AFTER, AFTER) == []


def _members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def test_docker_archive_is_a_loadable_image_and_deterministic():
    files = {"bin/tool": (b"\x7fELF fake", 0o755)}
    a = rn.docker_archive("example.dev/x:1", files, ["/bin/tool"], links={"bin/sh": "tool"})
    assert a == rn.docker_archive("example.dev/x:1", files, ["/bin/tool"],
                                  links={"bin/sh": "tool"})
    m = _members(a)
    manifest = json.loads(m["manifest.json"])
    assert manifest[0]["RepoTags"] == ["example.dev/x:1"]
    config = json.loads(m[manifest[0]["Config"]])
    layer = m[manifest[0]["Layers"][0]]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    assert config["config"]["Cmd"] == ["/bin/tool"]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        members = {x.name: x for x in tf.getmembers()}
    assert members["bin/tool"].mode == 0o755
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "tool"
    assert members["tmp"].isdir()


def test_generated_configs_carry_the_workarounds(tmp_path: Path):
    nl = rn.NodeLayout(tmp_path / "realnode", tmp_path / "run")
    toml = rn.containerd_config(nl)
    assert "restrict_oom_score_adj = true" in toml
    assert "SystemdCgroup = false" in toml
    assert f'address = "{nl.containerd_sock}"' in toml
    assert f'sandbox_image = "{rn.PAUSE_IMAGE}"' in toml
    plugins = [p["type"] for p in rn.cni_conflist(nl)["plugins"]]
    assert plugins == ["bridge", "portmap", "firewall"]
    assert rn.cni_conflist(nl)["plugins"][0]["ipam"]["type"] == "host-local"
    cfg = rn.kubelet_config(nl, tmp_path / "ca.crt", (tmp_path / "s.crt", tmp_path / "s.key"),
                            "192.0.2.2", {"kubelet": 1, "kubelet-healthz": 2})
    assert cfg["failCgroupV1"] is False and cfg["cgroupDriver"] == "cgroupfs"
    assert cfg["registerWithTaints"] == [rn.REAL_NODE_TAINT]
    assert cfg["authorization"]["mode"] == "Webhook"
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    argv = rn.kubelet_argv(Path("/bin/kubelet"), nl, "192.0.2.2", 4)
    assert f"--hostname-override={rn.NODE_NAME}" in argv
    assert any(a.startswith("--node-labels=") and f"{rn.REAL_NODE_LABEL}=true" in a
               for a in argv)
    assert rn.POD_SUBNET != components.POD_CIDR  # never kwok's fake pod addresses


def _apiserver(extra: tuple[str, ...]) -> tuple[str, ...]:
    layout = components.Layout(Path("/c"), Path("/c/etcd"))
    ports = {n: 1000 + i for i, n in enumerate(components.PORT_NAMES)}
    bins = {n: Path(f"/bin/{n}") for n in ("etcd", "kube-apiserver", "kube-controller-manager",
                                          "kube-scheduler", "kwok")}
    return components.commands(bins, layout, ports, [], apiserver_extra=extra)[
        "kube-apiserver"].argv


def test_apiserver_flags_for_a_real_node_replace_the_defaults():
    default = _apiserver(())
    assert "--authorization-mode=RBAC" in default
    assert "--endpoint-reconciler-type=none" in default
    assert "--bind-address=127.0.0.1" in default
    assert not any("kubelet-client" in f for f in default)
    real = _apiserver(rn.apiserver_flags(Path("/c/pki"), "192.0.2.2"))
    names = [f.split("=", 1)[0] for f in real]
    assert len(names) == len(set(names))  # each flag once: the real node's replace defaults
    assert "--authorization-mode=Node,RBAC" in real
    assert "--kubelet-preferred-address-types=InternalIP,Hostname" in real
    assert "--kubelet-client-certificate=/c/pki/kubelet-client.crt" in real
    # pods reach it through the `kubernetes` Service: a real address, with endpoints
    assert "--advertise-address=192.0.2.2" in real
    assert "--endpoint-reconciler-type=lease" in real


def test_kube_proxy_leaves_host_sysctls_alone_and_coredns_serves_on_the_bridge(tmp_path):
    nl = rn.NodeLayout(tmp_path, tmp_path / "run")
    ports = {n: 100 + i for i, n in enumerate(rn.REAL_PORT_NAMES)}
    cfg = rn.kube_proxy_config(nl, ports)
    assert cfg["mode"] == "iptables" and cfg["clusterCIDR"] == rn.POD_SUBNET
    assert cfg["conntrack"]["maxPerCore"] == 0  # 0: leave nf_conntrack_max as it is
    assert cfg["iptables"]["localhostNodePorts"] is False  # no route_localnet change
    assert cfg["healthzBindAddress"].startswith("127.0.0.1:")
    corefile = rn.corefile(tmp_path / "kc", ports)
    assert f"bind {rn.BRIDGE_IP}" in corefile and "kubernetes cluster.local" in corefile
    kubelet = rn.kubelet_config(nl, tmp_path / "ca", (tmp_path / "c", tmp_path / "k"), "1.2.3.4",
                                ports)
    assert kubelet["clusterDNS"] == [rn.BRIDGE_IP]


def test_default_build_is_unchanged_and_node_binaries_share_the_k8s_version():
    v = _v.load()
    assert [t.name for t in build.tools(v)] == ["k8s", "etcd", "kwok", "helm"]
    node, coredns = build.node_tools(v)
    assert [b.name for b in node.binaries] == ["kubelet", "kube-proxy"]
    assert coredns.version == v.coredns and coredns.binaries[0].name == "coredns"
    build.check_wrapper(coredns, _v.local_dir())
    assert node.version == v.kubernetes and node.wrapper == "k8s-node"
    k8s = build.tools(v)[0]
    assert node.ldflags == k8s.ldflags and node.tags == k8s.tags  # built the same way
    build.check_wrapper(node, _v.local_dir())  # deploy/local/k8s-node pins the same version
