"""Credentials out of everything kfac-tune prints or records: one function, :func:`mask`, used everywhere.

A storage or tracking URL may carry a password in several forms, and every output path (the banner, hints and
error messages, the MLflow parent run's ``storage`` tag, the study's ``config`` attribute, the ``model.yaml``
artifact) must hide all of them:

* URL userinfo, ``postgresql://user:pw@host/db`` or ``http://user:pw@mlflow:5000`` (basic auth): the password
  becomes ``***``, the user name stays (it says which account, and is not a secret);
* secret-looking query parameters, ``?password=pw``, ``&sslpassword=...``, ``?token=...`` (any case);
* the value of ``PGPASSWORD`` and of MLflow's ``MLFLOW_TRACKING_PASSWORD``/``MLFLOW_TRACKING_TOKEN`` wherever it
  appears;
* and every password found in the URLs given (or in the text itself) wherever else it appears, plain or
  percent-encoded, e.g. in a comment of the YAML recorded as an artifact.

Bare occurrences of very short passwords (under ``MIN_BARE_SECRET`` characters) are not replaced: masking every
"a" in a text would destroy it and protects nothing.
"""
from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

MASK = "***"
MIN_BARE_SECRET = 4
SECRET_ENVIRONMENT = ("PGPASSWORD", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
SECRET_KEYS = ("password", "passwd", "pwd", "pass", "sslpassword", "secret", "client_secret", "token",
               "access_token", "auth_token", "api_key", "apikey", "private_key")

# scheme://user:password@  (the password runs to the last @ before the path, so an unencoded @ is covered)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@?#'\"]*:)(?P<secret>[^\s/?#'\"]*)@")
_QUERY = re.compile(r"(?P<head>[?&;](?:" + "|".join(SECRET_KEYS) + r")=)(?P<secret>[^&#;\s'\"]*)", re.IGNORECASE)


def mask(text: str, *urls: str) -> str:
    """``text`` with every credential (see the module docstring) replaced by ``***``; ``urls`` are further URLs
    whose passwords must not appear anywhere in ``text``."""
    if not text:
        return text
    bare = _secrets(text, *urls)
    text = _USERINFO.sub(lambda m: m["head"] + (MASK if m["secret"] else "") + "@", text)
    text = _QUERY.sub(lambda m: m["head"] + (MASK if m["secret"] else ""), text)
    for secret in bare:
        text = text.replace(secret, MASK)
    return text


def mask_data(value: Any, *urls: str) -> Any:
    """:func:`mask` applied to every string (keys included) of a JSON-like structure."""
    if isinstance(value, str):
        return mask(value, *urls)
    if isinstance(value, dict):
        return {mask_data(k, *urls): mask_data(v, *urls) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_data(v, *urls) for v in value]
    return value


def display_url(url: str) -> str:
    """A storage or tracking URL as it may be shown, logged or tagged."""
    return mask(url)


def url_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its userinfo, and the ``(user, password)`` it carried (percent-decoded), if any: for an HTTP
    client that sends basic auth in a header rather than in the URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return bare, (urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or ""))


def _secrets(text: str, *urls: str) -> list[str]:
    """Passwords to replace wherever they occur: those of ``urls`` and of the URLs in ``text``, and the secret
    environment variables' values, each as written and percent-encoded; longest first."""
    found: set[str] = set()
    for url in (*urls, text):
        for match in _USERINFO.finditer(url):
            found.add(match["secret"])
        for match in _QUERY.finditer(url):
            found.add(match["secret"])
    found.update(os.environ.get(name, "") for name in SECRET_ENVIRONMENT)
    forms: set[str] = set()
    for secret in found:
        for form in _forms(secret):
            if len(form) >= MIN_BARE_SECRET and form != MASK:
                forms.add(form)
    return sorted(forms, key=len, reverse=True)


def _forms(secret: str) -> Iterable[str]:
    decoded = urllib.parse.unquote(secret)
    return {secret, decoded, urllib.parse.quote(decoded, safe=""), urllib.parse.quote_plus(decoded)}
