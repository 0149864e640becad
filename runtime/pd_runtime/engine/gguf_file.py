"""A GGUF file's metadata and tensor directory, read straight from the bytes.

The `gguf` package's GGUFReader builds a numpy view per metadata value; for a 49k-token
vocabulary (two string arrays of ~50k entries) that takes seconds, on every server start. The
format is simple (llama.cpp's docs/gguf.md), so we parse the header with `struct` and map the
tensor data with one `np.memmap`; `gguf` still does the dequantization.

Layout (little endian): magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 metadata
count, the metadata (key string, u32 type, value), the tensor infos (name, u32 n_dims, u64 dims
innermost first, u32 ggml type, u64 offset), padding to `general.alignment`, the tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# GGUFValueType -> struct format of a scalar
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4


class GGUFError(ValueError):
    """A GGUF file that cannot be read or turned into a faithful checkpoint; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first)
    ggml_type: int  # gguf.GGMLQuantizationType value
    data: np.ndarray  # uint8, the stored bytes, shape (*shape[:-1], bytes per row)


@dataclass(frozen=True)
class GGUFFile:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, buf: bytes | memoryview, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise GGUFError(f"{self.path}: truncated at byte {self.pos}") from e
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.unpack("<Q")
        raw = bytes(self.buf[self.pos : self.pos + size])
        if len(raw) != size:
            raise GGUFError(f"{self.path}: truncated string at byte {self.pos}")
        self.pos += size
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: invalid UTF-8 at byte {self.pos - size}") from e

    def value(self, vtype: int) -> Any:
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in SCALARS:  # one struct call for the whole array
                fmt = f"<{count}{SCALARS[item_type][1]}"
                items = struct.unpack_from(fmt, self.buf, self.pos) if count else ()
                self.pos += struct.calcsize(fmt)
                return list(items)
            return [self.value(item_type) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype} at byte {self.pos}")


def read_gguf(path: str) -> GGUFFile:
    """Parse the header; tensor data stays memory-mapped (read-only) until used."""
    import gguf

    try:
        # a plain ndarray view of the mapping: slicing a np.memmap costs a Python hook per slice
        mapped = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    except (OSError, ValueError) as e:
        raise GGUFError(f"{path}: cannot map the file: {e}") from e
    cur = _Cursor(memoryview(mapped), path)  # type: ignore[arg-type]
    if bytes(mapped[:4]) != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {bytes(mapped[:4])!r})")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2, 3; "
                              "big-endian files are not supported)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > MAX_DIMS:
            raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, tuple(reversed(dims)), cur.unpack("<I"), cur.unpack("<Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    start = -(-cur.pos // alignment) * alignment
    tensors = [_tensor(mapped, start, info, gguf, path) for info in infos]
    return GGUFFile(version, metadata, tensors)


def _tensor(mapped: np.ndarray, start: int, info: tuple, gguf: Any, path: str) -> TensorInfo:
    name, shape, type_id, offset = info
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError) as e:
        raise GGUFError(f"{path}: tensor {name} has unknown ggml type {type_id}") from e
    if not shape or shape[-1] % block:
        raise GGUFError(f"{path}: tensor {name} shape {shape} is not whole {qtype.name} "
                              f"blocks of {block}")
    row_bytes = shape[-1] // block * block_bytes
    size = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
    begin = start + offset
    if begin + size > mapped.size:
        raise GGUFError(f"{path}: tensor {name} runs past the end of the file")
    data = mapped[begin : begin + size].reshape(*shape[:-1], row_bytes)
    return TensorInfo(name, shape, type_id, data)


def is_gguf(path: str | Path) -> bool:
    """Whether the file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
