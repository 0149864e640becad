"""The side channel's messages and errors (pure: msgspec, no sockets, no torch).

Every message is a msgspec `Struct` with a `type` tag; each direction decodes into its own union,
so a message the other side may not send is refused by the decoder itself. Unknown fields are
refused too: a change to any message is a new `PROTOCOL_VERSION`, checked at the handshake.

    server -> client   Challenge, Welcome, MetaReply, PrepareReply, PatternReply, ErrorReply
    client -> server   Hello, MetaRequest, PrepareRequest, PatternRequest

PatternRequest / PatternReply are the KV path check (selftest.py: a known pattern pulled from a
live prefill engine). They are new message types, not changes to existing ones: a prefill side
from before them answers `malformed`, which the checker reports as a refusal.

Every error this side channel raises is a `HandshakeError`; what a peer sent wrong is a
`ProtocolError`. Each carries the `code` its `ErrorReply` uses, so a refusal reaches the other
side as a typed reply and comes back out as the same named exception.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgspec

from .kvcache import RankSpec

# 1 was the untyped dict protocol (no version on the wire, server-chosen nonce only); 2 sent
# PREPARE's block tables as lists of ints (one Python int per block on each side, each pull)
PROTOCOL_VERSION = 3
NONCE_BYTES = 16

Nonce = Annotated[bytes, msgspec.Meta(min_length=NONCE_BYTES, max_length=NONCE_BYTES)]
ReqId = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^:,]+$")]
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
Address = Annotated[int, msgspec.Meta(ge=0)]  # a host or device address (unsigned 64-bit)
Seconds = Annotated[float, msgspec.Meta(ge=0)]
MAX_PATTERN_BYTES = 64 << 20  # the most a KV path check may ask a prefill engine to stage
PatternBytes = Annotated[int, msgspec.Meta(ge=1, le=MAX_PATTERN_BYTES)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=(1 << 62) - 1)]


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class Challenge(_Msg, tag="challenge", frozen=True):
    """Server's first frame (unauthenticated): its protocol version and its half of the nonces."""

    version: int
    nonce: Nonce


class Hello(_Msg, tag="hello", frozen=True):
    """Client's first frame: its version and its nonce, authenticated under the session key."""

    version: int
    nonce: Nonce


class Welcome(_Msg, tag="welcome", frozen=True):
    """Server's proof that it holds the token (authenticated under the session key)."""

    idle_timeout_s: Seconds  # the server closes a connection idle this long
    lifetime_s: Seconds  # ... and any connection this old, between requests


class MetaRequest(_Msg, tag="meta", frozen=True):
    """Decode rank -> prefill rank: compatibility hash first, then its geometry and NIXL agent."""

    hash: str
    factors: dict[str, Any]
    spec: RankSpec
    agent_meta: bytes


class StagingRegion(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    addr: Address
    nbytes: Count
    dev: Count


class MetaReply(_Msg, tag="meta-reply", frozen=True):
    hash: str
    factors: dict[str, Any]
    spec: RankSpec
    agent_name: str
    agent_meta: bytes
    staging: StagingRegion
    lease_s: Seconds


# a block table as little-endian int64 bytes: packed and compared in C, not one Python int per
# block; the prefill side only compares them with its own (it never reads a peer's block ids)
PackedTable = Annotated[bytes, msgspec.Meta(max_length=8 << 20)]
Group = Annotated[int, msgspec.Meta(ge=0, le=255)]


class WireRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A request's token count and block table per KV-cache group, as the prefill side holds it."""

    num_tokens: Count
    block_tables: dict[Group, PackedTable]


class PrepareRequest(_Msg, tag="prepare", frozen=True):
    """Gather `req_id` into a staging slot for the decode rank of this connection."""

    req_id: ReqId
    num_tokens: Count
    p_req: WireRequest


class PrepareReply(_Msg, tag="prepare-reply", frozen=True):
    addr: Address
    nbytes: Count
    dev: Count
    lease_s: Seconds
    gather_segments: Count = 0
    plan_s: Seconds = 0.0
    gather_s: Seconds = 0.0


class PatternRequest(_Msg, tag="pattern", frozen=True):
    """Stage `nbytes` of the pattern `seed` names in a staging slot for the decode rank of this
    connection (after meta), held under the lease `req_id` like a request's KV: the READ's
    notification, or the lease's expiry, frees it."""

    req_id: ReqId
    nbytes: PatternBytes
    seed: Seed


class PatternReply(_Msg, tag="pattern-reply", frozen=True):
    addr: Address
    nbytes: Count
    dev: Count
    lease_s: Seconds


class ErrorReply(_Msg, tag="error", frozen=True):
    """A refusal. `code` names the exception the receiver raises (see `error_from_reply`)."""

    code: str
    message: str
    differing: list[str] = []  # hash: the factors that differ
    decode_hash: str = ""
    prefill_hash: str = ""
    version: int = 0  # version: the sender's protocol version


ClientMessage = Hello | MetaRequest | PrepareRequest | PatternRequest
ServerMessage = Challenge | Welcome | MetaReply | PrepareReply | PatternReply | ErrorReply


# ------------------------------------------------------------------------------------------------
# errors


class HandshakeError(RuntimeError):
    """Anything the side channel raises."""

    code: ClassVar[str] = "handshake"


class TokenError(HandshakeError):
    """No usable token at start: missing, or empty."""

    code = "token"


class AuthError(HandshakeError):
    """A frame failed authentication: wrong token, a replayed or reflected frame."""

    code = "auth"


class ChannelClosed(HandshakeError):
    code = "closed"


class ChannelTimeout(HandshakeError):
    code = "timeout"


class ChannelBusy(HandshakeError):
    code = "busy"


class NotConnected(HandshakeError):
    code = "not-connected"


class ProtocolError(HandshakeError):
    """The peer sent something this side does not accept."""

    code = "protocol"


class VersionMismatch(ProtocolError):
    code = "version"

    def __init__(self, local: int, remote: int, who: str = "peer"):
        self.local, self.remote = local, remote
        super().__init__(f"side-channel protocol version mismatch: this side speaks {local}, "
                         f"the {who} speaks {remote}; run one pd-runtime release on both pools")


class FrameTooLarge(ProtocolError):
    code = "frame-too-large"


class MalformedMessage(ProtocolError):
    code = "malformed"


class UnexpectedMessage(ProtocolError):
    code = "unexpected"


class HashMismatch(HandshakeError):
    code = "hash"

    def __init__(self, differing: list[str], decode_hash: str, prefill_hash: str):
        self.differing, self.decode_hash, self.prefill_hash = differing, decode_hash, prefill_hash
        super().__init__(
            f"compatibility hash mismatch (decode {decode_hash[:12]}, "
            f"prefill {prefill_hash[:12]}); differing factors: {', '.join(differing) or 'unknown'}"
        )


class PeerError(HandshakeError):
    """The peer refused a request for a reason of its own (`code`: lease, plan, internal, ...)."""

    def __init__(self, code: str, message: str):
        self.code = code  # type: ignore[misc]  # per instance: whatever the peer answered
        super().__init__(f"prefill refused ({code}): {message}")


class Refusal(HandshakeError):
    """Raised by a request handler to refuse with a code of its own (lease, plan, ...); the
    peer receives it as a PeerError with the same code."""

    def __init__(self, code: str, message: str):
        self.code = code  # type: ignore[misc]  # per instance
        super().__init__(message)


_BY_CODE: dict[str, type[HandshakeError]] = {
    c.code: c for c in (AuthError, ChannelTimeout, ChannelBusy, FrameTooLarge, MalformedMessage,
                        UnexpectedMessage)
}


def error_reply(e: HandshakeError) -> ErrorReply:
    if isinstance(e, HashMismatch):
        return ErrorReply(e.code, str(e), list(e.differing), e.decode_hash, e.prefill_hash)
    return ErrorReply(e.code, str(e), version=PROTOCOL_VERSION)


def error_from_reply(r: ErrorReply, authentic: bool = True) -> HandshakeError:
    """The exception a received `ErrorReply` stands for. An unauthenticated one (sent before or
    instead of authentication) can only be a refusal: anything else is reported as such."""
    if r.code == "hash" and authentic:
        return HashMismatch(r.differing, r.decode_hash, r.prefill_hash)
    if r.code == "version":
        return VersionMismatch(PROTOCOL_VERSION, r.version, "prefill")
    cls = _BY_CODE.get(r.code)
    if cls is not None:
        return cls(f"prefill refused: {r.message}")
    if not authentic:
        return AuthError(f"unauthenticated refusal from the prefill side ({r.code}): {r.message}")
    return PeerError(r.code, r.message)
