"""Fake GPU nodes managed by kwok (pure: builds the Node objects).

kwok manages nodes annotated ``kwok.x-k8s.io/node: fake``; its node-initialize stage keeps the
capacity/allocatable given here, so kube-scheduler fits ``nvidia.com/gpu`` requests against it.
The nodes carry NO taint, so ordinary pods (the operator's StatefulSets) schedule onto them
without tolerations. Pod IPs come from kwok's --cidr and are fake: never send traffic to them.
"""

from __future__ import annotations

from dataclasses import dataclass

GPU_RESOURCE = "nvidia.com/gpu"
PRODUCT_LABEL = "nvidia.com/gpu.product"
ZONE_LABEL = "topology.kubernetes.io/zone"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
NODE_PREFIX = "gpu-node-"

# (product label value, GPU memory in MiB) - H100 on the first half of the nodes, H200 on the rest
PRODUCTS = (("NVIDIA-H100-80GB-HBM3", 81559), ("NVIDIA-H200", 143771))
ZONES = ("zone-a", "zone-b")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    product: str
    gpu_memory_mib: int
    zone: str
    gpus: int


def node_specs(count: int = 4, gpus: int = 8) -> list[NodeSpec]:
    """Node i: product by half (H100 first, then H200), zone alternating, so each zone has both."""
    specs = []
    for i in range(count):
        product, mem = PRODUCTS[0] if i < (count + 1) // 2 else PRODUCTS[1]
        specs.append(NodeSpec(f"{NODE_PREFIX}{i}", product, mem, ZONES[i % len(ZONES)], gpus))
    return specs


def node_object(spec: NodeSpec, cpu: str = "96", memory: str = "1536Gi", pods: str = "256") -> dict:
    capacity = {
        "cpu": cpu,
        "memory": memory,
        "pods": pods,
        "ephemeral-storage": "4Ti",
        GPU_RESOURCE: str(spec.gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": spec.name,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": spec.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node-role.kubernetes.io/gpu": "",
                ZONE_LABEL: spec.zone,
                "topology.kubernetes.io/region": "local",
                PRODUCT_LABEL: spec.product,
                "nvidia.com/gpu.count": str(spec.gpus),
                "nvidia.com/gpu.memory": str(spec.gpu_memory_mib),
                "nvidia.com/gpu.present": "true",
            },
        },
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": dict(capacity),
        },
    }


def node_objects(count: int = 4, gpus: int = 8) -> list[dict]:
    return [node_object(s) for s in node_specs(count, gpus)]
