"""The upstream NixlConnector compatibility matrix as version-aware data.

Rows are model families, columns are capabilities, and each cell is a list of version spans with
a status, footnote numbers and the ids of the rules that enforce it. Rendering the spans at the
version the upstream page describes reproduces that page's table (tests/unit/test_matrix.py
compares it cell by cell); `pdctl explain` and docs/compatibility.md render other versions.
"""

from __future__ import annotations

from dataclasses import dataclass

from .versions import ANY, VersionRange, between, since, until

# The page (2026-03-31) matches vLLM 0.18: Mamba needs equal TP (hetero TP came in 0.20), HMA
# forbids hetero block sizes (lifted in 0.28), and the cross-layer flag exists (0.16-0.28).
PAGE_VERSION = (0, 18)

SUPPORTED, PARTIAL, UNSUPPORTED, UNKNOWN, WIP = "✅", "🟠", "❌", "❔", "🚧"
LEGEND = {
    SUPPORTED: "fully supported",
    PARTIAL: "partial support (see the note)",
    UNSUPPORTED: "not supported (rejected)",
    UNKNOWN: "unknown / not validated upstream (warning)",
    WIP: "work in progress upstream (rejected)",
}

# Row titles, in the upstream page's row order (every family has a row).
FAMILY_TITLES = {
    "dense": "Dense Transformers",
    "mla": "MLA (e.g. DeepSeek-V2/V3)",
    "sparse-mla": "Sparse MLA (e.g. DeepSeek-V3.2)",
    "hybrid-ssm": "Hybrid SSM / Mamba",
    "moe": "MoE",
    "multimodal": "Multimodal",
    "encoder-decoder": "Encoder-Decoder",
}
FAMILIES = tuple(FAMILY_TITLES)  # the rows, in page order (the same set as families.FAMILIES)
CAPABILITIES = ("basic", "spec_decode", "hetero_tp", "cross_layer", "swa", "host_buffer",
                "hetero_block")
CAPABILITY_TITLES = {
    "basic": "Basic PD",
    "spec_decode": "Spec Decode",
    "hetero_tp": "Hetero TP",
    "cross_layer": "Cross-layer blocks",
    "swa": "SWA",
    "host_buffer": "Host buffer",
    "hetero_block": "Hetero block size",
}

# Footnotes 1-6 carry the upstream page's numbering; 7+ are ours, for other versions.
NOTES = {
    1: "Prefill and decode must use the same speculation configuration (SPEC-MATCH).",
    2: "Needs the FLASH_ATTN or FLASHINFER backend and the HND layout, enabled through "
       "kvTransfer.enableCrossLayersBlocks (CROSS-LAYER-MATCH, CROSS-LAYER-REQUIREMENTS).",
    3: "Only when the hybrid KV cache manager is not required (no SWA, no Mamba); block ids are "
       "remapped; the prefill block size must divide the decode block size (BLOCK-DIVISIBLE, "
       "BLOCK-HMA).",
    4: "MLA's latent KV is replicated on every TP rank: no head splitting; with prefill TP above "
       "decode TP one read is made and the redundant ranks are only notified.",
    5: "Mamba layers need equal TP on both pools (SSM-HETERO-TP).",
    6: "The hybrid KV cache manager, which hybrid models need, does not support different block "
       "sizes (BLOCK-HMA).",
    7: "Up to 0.13 decode TP must be at least prefill TP (TP-PREFILL-GT-DECODE).",
    8: "From 0.20 Mamba state is moved by a 3-read transfer in both TP directions; "
       "VLLM_SSM_CONV_STATE_LAYOUT=DS is required on both pools (SSM-CONV-LAYOUT).",
    9: "From 0.28 block sizes may differ per KV-cache group when the decode block is a multiple "
       "of the prefill block; prefix caching needs equal sizes (SSM-PREFIX-BLOCKS).",
    10: "The flag was removed in 0.30; packed (BL*) layouts replace it and are not configured "
        "by pd-operator (CROSS-LAYER-REMOVED).",
    11: "Not available before 0.16 (CROSS-LAYER-UNAVAILABLE).",
    12: "Up to 0.16 NIXL lacks hybrid KV cache manager support, so hybrid models cannot run "
        "P/D at all (SSM-UNSUPPORTED).",
}


@dataclass(frozen=True)
class Span:
    versions: VersionRange
    status: str
    notes: tuple[int, ...] = ()
    rules: tuple[str, ...] = ()


def _all(status: str, notes: tuple[int, ...] = (), rules: tuple[str, ...] = ()) -> list[Span]:
    return [Span(ANY, status, notes, rules)]


def _standard_row(hetero_tp: list[Span]) -> dict[str, list[Span]]:
    """Dense, MoE and the MLA families share everything but the hetero-TP cell."""
    return {
        "basic": _all(SUPPORTED),
        "spec_decode": _all(SUPPORTED, (1,), ("SPEC-MATCH",)),
        "hetero_tp": hetero_tp,
        "cross_layer": [
            Span(until(0, 15), UNSUPPORTED, (11,), ("CROSS-LAYER-UNAVAILABLE",)),
            Span(between((0, 16), (0, 28)), SUPPORTED, (2,),
                 ("CROSS-LAYER-MATCH", "CROSS-LAYER-REQUIREMENTS")),
            Span(since(0, 29), PARTIAL, (10,), ("CROSS-LAYER-REMOVED",)),
        ],
        "swa": _all(SUPPORTED),
        "host_buffer": _all(SUPPORTED, (), ("BLOCK-HOST-BUFFER",)),
        "hetero_block": _all(PARTIAL, (3,), ("BLOCK-DIVISIBLE", "BLOCK-HMA", "BLOCK-HETERO")),
    }


_DENSE_TP = [
    Span(until(0, 13), PARTIAL, (7,), ("TP-PREFILL-GT-DECODE", "TP-DIVISIBLE")),
    Span(since(0, 14), SUPPORTED, (), ("TP-DIVISIBLE", "TP-EXCEEDS-KV-HEADS", "HETERO-TP-LAYOUT")),
]
_MLA_TP = [
    Span(until(0, 13), PARTIAL, (4, 7), ("TP-PREFILL-GT-DECODE", "TP-DIVISIBLE")),
    Span(since(0, 14), PARTIAL, (4,), ("TP-DIVISIBLE",)),
]

MATRIX: dict[str, dict[str, list[Span]]] = {
    "dense": _standard_row(_DENSE_TP),
    "mla": _standard_row(_MLA_TP),
    "sparse-mla": _standard_row(_MLA_TP),
    "hybrid-ssm": {
        "basic": [Span(until(0, 16), UNSUPPORTED, (12,), ("SSM-UNSUPPORTED",)),
                  Span(since(0, 17), SUPPORTED)],
        "spec_decode": _all(UNKNOWN, (), ("SSM-SPEC-UNVALIDATED",)),
        "hetero_tp": [Span(until(0, 18), WIP, (5,), ("SSM-HETERO-TP",)),
                      Span(since(0, 19), SUPPORTED, (8,), ("SSM-CONV-LAYOUT", "TP-DIVISIBLE"))],
        "cross_layer": [Span(until(0, 28), UNSUPPORTED, (),
                               ("CROSS-LAYER-SSM", "CROSS-LAYER-UNAVAILABLE")),
                        Span(since(0, 29), UNSUPPORTED, (10,), ("CROSS-LAYER-REMOVED",))],
        "swa": _all(SUPPORTED),
        "host_buffer": _all(SUPPORTED, (), ("BLOCK-HOST-BUFFER",)),
        "hetero_block": [Span(until(0, 26), UNSUPPORTED, (6,), ("BLOCK-HMA",)),
                         Span(since(0, 27), PARTIAL, (9,), ("BLOCK-DIVISIBLE",
                                                            "SSM-PREFIX-BLOCKS"))],
    },
    "moe": _standard_row(_DENSE_TP),
    "multimodal": {c: _all(UNKNOWN, (), ("MULTIMODAL-UNVALIDATED",)) for c in CAPABILITIES},
    "encoder-decoder": {c: _all(UNSUPPORTED, (), ("ENCDEC-UNSUPPORTED",)) for c in CAPABILITIES},
}


def cell(family: str, capability: str, minor: tuple[int, int]) -> Span:
    for span in MATRIX[family][capability]:
        if span.versions.contains(minor):
            return span
    raise KeyError(f"no matrix span for {family}/{capability} at {minor}")


def cell_text(span: Span) -> str:
    """A cell as the upstream page writes it: the symbol, then footnote numbers."""
    return span.status + "".join(f"<sup>{n}</sup>" for n in span.notes)


def render_markdown(minor: tuple[int, int]) -> str:
    """The matrix table at `minor`, in the upstream page's Markdown shape."""
    header = "| Model type | " + " | ".join(CAPABILITY_TITLES[c] for c in CAPABILITIES) + " |"
    lines = [header, "| - |" + " - |" * len(CAPABILITIES)]
    for fam in FAMILIES:
        cells = [cell_text(cell(fam, c, minor)) for c in CAPABILITIES]
        lines.append(f"| {FAMILY_TITLES[fam]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def used_notes(minor: tuple[int, int]) -> list[int]:
    return sorted({n for fam in FAMILIES for c in CAPABILITIES for n in cell(fam, c, minor).notes})
