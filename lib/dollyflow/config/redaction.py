"""Secrets kept out of what others read: REDACTED, redact_uri (a URI's user info and secret query
values) and redact (every string of a JSON-like value)."""
from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
#: Query keys whose values are secrets (matched case-insensitively inside the key: ``sig``,
#: ``X-Amz-Signature``, ``access_token``, ``sas_token``, ``password``, ``secret_key`` ...).
SECRET_QUERY_WORDS = ("key", "secret", "token", "sas", "password", "passwd", "pwd", "sig", "credential",
                      "auth")
_URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s'\"<>]*)")


def _secret_key(name: str) -> bool:
    name = name.lower()
    return any(w in name for w in SECRET_QUERY_WORDS)


def _redact_one(m: re.Match) -> str:
    rest = m.group("rest")
    rest, hash_, fragment = rest.partition("#")
    rest, q, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = REDACTED + "@" + authority.rsplit("@", 1)[1]
    if q:
        parts = []
        for part in query.split("&"):
            k, eq, v = part.partition("=")
            parts.append(f"{k}={REDACTED}" if eq and v and _secret_key(k) else part)
        query = "&".join(parts)
    return m.group("scheme") + authority + slash + path + q + query + hash_ + fragment


def redact_uri(text: str) -> str:
    """``text`` with every URI's user info (``s3a://KEY:SECRET@bucket``) and the values of its
    secret-looking query keys (``?sig=...``, ``?token=...``, ``?password=...``; see
    :data:`SECRET_QUERY_WORDS`) replaced by ``***``; anything else is unchanged."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _URI.sub(_redact_one, text)


def redact(obj: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings) with :func:`redact_uri`
    applied to every string (dict keys included)."""
    if isinstance(obj, str):
        return redact_uri(obj)
    if isinstance(obj, dict):
        return {redact(k): redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj) if isinstance(obj, list) else tuple(redact(v) for v in obj)
    return obj
