"""Causal contexts as sealed tokens: a client can carry one back, never make one up.

Theory of operation
-------------------
A write with a context supersedes every sibling whose dot the context's version vector covers
(``versions.update``): the context is the client's claim "I have seen all of this".  A claim
nobody checks lets one request erase other clients' acknowledged writes, either by naming
counters that were never issued (``[[n1, 10**9]]`` covers every dot n1 will ever issue) or by
carrying the context of another key, whose counters on a shared coordinator cover this key's
dots.  Riak takes a client's vector clock as given; kvstore does not.

So a context is a token the cluster issues and only the cluster can issue:

    base64url( version (1 byte) || tag (16 bytes) || encode_vector(vector) )
    tag = BLAKE2b-128, keyed with a key derived from the cluster secret,
          over ( len(key) as 4 bytes || key as UTF-8 || encode_vector(vector) )

A node issues a token only for the clock of an object it holds or has just merged for that
key, so every dot a verified token covers was really issued for this key, and the holder of
the token was shown (or, for a write's answer, was told the count of: ``X-Siblings``) the
values those dots name.  ``verify`` accepts a token only for the key it was issued for
(the key is inside the tag), compares tags in constant time, and tells two failures apart:

* ``InvalidContext``: the text is not base64url or exceeds ``MAX_CONTEXT_TEXT_BYTES``
  (a syntax error, HTTP 400 ``invalid_context``);
* ``BadContext``: well-formed text, but not a token this cluster issued for this key:
  forged, tampered, truncated, of another key, signed with another secret, or of another
  format version (HTTP 400 ``bad_context``).

BLAKE2b in keyed mode is a MAC by design (RFC 7693), so no HMAC construction is needed;
the derived key and the personalisation strings keep this use of the cluster secret apart
from any other.  The vector is authenticated, not hidden: a client may decode it, but any
change to it is refused.

Not handled here: secret rotation (changing the cluster secret makes every outstanding
context ``bad_context``; clients must read again), and the life of a key: a token stays
valid forever, so a context kept across the reaping of the key's tombstone still verifies.
The coordinator refuses such a context for the counters it issues itself
(``refuse_unissued``, called by ``node.py`` under the key's lock).

Pure and deterministic: no clock, no randomness, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping

from kvstore.protocol.versions import InvalidContext, VersionVector, decode_vector, encode_vector

__all__ = [
    "MAC_BYTES",
    "MAX_CONTEXT_TEXT_BYTES",
    "TOKEN_VERSION",
    "BadContext",
    "ContextSigner",
    "InvalidContext",
    "refuse_unissued",
]

TOKEN_VERSION = 1
MAC_BYTES = 16
# Far above the token of any real clock (about 20 bytes per actor), far below what a header
# parser would buffer; checked before any decoding.
MAX_CONTEXT_TEXT_BYTES = 16 * 1024

_KEY_PERSON = b"kvstore/ctx-key"  # BLAKE2b personalisation: at most 16 bytes
_MAC_PERSON = b"kvstore/ctx-v1"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class BadContext(ValueError):
    """Well-formed context text that this cluster did not issue for this key."""


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class ContextSigner:
    """Issues and verifies the causal contexts of one cluster (one secret)."""

    __slots__ = ("_mac_key",)

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode("utf-8") if isinstance(secret, str) else secret
        assert raw, "the cluster secret is validated non-empty by the config"
        # Derived rather than used as is: BLAKE2b keys are at most 64 bytes, and the secret
        # also authenticates peers; a separate key keeps the two uses independent.
        self._mac_key = hashlib.blake2b(raw, digest_size=32, person=_KEY_PERSON).digest()

    def _tag(self, key: str, payload: bytes) -> bytes:
        key_bytes = key.encode("utf-8")
        mac = hashlib.blake2b(digest_size=MAC_BYTES, key=self._mac_key, person=_MAC_PERSON)
        mac.update(len(key_bytes).to_bytes(4, "big"))  # length first: (key, payload) splits one way only
        mac.update(key_bytes)
        mac.update(payload)
        return mac.digest()

    def sign(self, key: str, vector: Mapping[str, int]) -> str:
        """The context of ``vector`` for ``key``: pass only a clock this node holds for the key."""
        payload = encode_vector(vector)
        return _b64url(bytes([TOKEN_VERSION]) + self._tag(key, payload) + payload)

    def verify(self, key: str, text: str | None) -> VersionVector:
        """The vector of a context issued for ``key``; {} when there is none.

        Raises ``InvalidContext`` (not base64url, too large) or ``BadContext`` (not issued for
        this key by this cluster).
        """
        if not text:
            return {}
        if len(text) > MAX_CONTEXT_TEXT_BYTES:
            raise InvalidContext(f"the context exceeds {MAX_CONTEXT_TEXT_BYTES} characters")
        if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
            raise InvalidContext("the context is not base64url text")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            raise InvalidContext("the context is not base64url text") from None
        if len(raw) < 1 + MAC_BYTES or raw[0] != TOKEN_VERSION:
            raise BadContext("the context was not issued by this cluster: pass back a context a read returned")
        tag, payload = raw[1 : 1 + MAC_BYTES], raw[1 + MAC_BYTES :]
        if not hmac.compare_digest(tag, self._tag(key, payload)):
            raise BadContext(
                "the context was not issued for this key by this cluster (altered, or read from another key)"
            )
        # Issued by a node, so well-formed; decode_vector still checks (a node of another version).
        return decode_vector(payload)


def refuse_unissued(context: Mapping[str, int], actor: str, stored: Mapping[str, int]) -> None:
    """Raise ``BadContext`` if ``context`` claims more of ``actor``'s dots than ``stored`` shows.

    For the coordinating primary, ``actor`` is itself and ``stored`` its own clock of the key:
    a primary stores every dot it issues for a key before any replica sees it (durably, or
    under a per-process actor id), so its entry there is exactly the count it issued.  A
    verified context can claim more only when it was read in an earlier life of the key,
    before the key's tombstone was reaped and the counters started again; it would cover,
    and so supersede, writes of the new life that its holder never saw.  Entries of other
    actors cannot be checked this way: the coordinator may simply not have received them yet.
    """
    claimed, issued = context.get(actor, 0), stored.get(actor, 0)
    if claimed > issued:
        raise BadContext(
            f"the context claims {claimed} writes of {actor} to this key, which issued {issued}: "
            "it was read before the key was deleted and its history reaped; read the key again"
        )
