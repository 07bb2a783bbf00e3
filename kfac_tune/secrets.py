"""Credentials out of everything kfac-tune prints or records: :func:`display_url` for a URL, :func:`mask` for text.

A storage or tracking URL may carry a password in several forms, and every output path (the banner, hints and
error messages, the MLflow parent run's ``storage`` tag, the study's ``config`` attribute, MLflow params, the
``model.yaml`` artifact) must hide all of them:

* URL userinfo, ``postgresql://user:pw@host/db`` or ``http://user:pw@mlflow:5000`` (basic auth): the password
  becomes ``***``, the user name stays (it says which account, and is not a secret);
* secret-looking query parameters, ``?password=pw``, ``&sslpassword=...``, ``?token=...`` (any case);
* the value of ``PGPASSWORD`` and of MLflow's ``MLFLOW_TRACKING_PASSWORD``/``MLFLOW_TRACKING_TOKEN`` wherever it
  appears;
* and every password found in the URLs given, or in any URL this process resolved (:func:`remember`), wherever
  else it appears, plain, percent-encoded or quoted, e.g. in a comment of the YAML recorded as an artifact.

A URL is masked by *parsing* it, not by a pattern over text: SQLAlchemy takes a password raw (``#``, space,
``'``, ``/``, ``?``, ``@`` included), so the userinfo runs from the first ``:`` after the user name to the last
``@`` before the query, and the query is split on ``&`` as SQLAlchemy splits it. A pattern stops at such
characters and printed the rest (issue 23). Text can hold a URL anywhere, so :func:`mask` first replaces every
known URL (given, or remembered when the command resolved its stores) by its masked form, then masks the URLs a
pattern can still find, then each known password wherever it appears.

Bare occurrences of very short passwords (under ``MIN_BARE_SECRET`` characters) are not replaced: masking every
"a" in a text would destroy it and protects nothing (the URL itself is still masked).
"""
from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Iterable
from typing import Any, NamedTuple

MASK = "***"
MIN_BARE_SECRET = 4
SECRET_ENVIRONMENT = ("PGPASSWORD", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
SECRET_KEYS = ("password", "passwd", "pwd", "pass", "sslpassword", "secret", "client_secret", "token",
               "access_token", "auth_token", "api_key", "apikey", "private_key")

_SCHEME = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.\-]*://")
# For URLs in free text that no one named: scheme://user:password@ (to the last @ before white space).
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@?#'\"]*:)(?P<secret>\S*?)@(?=[^\s@]*(\s|$))")
_QUERY = re.compile(r"(?P<head>[?&;](?:" + "|".join(SECRET_KEYS) + r")=)(?P<secret>[^&#;\s'\"]*)", re.IGNORECASE)
_remembered: set[str] = set()


class _Parts(NamedTuple):
    """A URL cut where credentials can be: ``head`` (``scheme://user``), ``secret`` (the userinfo password, None
    without one), ``rest`` (host, path and query, after the ``@``); ``userinfo`` says whether there was one."""

    head: str
    secret: str | None
    rest: str
    userinfo: bool


def remember(*urls: str | None) -> None:
    """Make :func:`mask` hide these URLs' passwords in any text of this process: the stores a command resolved, so
    that an error message quoting one (a driver's, a parser's) is masked without knowing where it came from."""
    _remembered.update(url for url in urls if url and url_secrets(url))


def display_url(url: str) -> str:
    """A storage or tracking URL as it may be shown, logged, tagged or stored: the userinfo password and every
    secret-looking query value replaced by ``***``, everything else as written."""
    if not _SCHEME.match(url):
        return mask(url)
    parts = _split(url)
    rest = parts.rest
    path, question, query = rest.partition("?")
    if question:
        rest = path + "?" + "&".join(_mask_pair(pair) for pair in query.split("&"))
    if parts.secret is None:
        return parts.head + ("@" if parts.userinfo else "") + rest
    return f"{parts.head}:{MASK if parts.secret else ''}@{rest}"


def url_secrets(url: str) -> list[str]:
    """The passwords ``url`` carries: its userinfo password and its secret-looking query values, as written."""
    if not _SCHEME.match(url):
        return []
    parts = _split(url)
    found = [parts.secret] if parts.secret else []
    query = parts.rest.partition("?")[2]
    for pair in query.split("&") if query else ():
        key, equals, value = pair.partition("=")
        if equals and value and key.strip().lower() in SECRET_KEYS:
            found.append(value)
    if not url.lower().startswith(("http://", "https://")):
        found.extend(_database_secrets(url))
    return found


def _database_secrets(url: str) -> list[str]:
    """The password and secret query values SQLAlchemy itself reads from ``url`` (the one that connects), should
    its reading of a raw ``@`` differ from :func:`_split`'s."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a database URL: nothing more to find
        return []
    values = [parsed.password] if parsed.password else []
    for key, value in parsed.query.items():
        if key.lower() in SECRET_KEYS:
            values.extend([value] if isinstance(value, str) else value)
    return [str(v) for v in values if v]


def mask(text: str, *urls: str | None) -> str:
    """``text`` with every credential (see the module docstring) replaced by ``***``; ``urls`` are further URLs
    whose passwords must not appear anywhere in ``text`` (the remembered ones always count)."""
    if not text:
        return text
    known = sorted({u for u in (*urls, *_remembered) if u and url_secrets(u)}, key=len, reverse=True)
    for url in known:
        if url in text:
            text = text.replace(url, display_url(url))
        for host in _misread_hosts(url):  # what a driver names as the host may start with the password's tail
            text = text.replace(host, MASK + "@" + host.rpartition("@")[2])
    bare = _bare_secrets(text, known)
    text = _USERINFO.sub(lambda m: m["head"] + (MASK if m["secret"] else "") + "@", text)
    text = _QUERY.sub(lambda m: m["head"] + (MASK if m["secret"] else ""), text)
    for secret in bare:
        text = text.replace(secret, MASK)
    return text


def mask_data(value: Any, *urls: str | None) -> Any:
    """:func:`mask` applied to every string (keys included) of a JSON-like structure."""
    if isinstance(value, str):
        return mask(value, *urls)
    if isinstance(value, dict):
        return {mask_data(k, *urls): mask_data(v, *urls) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_data(v, *urls) for v in value]
    return value


def url_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its userinfo, and the ``(user, password)`` it carried (percent-decoded), if any: for an HTTP
    client that sends basic auth in a header rather than in the URL, and for a server handed them in its
    environment rather than on its command line."""
    if not _SCHEME.match(url):
        return url, None
    scheme = url.partition("://")[0]
    parts = _split(url)
    if not parts.userinfo:
        return url, None
    user = parts.head.partition("://")[2]
    return f"{scheme}://{parts.rest}", (urllib.parse.unquote(user), urllib.parse.unquote(parts.secret or ""))


def _split(url: str) -> _Parts:
    """Cut ``url`` (``scheme://...``) at its userinfo as SQLAlchemy and a browser would agree on, erring towards
    a longer password: the user name runs to the first ``:``, ``/`` or ``@``; the userinfo ends at the last
    ``@`` before the first ``?`` that follows an ``@`` (a raw ``@``, ``/`` or ``?`` in the password stays in
    it). No ``:`` before that ``@`` means a user name without a password."""
    scheme, _, after = url.partition("://")
    first_at = after.find("@")
    if first_at < 0:
        return _Parts(f"{scheme}://", None, after, False)
    query = after.find("?", first_at)
    end = after.rfind("@", 0, len(after) if query < 0 else query)
    userinfo = after[:end]
    user, colon, secret = userinfo.partition(":")
    if "/" in user and not colon:  # ``host/db@x``: an @ in the path, no userinfo at all
        return _Parts(f"{scheme}://", None, after, False)
    return _Parts(f"{scheme}://{user}", secret if colon else None, after[end + 1:], True)


def _misread_hosts(url: str) -> list[str]:
    """The host SQLAlchemy reads from ``url`` when it holds an ``@`` (``u:a@b@h`` connects as password ``a`` to
    host ``b@h``): the part before that ``@`` is the end of the user's password, in the driver's error messages."""
    if url.lower().startswith(("http://", "https://")) or "@" not in url:
        return []
    from sqlalchemy.engine import make_url

    try:
        host = make_url(url).host
    except Exception:  # not a database URL
        return []
    return [host] if host and "@" in host else []


def _mask_pair(pair: str) -> str:
    key, equals, value = pair.partition("=")
    if equals and value and key.strip().lower() in SECRET_KEYS:
        return f"{key}={MASK}"
    return pair


def _bare_secrets(text: str, urls: Iterable[str]) -> list[str]:
    """Passwords to replace wherever they occur: those of ``urls`` and of the URLs a pattern finds in ``text``,
    and the secret environment variables' values, each in every form it may be written; longest first."""
    found: set[str] = set()
    for url in urls:
        found.update(url_secrets(url))
    for match in _USERINFO.finditer(text):
        found.add(match["secret"])
    for match in _QUERY.finditer(text):
        found.add(match["secret"])
    found.update(os.environ.get(name, "") for name in SECRET_ENVIRONMENT)
    forms: set[str] = set()
    for secret in found:
        for form in _forms(secret):
            if len(form) >= MIN_BARE_SECRET and form != MASK:
                forms.add(form)
    return sorted(forms, key=len, reverse=True)


def _forms(secret: str) -> Iterable[str]:
    """``secret`` as written, percent-decoded and -encoded, and as a JSON, YAML or Python literal would quote it."""
    decoded = urllib.parse.unquote(secret)
    plain = {secret, decoded}
    return {*plain, urllib.parse.quote(decoded, safe=""), urllib.parse.quote_plus(decoded),
            *(json.dumps(s)[1:-1] for s in plain), *(s.replace("'", "''") for s in plain),
            *(repr(s)[1:-1] for s in plain)}
