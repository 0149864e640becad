"""The real node beside the kwok fake nodes (`pdctl dev cluster up --real-node`), pure parts.

One kubelet and kube-proxy (built like the control plane), Debian's containerd + runc and CNI
plugins (bridge, host-local, portmap, firewall), and CoreDNS on the bridge address make one node
where pods really run, reach Services (the API server's too) and resolve cluster names.
Everything this module returns is text or argv: the host side (start, stop, undo) is in
`realnode_host`. The workarounds of ../shared/reference/real-node.md are here, each named where
it is applied.

The node carries fake ``nvidia.com/gpu`` capacity, the label ``REAL_NODE_LABEL`` and the taint
``REAL_NODE_TAINT`` (NoSchedule), so only pods that ask for it (nodeSelector + toleration) land
on it: the scale and GPU-scheduling tests keep using the fake nodes only.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import tarfile
from dataclasses import dataclass
from pathlib import Path

NODE_NAME = "pd-real-node"
REAL_NODE_LABEL = "pd-operator.dev/real-node"
REAL_NODE_TAINT = {"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}
POD_SUBNET = "10.244.0.0/24"  # kwok's fake pod CIDR is 10.0.0.0/16: keep clear of it
BRIDGE = "pdrn0"
BRIDGE_IP = "10.244.0.1"  # the pods' gateway (the bridge plugin's isGateway) and their DNS
CLUSTER_DOMAIN = "cluster.local"
CNI_NETWORK = "pd-realnode"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
APT_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables")
# host binaries the node needs, and the package that ships each
HOST_BINARIES = {
    "containerd": "containerd", "ctr": "containerd", "runc": "runc",
    "iptables": "iptables", "ip6tables": "iptables",
}
CNI_PLUGINS = ("bridge", "host-local", "portmap", "firewall", "loopback")
# sysctls the kubelet (kernel tunables), the bridge plugin (ip_forward) and kube-proxy may set;
# `down` puts back each one that changed
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.bridge.bridge-nf-call-iptables",
    "net.ipv4.conf.all.route_localnet",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
IPTABLES = ("iptables", "ip6tables")  # the kubelet makes its canary chains in both
IPTABLES_TABLES = ("filter", "nat", "mangle")
# chains created by the CNI plugins (CNI-*) and by kubelet / kube-proxy (KUBE-*)
OWNED_CHAIN_PREFIXES = ("CNI-", "KUBE-")
REAL_PORT_NAMES = ("kubelet", "kubelet-healthz", "kube-proxy-healthz", "kube-proxy-metrics",
                   "coredns-health")


@dataclass(frozen=True)
class NodeLayout:
    """Where the real node keeps its files: all under the cluster dir, except containerd's
    runtime state (a short path under /run: unix socket paths are limited to 108 bytes)."""

    dir: Path  # <cluster dir>/realnode
    run: Path  # /run/pd-operator-<uid>-<tag>

    @property
    def containerd_root(self) -> Path:
        return self.dir / "containerd"

    @property
    def containerd_state(self) -> Path:
        return self.run / "containerd"

    @property
    def containerd_sock(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.dir / "containerd.toml"

    @property
    def cni_conf_dir(self) -> Path:
        return self.dir / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.dir / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.dir / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.dir / "kubelet-config.yaml"

    @property
    def kubelet_kubeconfig(self) -> Path:
        return self.dir / "kubelet.kubeconfig"

    @property
    def kube_proxy_config(self) -> Path:
        return self.dir / "kube-proxy-config.yaml"

    @property
    def kube_proxy_kubeconfig(self) -> Path:
        return self.dir / "kube-proxy.kubeconfig"

    @property
    def corefile(self) -> Path:
        return self.dir / "Corefile"

    @property
    def pod_logs(self) -> Path:
        return self.dir / "pod-logs"

    @property
    def images(self) -> Path:
        return self.dir / "images"


def node_layout(cluster_dir: Path) -> NodeLayout:
    import os

    tag = hashlib.sha1(str(cluster_dir.resolve()).encode()).hexdigest()[:10]
    return NodeLayout(cluster_dir / "realnode", Path(f"/run/pd-operator-{os.getuid()}-{tag}"))


def containerd_config(nl: NodeLayout) -> str:
    """containerd 1.6 (config version 2), with its own root, state and socket."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{nl.containerd_root}"
state = "{nl.containerd_state}"
oom_score = 0

[grpc]
  address = "{nl.containerd_sock}"

[ttrpc]
  address = "{nl.containerd_sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{nl.containerd_root}/opt"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # the VM lacks CAP_SYS_RESOURCE: a negative oom_score_adj fails every sandbox (real-node.md)
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

# crun refuses hybrid cgroups; no systemd here: cgroupfs (real-node.md)
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{nl.cni_conf_dir}"
  max_conf_num = 1
"""


def cni_conflist(nl: NodeLayout) -> dict:
    """bridge + host-local + portmap + firewall: without a conflist the node stays NotReady; the
    firewall plugin admits pod egress when FORWARD's policy is DROP (real-node.md)."""
    return {
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(nl.cni_ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "firewall", "backend": "iptables"},
        ],
    }


def kubelet_config(nl: NodeLayout, ca: Path, serving: tuple[Path, Path], node_ip: str,
                   ports: dict[str, int], cluster_dns: tuple[str, ...] = (BRIDGE_IP,)) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,  # kubelet >= 1.35 refuses cgroup v1 otherwise (real-node.md)
        "cgroupDriver": "cgroupfs",  # no systemd
        "containerRuntimeEndpoint": f"unix://{nl.containerd_sock}",
        "address": node_ip,
        "port": ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports["kubelet-healthz"],
        "tlsCertFile": str(serving[0]),
        "tlsPrivateKeyFile": str(serving[1]),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "registerWithTaints": [REAL_NODE_TAINT],
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": list(cluster_dns),
        "resolvConf": "/etc/resolv.conf",
        "podLogsDir": str(nl.pod_logs),
        "failSwapOn": False,
        "serializeImagePulls": False,
        # a shared development disk: never evict for disk, never garbage-collect local images
        # (they cannot be pulled back: there is no registry)
        "evictionHard": {"memory.available": "100Mi"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "protectKernelDefaults": False,
        "maxPods": 110,
    }


def kubelet_argv(kubelet: Path, nl: NodeLayout, node_ip: str, gpus: int) -> tuple[str, ...]:
    labels = {
        REAL_NODE_LABEL: "true",
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.count": str(gpus),
    }
    return (
        str(kubelet),
        f"--config={nl.kubelet_config}",
        f"--kubeconfig={nl.kubelet_kubeconfig}",
        f"--root-dir={nl.kubelet_root}",
        f"--cert-dir={nl.kubelet_root / 'pki'}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={node_ip}",
        "--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        "--v=1",
    )


def containerd_argv(nl: NodeLayout) -> tuple[str, ...]:
    return ("containerd", f"--config={nl.containerd_config}")


def apiserver_flags(pki_dir: Path, node_ip: str) -> tuple[str, ...]:
    """What the API server needs for a real node: Node authorization (the kubelet's own
    credentials), a client certificate towards the kubelets (logs/exec), and the node's
    InternalIP rather than its name, which nothing resolves (real-node.md). Pods reach it
    through the `kubernetes` Service: it advertises (and listens on) the host's address, which
    its certificate names, and keeps that Service's endpoints (the default reconciler)."""
    return (
        f"--advertise-address={node_ip}",
        "--bind-address=0.0.0.0",
        "--endpoint-reconciler-type=lease",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        f"--kubelet-client-certificate={pki_dir / 'kubelet-client.crt'}",
        f"--kubelet-client-key={pki_dir / 'kubelet-client.key'}",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
    )


def kube_proxy_config(nl: NodeLayout, ports: dict[str, int]) -> dict:
    """iptables mode; the host's conntrack sysctls and route_localnet are left alone (zero
    values and no localhost NodePorts), so the only host changes are iptables rules."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(nl.kube_proxy_kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": POD_SUBNET,
        "hostnameOverride": NODE_NAME,
        "healthzBindAddress": f"127.0.0.1:{ports['kube-proxy-healthz']}",
        "metricsBindAddress": f"127.0.0.1:{ports['kube-proxy-metrics']}",
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False},
        "nodePortAddresses": ["primary"],  # NodePorts on the node's InternalIP only
    }


def kube_proxy_argv(kube_proxy: Path, nl: NodeLayout) -> tuple[str, ...]:
    return (str(kube_proxy), f"--config={nl.kube_proxy_config}", "--v=1")


def corefile(kubeconfig: Path, ports: dict[str, int]) -> str:
    """CoreDNS on the bridge address: cluster names from the API server, the rest forwarded
    to the host's resolvers."""
    return f""".:53 {{
    bind {BRIDGE_IP}
    errors
    health 127.0.0.1:{ports['coredns-health']}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} pd-dev
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    forward . /etc/resolv.conf
    cache 30
    loop
}}
"""


def coredns_argv(coredns: Path, nl: NodeLayout) -> tuple[str, ...]:
    return (str(coredns), "-conf", str(nl.corefile))


def gpu_status_patch(gpus: int) -> list[dict]:
    """A JSON patch of the node's status: fake GPU capacity, kept across kubelet updates."""
    return [
        {"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": str(gpus)},
        {"op": "add", "path": "/status/allocatable/nvidia.com~1gpu", "value": str(gpus)},
    ]


# ---- iptables: undo exactly what the node added -------------------------------------------


def _owned(chain: str, before: set[str]) -> bool:
    return chain.startswith(OWNED_CHAIN_PREFIXES) and chain not in before


def iptables_undo(table: str, before: str, after: str) -> list[list[str]]:
    """`iptables` argument lists that remove what appeared between two `iptables -t T -S`
    listings (before `up`, now): rules jumping to chains that are new and ours (CNI-*, KUBE-*),
    rules naming our bridge or pod subnet, then the new chains themselves (flush, delete).
    Rules and chains that were there before, or that are not ours, are left alone."""
    old_chains, new_chains = _chains_s(before), _chains_s(after)
    ours = {c for c in new_chains if _owned(c, old_chains)}
    old_rules = set(before.splitlines())
    cmds: list[list[str]] = []
    for line in after.splitlines():
        if not line.startswith("-A ") or line in old_rules:
            continue
        words = shlex.split(line)  # -S quotes comments like a shell
        chain = words[1]
        if chain in ours:
            continue  # goes with its chain
        target = words[words.index("-j") + 1] if "-j" in words else ""
        mentions = BRIDGE in words or POD_SUBNET in words
        if target in ours or mentions:
            cmds.append(["-t", table, "-D", *words[1:]])
    for chain in sorted(ours):
        cmds.append(["-t", table, "-F", chain])
    for chain in sorted(ours):
        cmds.append(["-t", table, "-X", chain])
    return cmds


def _chains_s(listing: str) -> set[str]:
    """Chains of an `iptables -S` listing (`-P NAME ...` builtins, `-N NAME` user chains)."""
    out = set()
    for line in listing.splitlines():
        if line.startswith(("-P ", "-N ")):
            out.add(line.split()[1])
    return out


# ---- images without a registry ----------------------------------------------------------


def docker_archive(name: str, files: dict[str, tuple[bytes, int]], cmd: list[str],
                   links: dict[str, str] | None = None,
                   env: tuple[str, ...] = ("PATH=/bin:/usr/bin:/sbin:/usr/sbin",)) -> bytes:
    """A one-layer image as a `docker save` archive (what `ctr images import` reads), made of
    `files` {path in the image: (content, mode)} and symlinks `links` {path: target};
    deterministic for the same input. `name` must carry a tag (not `latest`): pods then use
    the imported image without trying a registry."""
    links = links or {}
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        dirs = sorted({str(Path(p).parent) for p in (*files, *links)} - {"."} | {"tmp"})
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tf.addfile(ti)
        for path, (data, mode) in sorted(files.items()):
            ti = tarfile.TarInfo(path)
            ti.size, ti.mode = len(data), mode
            tf.addfile(ti, io.BytesIO(data))
        for path, target in sorted(links.items()):
            ti = tarfile.TarInfo(path)
            ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, target, 0o777
            tf.addfile(ti)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": list(env)},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "pd_dev.devcluster.realnode.docker_archive"}],
    }, sort_keys=True).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [name],
                            "Layers": ["layer.tar"]}]).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for fname, data in (("layer.tar", layer_bytes), (config_name, config),
                            ("manifest.json", manifest)):
            ti = tarfile.TarInfo(fname)
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
    return out.getvalue()
