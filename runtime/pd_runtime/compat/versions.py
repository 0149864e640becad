"""Engine versions: parsing, ranges, and what each vLLM release put into its NIXL hash.

Data from vllm-nixl-rules.md §12 and vllm-known-bugs.md §2 (the PyPI wheels 0.11–0.33 compared
file by file; 0.25, 0.27, 0.29 and 0.31 re-read from their wheels' nixl/metadata.py).
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
    (0, 25): 4,
    (0, 26): 5,
    (0, 27): 5,
    (0, 28): 7,
    (0, 29): 9,
    (0, 30): 11,
    (0, 31): 13,
    (0, 32): 14,
    (0, 33): 15,  # v14: PLE page length; v15: remote_registration_generation
}
# The oldest NIXL release each vLLM minor accepts (`check_nixl_version` at connector start-up);
# minors not listed do not check. 0.33 moved to strided descriptors (nixl PR #1978).
NIXL_REQUIRED: dict[Minor, str] = {
    (0, 33): "1.5.0",
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


def fmt_minor(minor: Minor) -> str:
    return f"{minor[0]}.{minor[1]}"


KNOWN_SPAN = f"{fmt_minor(OLDEST_KNOWN)}-{fmt_minor(NEWEST_KNOWN)}"


@dataclass(frozen=True)
class RulesMinor:
    """Which release's rules judge a version: its own when known, else the nearest known one."""

    minor: Minor
    position: str  # "known" | "older" (below the oldest known) | "newer" | "missing"

    @property
    def label(self) -> str:
        base = f"vllm {fmt_minor(self.minor)}"
        if self.position == "older":
            return base + " (oldest known; the version is older)"
        if self.position == "newer":
            return base + " (newest known; the version is newer)"
        if self.position == "missing":
            return base + " (newest; version unknown)"
        return base


def rules_minor(text: str | None) -> RulesMinor:
    """The minor whose rules apply to engine version `text`.

    A version older than the oldest known gets the oldest rules (they are the strictest about
    what old releases lack), a newer one the newest; no version at all gets the newest.
    """
    parsed = parse_version(text) if text else None
    if parsed is None:
        return RulesMinor(NEWEST_KNOWN, "missing")
    if parsed.minor < OLDEST_KNOWN:
        return RulesMinor(OLDEST_KNOWN, "older")
    if parsed.minor > NEWEST_KNOWN:
        return RulesMinor(NEWEST_KNOWN, "newer")
    return RulesMinor(parsed.minor, "known")


def image_version_conflict(image: str, version: str | None) -> str | None:
    """The image tag's version when an explicit `version` names another release, else None.

    Releases are compared as major.minor.patch, so `v0.33.0-cu130` agrees with `0.33.0`; a tag
    that is no version (`latest`, a digest) never conflicts.
    """
    tagged = version_from_image(image)
    if tagged is None or version is None:
        return None
    a, b = parse_version(tagged), parse_version(version)
    if a is None or b is None:
        return None
    return tagged if (a.minor, a.patch) != (b.minor, b.patch) else None


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
