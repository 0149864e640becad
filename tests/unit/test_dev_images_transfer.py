"""pd_dev.images.transfer: a docker-save stream into the node, full or only the new layers,
on synthetic archives shaped like docker 20.10's `docker save`."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from pd_dev.images import transfer

LAYERS = [b"base layer " * 1000, b"torch layer " * 5000, b"sources v1"]


def _digest(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _save_archive(layers: list[bytes], link_last_to_first: bool = False) -> bytes:
    """A docker-save archive: <v1id>/layer.tar per layer, <id>.json config, manifest.json."""
    config = json.dumps({"rootfs": {"type": "layers",
                                    "diff_ids": [_digest(b) for b in layers]}}).encode()
    cfg_name = hashlib.sha256(config).hexdigest() + ".json"
    names = [f"{hashlib.sha256(b'v1' + bytes([i])).hexdigest()}/layer.tar"
             for i in range(len(layers))]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))

        add(cfg_name, config)
        for i, (name, data) in enumerate(zip(names, layers, strict=True)):
            d = tarfile.TarInfo(name.split("/")[0])
            d.type = tarfile.DIRTYPE
            t.addfile(d)
            if link_last_to_first and i == len(layers) - 1:
                link = tarfile.TarInfo(name)
                link.type = tarfile.SYMTYPE
                link.linkname = f"../{names[0]}"
                t.addfile(link)
            else:
                add(name, data)
        add("manifest.json", json.dumps([{"Config": cfg_name, "RepoTags": ["img:1"],
                                          "Layers": names}]).encode())
    return buf.getvalue()


def _members(data: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t:
            if m.isfile():
                f = t.extractfile(m)
                out[m.name] = f.read() if f else b""
    return out


def test_passthrough_copies_and_records() -> None:
    src = _save_archive(LAYERS)
    dst = io.BytesIO()
    done = transfer.passthrough(io.BytesIO(src), dst)
    assert _members(dst.getvalue()) == _members(src)
    assert sorted(lay.digest for lay in done.layers.values()) == sorted(map(_digest, LAYERS))
    assert {lay.size for lay in done.layers.values()} == {len(b) for b in LAYERS}
    assert done.sent == sum(map(len, LAYERS))


def test_delta_sends_only_what_the_node_lacks(tmp_path: Path) -> None:
    record = transfer.passthrough(io.BytesIO(_save_archive(LAYERS)), io.BytesIO()).layers
    new = [*LAYERS[:2], b"sources v2"]
    dst = io.BytesIO()
    done = transfer.delta(io.BytesIO(_save_archive(new)), dst, "ghcr.io/x/y:1", record,
                          {_digest(LAYERS[0]), _digest(LAYERS[1])}, tmp_path / "spill")
    out = _members(dst.getvalue())
    blobs = {k for k in out if k.startswith("blobs/sha256/")}
    index = json.loads(out["index.json"])
    man_digest = index["manifests"][0]["digest"]
    assert index["manifests"][0]["annotations"][transfer.IMAGE_NAME_ANNOTATION] == "ghcr.io/x/y:1"
    manifest = json.loads(out["blobs/sha256/" + man_digest.split(":")[1]])
    assert [lay["digest"] for lay in manifest["layers"]] == [_digest(b) for b in new]
    assert [lay["size"] for lay in manifest["layers"]] == [len(b) for b in new]
    config = out["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]]
    assert json.loads(config)["rootfs"]["diff_ids"] == [_digest(b) for b in new]
    # the config, the manifest and the one new layer; not the two the node has
    assert blobs == {"blobs/sha256/" + d.split(":")[1] for d in
                     (manifest["config"]["digest"], man_digest, _digest(b"sources v2"))}
    assert out["blobs/sha256/" + _digest(b"sources v2").split(":")[1]] == b"sources v2"
    assert json.loads(out["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    assert done.sent == len(b"sources v2")
    assert done.skipped == len(LAYERS[0]) + len(LAYERS[1])


def test_delta_without_a_record_hashes_every_layer(tmp_path: Path) -> None:
    dst = io.BytesIO()
    done = transfer.delta(io.BytesIO(_save_archive(LAYERS)), dst, "i:1", {},
                          {_digest(LAYERS[1])}, tmp_path / "spill")
    assert done.sent == len(LAYERS[0]) + len(LAYERS[2])
    assert ("blobs/sha256/" + _digest(LAYERS[1]).split(":")[1]) not in _members(dst.getvalue())


def test_delta_follows_linked_layers(tmp_path: Path) -> None:
    layers = [LAYERS[0], LAYERS[1], LAYERS[0]]
    dst = io.BytesIO()
    transfer.delta(io.BytesIO(_save_archive(layers, link_last_to_first=True)), dst, "i:1", {},
                   set(), tmp_path / "spill")
    index = json.loads(_members(dst.getvalue())["index.json"])
    assert index["manifests"][0]["annotations"][transfer.IMAGE_NAME_ANNOTATION] == "i:1"


def test_a_wrong_record_is_caught_not_imported(tmp_path: Path) -> None:
    record = transfer.passthrough(io.BytesIO(_save_archive(LAYERS)), io.BytesIO()).layers
    # same names and sizes, other bytes: the record's digest no longer matches the config
    changed = [LAYERS[0], b"torch LAYER " * 5000, LAYERS[2]]
    with pytest.raises(transfer.DeltaMiss, match="expected"):
        transfer.delta(io.BytesIO(_save_archive(changed)), io.BytesIO(), "i:1", record,
                       set(map(_digest, LAYERS)), tmp_path / "spill")


def test_record_round_trip(tmp_path: Path) -> None:
    rec = {"a/layer.tar": transfer.Layer("sha256:" + "0" * 64, 3)}
    transfer.save_record(tmp_path / "r.json", rec)
    assert transfer.load_record(tmp_path / "r.json") == rec
    (tmp_path / "bad.json").write_text("{not json")
    assert transfer.load_record(tmp_path / "bad.json") == {}
    assert transfer.load_record(tmp_path / "missing.json") == {}
