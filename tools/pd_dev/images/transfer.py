"""Moving an image from `docker save` into the node's containerd, sending only new layers.

`docker save | ctr images import -` makes containerd read, hash and write every layer again,
even those it holds already (the runtime image: 6 GiB, two minutes, for a one-line source
change). Here the save stream is read once and turned into an OCI archive that carries the
config, the manifest and only the layers the node lacks; `ctr images import` then finds the
others in its content store by digest (the import does not need them in the archive).

Which layer is which: `docker save` (20.10) names each layer `<v1 id>/layer.tar`, where the v1
id is a hash of the layer's chain id, i.e. of its digest and all below it; the archive's
`manifest.json` (at the end of the stream) maps the names to the config's diff ids, the
layers' digests. Each import records name -> (digest, size), so the next save can skip, without
reading them into a file, the layers the node has. A layer not recorded is hashed while it is
copied to a spill file. Anything unexpected raises `DeltaMiss`: the caller then imports in full.
These functions only read and write streams and files; the processes are the caller's.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

IMAGE_NAME_ANNOTATION = "io.containerd.image.name"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
CHUNK = 1 << 20


class DeltaMiss(RuntimeError):
    """The save stream is not what the record predicted: import the whole image instead."""


@dataclass(frozen=True)
class Layer:
    digest: str  # sha256:... of the uncompressed layer tar (= the config's diff id)
    size: int


@dataclass
class Transfer:
    """What one import learned and did."""

    layers: dict[str, Layer] = field(default_factory=dict)  # "<v1 id>/layer.tar" -> layer
    sent: int = 0  # layer bytes put into the archive
    skipped: int = 0  # layer bytes the node had


def _norm(name: str) -> str:
    return posixpath.normpath(name)


def _manifest_layers(manifest: list[dict], configs: Mapping[str, bytes]
                     ) -> tuple[bytes, list[tuple[str, str]]]:
    """(config bytes, [(layer name, diff id)]) of the one image in a docker-save archive."""
    if len(manifest) != 1:
        raise DeltaMiss(f"expected one image in the archive, found {len(manifest)}")
    entry = manifest[0]
    config = configs.get(_norm(entry["Config"]))
    if config is None:
        raise DeltaMiss(f"config {entry['Config']} missing from the archive")
    diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    names = [_norm(n) for n in entry["Layers"]]
    if len(names) != len(diff_ids):
        raise DeltaMiss("manifest and config disagree on the number of layers")
    return config, list(zip(names, diff_ids, strict=True))


def record_of(manifest: list[dict], configs: Mapping[str, bytes],
              sizes: Mapping[str, int]) -> dict[str, Layer]:
    """name -> Layer for every layer of a docker-save archive (sizes from its tar headers)."""
    _, pairs = _manifest_layers(manifest, configs)
    return {name: Layer(digest, sizes[name]) for name, digest in pairs if name in sizes}


def passthrough(src: IO[bytes], dst: IO[bytes]) -> Transfer:
    """Copy a docker-save archive unchanged (the full import), recording its layers."""
    configs: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    manifest: list[dict] = []
    out = Transfer()
    with tarfile.open(fileobj=src, mode="r|", bufsize=CHUNK) as tin, \
            tarfile.open(fileobj=dst, mode="w|", bufsize=CHUNK) as tout:
        tout.copybufsize = CHUNK  # type: ignore[attr-defined]  # real, not in typeshed
        for m in tin:
            name = _norm(m.name)
            if not m.isfile():
                tout.addfile(m)
                continue
            f = tin.extractfile(m)
            if name.endswith("/layer.tar"):
                tout.addfile(m, f)
                sizes[name] = m.size
                out.sent += m.size
                continue
            data = f.read() if f else b""
            tout.addfile(m, io.BytesIO(data))
            if name == "manifest.json":
                manifest = json.loads(data)
            elif name.endswith(".json") and "/" not in name:
                configs[name] = data
    if manifest:
        out.layers = record_of(manifest, configs, sizes)
    return out


def _copy_hashing(f: IO[bytes], sink: IO[bytes] | None) -> str:
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return "sha256:" + h.hexdigest()


def _drain(f: IO[bytes]) -> None:
    while f.read(CHUNK):
        pass


def oci_documents(ref: str, config: bytes, layers: list[Layer]) -> tuple[bytes, bytes]:
    """(manifest, index.json) of an OCI layout holding one image named `ref`."""
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "size": len(config),
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest()},
        "layers": [{"mediaType": OCI_LAYER, "size": lay.size, "digest": lay.digest}
                   for lay in layers],
    }, separators=(",", ":")).encode()
    index = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "size": len(manifest),
                       "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                       "annotations": {IMAGE_NAME_ANNOTATION: ref}}],
    }, separators=(",", ":")).encode()
    return manifest, index


def _add(tout: tarfile.TarFile, name: str, data: bytes | None = None,
         path: Path | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    if path is not None:
        info.size = path.stat().st_size
        with open(path, "rb") as fh:
            tout.addfile(info, fh)
    else:
        info.size = len(data or b"")
        tout.addfile(info, io.BytesIO(data or b""))


def delta(src: IO[bytes], dst: IO[bytes], ref: str, record: Mapping[str, Layer],
          node_has: set[str], spill: Path) -> Transfer:
    """Turn a docker-save stream into an OCI archive without the layers in `node_has`."""
    configs: dict[str, bytes] = {}
    manifest: list[dict] = []
    seen: dict[str, Layer] = {}  # name -> layer, for every layer.tar in the stream
    spilled: dict[str, Path] = {}  # digest -> file
    links: dict[str, str] = {}  # name -> target name (docker links repeated layers)
    out = Transfer()
    spill.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=src, mode="r|", bufsize=CHUNK) as tin:
        for m in tin:
            name = _norm(m.name)
            if name.endswith("/layer.tar") and m.issym():
                links[name] = _norm(posixpath.join(posixpath.dirname(name), m.linkname))
                continue
            f = tin.extractfile(m) if m.isfile() else None
            if f is None:
                continue
            if name.endswith("/layer.tar"):
                known = record.get(name)
                if known is not None and known.digest in node_has and known.size == m.size:
                    _drain(f)  # the node has it: not even a spill file
                    seen[name] = known
                    continue
                path = spill / f"layer-{len(spilled)}.tar"
                with open(path, "wb") as sink:
                    digest = _copy_hashing(f, sink)
                seen[name] = Layer(digest, m.size)
                spilled[digest] = path
            elif name == "manifest.json":
                manifest = json.loads(f.read())
            elif name.endswith(".json") and "/" not in name:
                configs[name] = f.read()
    config, pairs = _manifest_layers(manifest, configs)
    layers: list[Layer] = []
    for name, diff_id in pairs:
        lay = seen.get(links.get(name, name))
        if lay is None or lay.digest != diff_id:
            raise DeltaMiss(f"layer {name}: expected {diff_id}, read {lay}")
        layers.append(lay)
        out.layers[name] = lay
    man, index = oci_documents(ref, config, layers)
    with tarfile.open(fileobj=dst, mode="w|", bufsize=CHUNK) as tout:
        tout.copybufsize = CHUNK  # type: ignore[attr-defined]  # real, not in typeshed
        _add(tout, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add(tout, "blobs/sha256/" + hashlib.sha256(config).hexdigest(), config)
        _add(tout, "blobs/sha256/" + hashlib.sha256(man).hexdigest(), man)
        sent: set[str] = set()
        for lay in layers:
            if lay.digest in node_has or lay.digest in sent:
                out.skipped += lay.size if lay.digest not in sent else 0
                continue
            _add(tout, "blobs/sha256/" + lay.digest.split(":", 1)[1],
                 path=spilled[lay.digest])
            sent.add(lay.digest)
            out.sent += lay.size
        _add(tout, "index.json", index)
    return out


def load_record(path: Path) -> dict[str, Layer]:
    try:
        raw = json.loads(path.read_text())
        return {k: Layer(v["digest"], int(v["size"])) for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def save_record(path: Path, record: Mapping[str, Layer]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: {"digest": v.digest, "size": v.size}
                               for k, v in sorted(record.items())}, indent=1))
    tmp.replace(path)
