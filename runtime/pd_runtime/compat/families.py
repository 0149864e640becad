"""The model families the API knows, in one place: the CRD enum, the rules and the matrix read
them from here."""

from __future__ import annotations

from typing import Literal, get_args

# The order is the CRD enum's (spec.model.family); the matrix keeps the upstream page's row order.
Family = Literal[
    "dense", "moe", "mla", "sparse-mla", "hybrid-ssm", "multimodal", "encoder-decoder"
]
FAMILIES: tuple[str, ...] = get_args(Family)
MLA_FAMILIES = frozenset({"mla", "sparse-mla"})
SSM_FAMILIES = frozenset({"hybrid-ssm"})
# Families with per-head KV (not MLA's replicated latent, not SSM state).
PER_HEAD_KV_FAMILIES = frozenset(FAMILIES) - MLA_FAMILIES - SSM_FAMILIES
