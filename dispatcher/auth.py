"""API tokens: only their sha256 hashes live in settings, and each maps to the owner it acts for.

A token sees only its owner's jobs; the owner is the one value routes pass to the service.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

from shared.errors import AuthError

BEARER = "bearer"


def hash_token(token: str) -> str:
    """The form tokens are stored in (``FACEFARM_API_TOKENS`` keys): sha256 hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token() -> tuple[str, str]:
    """A fresh random token and its hash, e.g. for embedded mode's ephemeral token."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def find_owner(token: str, token_hashes: Mapping[str, str]) -> str | None:
    """The owner of ``token``, or None; every stored hash is compared in constant time.

    The loop never stops early, so timing reveals neither which hash matched nor how far it got.
    """
    presented = hash_token(token)
    owner: str | None = None
    for stored, candidate in token_hashes.items():
        if hmac.compare_digest(presented, stored.lower()):
            owner = candidate
    return owner


def parse_authorization(header: str | None) -> str:
    """The token from an ``Authorization: Bearer <token>`` header, or AuthError."""
    if not header:
        raise AuthError("missing API token: send 'Authorization: Bearer <token>' (facefarm --token T)")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != BEARER or not token.strip():
        raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
    return token.strip()


def authenticate(header: str | None, token_hashes: Mapping[str, str]) -> str:
    """The owner the request acts for; AuthError when the token is missing or unknown."""
    owner = find_owner(parse_authorization(header), token_hashes)
    if owner is None:
        raise AuthError("invalid API token: check --token / FACEFARM_API_TOKENS")
    return owner
