"""API tokens: stored hashed, compared in constant time, each mapped to exactly one owner."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from dispatcher import auth
from dispatcher.auth import authenticate, create_token, find_owner, hash_token, parse_authorization
from shared.errors import AuthError

TOKENS = {hash_token("alice-secret"): "alice", hash_token("bob-secret"): "bob"}


def test_tokens_are_stored_as_sha256_hex() -> None:
    assert hash_token("alice-secret") == hashlib.sha256(b"alice-secret").hexdigest()


def test_each_token_maps_to_its_owner() -> None:
    assert authenticate("Bearer alice-secret", TOKENS) == "alice"
    assert authenticate("bearer bob-secret", TOKENS) == "bob"


def test_the_hash_itself_is_not_a_valid_token() -> None:
    assert find_owner(hash_token("alice-secret"), TOKENS) is None


def test_every_stored_hash_is_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the number of comparisons does not depend on which token matched."""
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    many = {**TOKENS, **{hash_token(f"t{i}"): f"o{i}" for i in range(10)}}
    assert find_owner("alice-secret", many) == "alice"
    assert len(calls) == len(many)
    calls.clear()
    assert find_owner("nobody", many) is None
    assert len(calls) == len(many)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing API token"),
        ("", "missing API token"),
        ("Basic YWxpY2U6cHc=", "malformed"),
        ("Bearer", "malformed"),
        ("Bearer wrong", "invalid API token"),
    ],
)
def test_missing_malformed_or_unknown_tokens_are_auth_errors(header: str | None, message: str) -> None:
    with pytest.raises(AuthError, match=message):
        authenticate(header, TOKENS)


def test_created_tokens_are_random_and_hashed() -> None:
    (t1, h1), (t2, h2) = create_token(), create_token()
    assert t1 != t2 and len(t1) >= 32
    assert (h1, h2) == (hash_token(t1), hash_token(t2))


def test_parse_authorization_strips_whitespace() -> None:
    assert parse_authorization("  Bearer   tok  ") == "tok"
