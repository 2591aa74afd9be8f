"""Table tests for kvstore.protocol.causal_context: contexts only the cluster can issue, bound to one key (pure)."""

from __future__ import annotations

import base64
import random

import msgpack
import pytest

from kvstore.protocol.causal_context import (
    MAC_BYTES,
    MAX_CONTEXT_TEXT_BYTES,
    TOKEN_VERSION,
    BadContext,
    ContextSigner,
    InvalidContext,
    refuse_unissued,
)
from kvstore.protocol.versions import MAX_CONTEXT_COUNTER, MAX_CONTEXT_ENTRIES, encode_vector

SECRET = "cluster-secret-1"
SIGNER = ContextSigner(SECRET)
KEY = "user:42"
VECTOR = {"n1": 3, "n2": 1, "n3!ab12cd34.7": 1}


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def with_payload(token: str, payload: bytes) -> str:
    """``token``'s version byte and tag over a different vector payload."""
    raw = unb64url(token)
    return b64url(raw[: 1 + MAC_BYTES] + payload)


# --- round trip ---------------------------------------------------------------------------------

ROUND_TRIP = [
    ("empty vector", "k", {}),
    ("one entry", "k", {"n1": 1}),
    ("zero counters kept as given", "k", {"n1": 1, "n2": 7, "n3": 0}),
    ("any member names", "k", {"ключ": 3, "a:b,c": 4, "n1!inc.1": 9, "n2.ab12": 2}),
    ("largest counter", "k", {"n1": MAX_CONTEXT_COUNTER}),
    ("many entries", "k", {f"n1!i.{i}": i for i in range(300)}),
    ("unicode key", "ключ/🗝", {"n1": 2}),
    ("key with NUL-free control chars and spaces", "a b\tc\n", {"n1": 2}),
    ("1 KiB key", "k" * 1024, {"n1": 2}),
]


@pytest.mark.parametrize(("key", "vector"), [(k, v) for _, k, v in ROUND_TRIP], ids=[n for n, _, _ in ROUND_TRIP])
def test_round_trip(key: str, vector: dict[str, int]) -> None:
    token = SIGNER.sign(key, vector)
    assert isinstance(token, str) and token.isascii()
    assert not set(token) & set("=+/ \n")  # URL- and header-safe, unpadded
    assert SIGNER.verify(key, token) == vector
    assert SIGNER.sign(key, dict(reversed(vector.items()))) == token  # canonical: order-independent
    assert ContextSigner(SECRET).verify(key, token) == vector  # any node of the cluster verifies it


@pytest.mark.parametrize("text", [None, ""])
def test_no_context_is_the_empty_vector(text: str | None) -> None:
    assert SIGNER.verify(KEY, text) == {}


def test_the_token_layout_is_version_tag_payload() -> None:
    raw = unb64url(SIGNER.sign(KEY, VECTOR))
    assert raw[0] == TOKEN_VERSION
    assert raw[1 + MAC_BYTES :] == encode_vector(VECTOR)  # authenticated, not hidden


def test_different_keys_and_vectors_give_different_tags() -> None:
    tokens = {SIGNER.sign(k, v) for k in ("a", "b", "ab", "") for v in ({}, {"n1": 1}, {"n1": 2})}
    assert len(tokens) == 12


# --- refused: not issued for this key by this cluster (bad_context) ------------------------------

GENUINE = SIGNER.sign(KEY, VECTOR)
GENUINE_RAW = unb64url(GENUINE)


def _flip(raw: bytes, index: int) -> str:
    changed = bytearray(raw)
    changed[index] ^= 0x01
    return b64url(bytes(changed))


BAD = [
    # the issue's forgery: a bare vector claiming a counter never issued
    ("forged bare vector", KEY, b64url(msgpack.packb([["n1", 10**9]], use_bin_type=True))),
    ("forged bare empty vector", KEY, b64url(msgpack.packb([], use_bin_type=True))),
    ("tampered counter", KEY, with_payload(GENUINE, encode_vector({**VECTOR, "n1": 10**9}))),
    ("added entry", KEY, with_payload(GENUINE, encode_vector({**VECTOR, "n4": 1}))),
    ("removed entry", KEY, with_payload(GENUINE, encode_vector({"n1": 3, "n2": 1}))),
    ("lowered counter", KEY, with_payload(GENUINE, encode_vector({**VECTOR, "n1": 1}))),
    ("flipped tag bit", KEY, _flip(GENUINE_RAW, 1)),
    ("flipped last tag bit", KEY, _flip(GENUINE_RAW, MAC_BYTES)),
    ("flipped payload bit", KEY, _flip(GENUINE_RAW, len(GENUINE_RAW) - 1)),
    ("other version", KEY, _flip(GENUINE_RAW, 0)),
    ("other key", "user:43", GENUINE),
    ("key prefix", "user:4", GENUINE),
    ("key extension", "user:420", GENUINE),
    ("key case", "USER:42", GENUINE),
    ("wrong secret", KEY, ContextSigner("another-secret").sign(KEY, VECTOR)),
    ("secret differing in one char", KEY, ContextSigner("cluster-secret-2").sign(KEY, VECTOR)),
    ("truncated by one byte", KEY, b64url(GENUINE_RAW[:-1])),
    ("truncated to version and tag", KEY, b64url(GENUINE_RAW[: 1 + MAC_BYTES])),
    ("truncated inside the tag", KEY, b64url(GENUINE_RAW[:MAC_BYTES])),
    ("only the version byte", KEY, b64url(GENUINE_RAW[:1])),
    ("appended byte", KEY, b64url(GENUINE_RAW + b"\x00")),
    ("appended msgpack", KEY, b64url(GENUINE_RAW + msgpack.packb([["n1", 10**9]]))),
    ("tag of another key moved here", KEY, with_payload(SIGNER.sign("other", VECTOR), encode_vector(VECTOR))),
    ("all zeros", KEY, b64url(bytes(1 + MAC_BYTES + 8))),
]


@pytest.mark.parametrize(("key", "text"), [(k, t) for _, k, t in BAD], ids=[n for n, _, _ in BAD])
def test_not_issued_for_this_key_is_bad_context(key: str, text: str) -> None:
    with pytest.raises(BadContext):
        SIGNER.verify(key, text)


# --- refused: not even a context (invalid_context) ---------------------------------------------------

INVALID = [
    ("one char", "a"),
    ("length 1 mod 4", "kAAAA"),
    ("non-ascii", "é"),
    ("non-ascii tail", GENUINE + "€"),
    ("standard base64 alphabet", "ab+/"),
    ("padding", GENUINE + "=="),
    ("space", GENUINE[:4] + " " + GENUINE[4:]),
    ("newline", GENUINE + "\n"),
    ("NUL", GENUINE + "\x00"),
    ("oversize", "A" * (MAX_CONTEXT_TEXT_BYTES + 1)),
    ("oversize genuine-looking", SIGNER.sign(KEY, {f"m{i}" * 30: i for i in range(MAX_CONTEXT_ENTRIES)})),
]


@pytest.mark.parametrize("text", [t for _, t in INVALID], ids=[n for n, _ in INVALID])
def test_not_base64url_or_oversize_is_invalid_context(text: str) -> None:
    with pytest.raises(InvalidContext):
        SIGNER.verify(KEY, text)


def test_size_bound_is_exact() -> None:
    # The largest text accepted is decoded (and refused only for its origin); one more is not.
    at_bound = "A" * MAX_CONTEXT_TEXT_BYTES
    with pytest.raises(BadContext):
        SIGNER.verify(KEY, at_bound)
    with pytest.raises(InvalidContext):
        SIGNER.verify(KEY, at_bound + "A")


def test_a_signed_but_malformed_payload_is_still_refused() -> None:
    """A node of another version could sign a payload this one cannot use: refused, not trusted."""
    signer = ContextSigner(SECRET)
    payload = msgpack.packb([["n1", 2**64 - 1]], use_bin_type=True)
    token = b64url(bytes([TOKEN_VERSION]) + signer._tag(KEY, payload) + payload)
    with pytest.raises(InvalidContext):
        signer.verify(KEY, token)


def test_errors_are_value_errors_and_distinct() -> None:
    assert issubclass(BadContext, ValueError) and issubclass(InvalidContext, ValueError)
    assert not issubclass(BadContext, InvalidContext) and not issubclass(InvalidContext, BadContext)


def test_random_texts_raise_only_the_two_typed_errors() -> None:
    rng = random.Random(3)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    outcomes = {"bad": 0, "invalid": 0, "accepted": 0}
    for _ in range(2000):
        choice = rng.randrange(3)
        if choice == 0:
            text = "".join(rng.choice(alphabet + "+/=é\x00 ") for _ in range(rng.randint(1, 60)))
        elif choice == 1:
            text = b64url(bytes([TOKEN_VERSION]) + bytes(rng.randrange(256) for _ in range(rng.randint(0, 60))))
        else:  # one character of a genuine token changed
            i = rng.randrange(len(GENUINE))
            text = GENUINE[:i] + rng.choice(alphabet) + GENUINE[i + 1 :]
        try:
            vector = SIGNER.verify(KEY, text)
        except BadContext:
            outcomes["bad"] += 1
            continue
        except InvalidContext:
            outcomes["invalid"] += 1
            continue
        outcomes["accepted"] += 1
        # Only the genuine token (or another spelling of its exact bytes) can be accepted.
        assert unb64url(text) == GENUINE_RAW and vector == VECTOR
    assert outcomes["bad"] > 0 and outcomes["invalid"] > 0, outcomes


# --- the coordinator's own counters: a context of an earlier life of the key ------------------------

# (context, actor, the coordinator's stored clock, refused)
UNISSUED = [
    ("no context", {}, "n1", {}, False),
    ("context without the actor", {"n2": 9}, "n1", {"n1": 1}, False),
    ("claims what was issued", {"n1": 3}, "n1", {"n1": 3}, False),
    ("claims less (an older read)", {"n1": 2}, "n1", {"n1": 3, "n2": 1}, False),
    ("others ahead: not checkable here", {"n1": 1, "n2": 50}, "n1", {"n1": 1, "n2": 1}, False),
    ("claims one more", {"n1": 4}, "n1", {"n1": 3}, True),
    ("key reaped, nothing stored", {"n1": 5}, "n1", {}, True),
    ("key reaped and written again", {"n1": 5, "n2": 2}, "n1", {"n1": 1}, True),
    ("incarnated actor, ahead", {"n1.ab": 2}, "n1.ab", {"n1.ab": 1}, True),
    ("another incarnation's entry", {"n1.old": 9}, "n1.new", {"n1.new": 1}, False),
]


@pytest.mark.parametrize(
    ("context", "actor", "stored", "refused"), [c[1:] for c in UNISSUED], ids=[c[0] for c in UNISSUED]
)
def test_refuse_unissued(context: dict[str, int], actor: str, stored: dict[str, int], refused: bool) -> None:
    if refused:
        with pytest.raises(BadContext, match="read the key again"):
            refuse_unissued(context, actor, stored)
    else:
        refuse_unissued(context, actor, stored)
