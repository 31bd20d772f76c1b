"""Secrets out of text: the password of every URL's userinfo and every known secret value become
``***`` before a string reaches a log line, an HTTP body or an error message."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

REDACTED = "***"
# scheme://userinfo@ -- greedy up to the authority's last '@' (an unencoded '@' in a password
# is common in practice, and urllib splits the same way).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#\"<>\[\]{}\\^|`]*)@")
# Shorter values are not replaced wherever they occur: "pw" would maim every word containing it.
MIN_SECRET_LENGTH = 4


def redact_url(text: str) -> str:
    """``text`` with the password of each URL's userinfo replaced (``redis://user:***@host``), or
    the whole userinfo when it has no password part (a token given as the user name)."""

    def mask(match: re.Match[str]) -> str:
        user, colon, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:{REDACTED}@" if colon else f"{match['scheme']}{REDACTED}@"

    return _USERINFO.sub(mask, text)


def url_passwords(text: str) -> set[str]:
    """The secret part of each URL's userinfo in ``text``, as written and percent-decoded."""
    found = set()
    for match in _USERINFO.finditer(text):
        user, colon, password = match["userinfo"].partition(":")
        secret = password if colon else user
        if secret:
            found |= {secret, unquote(secret)}
    return found


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL passwords and every given secret (of at least MIN_SECRET_LENGTH
    characters) replaced by ``***``."""
    text = redact_url(text)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, REDACTED)
    return text
