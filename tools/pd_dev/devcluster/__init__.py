"""A real local Kubernetes control plane for development and tests (`pdctl dev cluster`).

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as plain processes on
127.0.0.1, built from the Go module proxy into a cache outside the repository. Fake GPU nodes come
from kwok. Modules:

* `versions`  - the pinned versions (read from deploy/local/versions.env) and the cache layout
* `build`     - build/install the binaries (skipped when present and reporting the right version)
* `pki`       - the cluster's own CA and certificates (openssl CLI)
* `components`- the command lines of each process (pure)
* `processes` - start/stop by PID, liveness and health probes
* `nodes`     - the fake GPU node objects (pure)
* `cluster`   - up / down / status, tying the above together
* `realnode`  - the real node of `up --real-node` (kubelet, kube-proxy, containerd, CNI, CoreDNS):
  configs, command lines, the iptables undo plan, images without a registry (pure)
* `realnode_host` - the real node on this host: packages, start, drain/stop, undo
  (docs/real-node.md)
"""
