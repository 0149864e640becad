"""Engine versions: parsing, ranges, and what each vLLM release put into its NIXL hash.

Data from vllm-nixl-rules.md §12 (the PyPI wheels 0.11–0.33 compared file by file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

Minor = tuple[int, int]

# Releases whose NIXL connector was read. Minors in between follow the range rules, but their
# connector version (a hash factor) is not known, so no hash is predicted for them.
NIXL_CONNECTOR_VERSION: dict[Minor, int | None] = {
    (0, 11): None,
    (0, 12): None,
    (0, 13): 2,
    (0, 14): 2,
    (0, 16): 2,
    (0, 18): 2,
    (0, 20): 2,
    (0, 22): 4,
    (0, 24): 4,
    (0, 26): 5,
    (0, 28): 7,
    (0, 30): 11,
    (0, 32): 14,
    (0, 33): 15,
}
OLDEST_KNOWN: Minor = (0, 11)
NEWEST_KNOWN: Minor = (0, 33)

_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?([.+-].*)?$")


@dataclass(frozen=True)
class EngineVersion:
    """A parsed engine version. `text` is what the engine reports as `__version__`."""

    text: str
    minor: Minor
    patch: int
    is_release: bool  # False for dev/rc/local builds such as 0.33.1.dev12+g1234

    @property
    def known(self) -> bool:
        return OLDEST_KNOWN <= self.minor <= NEWEST_KNOWN


@lru_cache(maxsize=1024)
def parse_version(text: str) -> EngineVersion | None:
    """Parse `0.33.0`, `v0.33.0` or `0.33.1.dev12+gabc`; None when it is not a version."""
    m = _VERSION_RE.match(text.strip())
    if not m:
        return None
    major, minor, patch, rest = int(m[1]), int(m[2]), int(m[3] or 0), m[4] or ""
    canonical = f"{major}.{minor}.{patch}{rest}"
    return EngineVersion(canonical, (major, minor), patch, is_release=not rest)


def version_from_image(image: str) -> str | None:
    """The tag of an image reference when it looks like a version (`repo:v0.33.0` -> `0.33.0`).

    A digest-only reference (`repo@sha256:...`) or a non-version tag (`latest`) gives None.
    """
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    tag = last.split(":", 1)[1]
    parsed = parse_version(tag)
    return parsed.text if parsed else None


def known_version(text: str | None) -> EngineVersion | None:
    """The parsed version when it is one the rules know (0.11-0.33), else None."""
    parsed = parse_version(text) if text else None
    return parsed if parsed and parsed.known else None


@dataclass(frozen=True)
class VersionRange:
    """Inclusive range of minors; None on either end means open."""

    low: Minor | None = None
    high: Minor | None = None

    def contains(self, minor: Minor) -> bool:
        return (self.low is None or minor >= self.low) and (self.high is None or minor <= self.high)

    def __str__(self) -> str:
        def fmt(m: Minor | None) -> str:
            return f"{m[0]}.{m[1]}" if m else ""

        if self.low is None and self.high is None:
            return "all"
        if self.low == self.high:
            return fmt(self.low)
        if self.high is None:
            return f">= {fmt(self.low)}"
        if self.low is None:
            return f"<= {fmt(self.high)}"
        return f"{fmt(self.low)}-{fmt(self.high)}"


ANY = VersionRange()


def since(major: int, minor: int) -> VersionRange:
    return VersionRange((major, minor), None)


def until(major: int, minor: int) -> VersionRange:
    return VersionRange(None, (major, minor))


def between(low: Minor, high: Minor) -> VersionRange:
    return VersionRange(low, high)
