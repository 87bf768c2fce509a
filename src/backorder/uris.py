"""Where data lives, from its URI alone: local path, fsspec URL or database table.

Files and objects are tables by their suffix (``TABLE_SUFFIXES``); a database table is named
``URI#TABLE`` with a SQLAlchemy or MongoDB URI. Nothing here opens anything: ``backorder.io``
does, and re-exports what its callers need from this module.

A URI may carry a secret: a password in its credentials (``postgresql://app:PASSWORD@db/sales``)
or in its query (``?password=...``, ``?X-Amz-Signature=...``). :func:`redact` hides them, and is
what every message, log line, report and manifest shows; :func:`redact_text` does the same for
URIs inside a longer text (a library's error) and masks the passwords the process has been told
about (:func:`remember_secrets`), wherever they appear.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote

from backorder.errors import InputFileError

# The files that hold tables, by suffix (in any case) -> format; longest first.
TABLE_SUFFIXES: dict[str, str] = {
    ".parquet": "parquet",
    ".csv.gz": "csv.gz",
    ".csv": "csv",
    ".pq": "parquet",
}


def table_suffix(name: str | Path) -> str | None:
    """The table suffix ``name`` ends with, as written there (``.CSV`` stays ``.CSV``), or None
    when it is not a table file."""
    text = str(name)
    lowered = text.lower()
    for suffix in TABLE_SUFFIXES:
        if lowered.endswith(suffix):
            return text[-len(suffix) :]
    return None


def table_format(uri: str | Path) -> str:
    """'parquet', 'csv' or 'csv.gz', from the output's extension."""
    suffix = table_suffix(uri)
    if suffix is None:
        raise InputFileError(f"{redact(str(uri))}: output must end with .parquet, .csv or .csv.gz")
    return TABLE_SUFFIXES[suffix.lower()]


def is_remote(uri: str | Path) -> bool:
    """True for fsspec URLs other than local files (s3://, gs://, memory://, ...)."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


# -- database tables -------------------------------------------------------------------------------
SQL_SCHEMES = ("postgresql", "postgres", "sqlite", "mysql", "mariadb", "mssql", "oracle")
MONGO_SCHEMES = ("mongodb", "mongodb+srv")


def scheme_of(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.split("+")[0].lower() if sep else ""


def is_sql(uri: str) -> bool:
    return scheme_of(uri) in SQL_SCHEMES


def is_mongo(uri: str) -> bool:
    return uri.partition("://")[0].lower() in MONGO_SCHEMES


def is_database(uri: str) -> bool:
    return is_sql(uri) or is_mongo(uri)


def split_table(uri: str) -> tuple[str, str]:
    """``postgresql://h/db#predictions`` -> (``postgresql://h/db``, ``predictions``)."""
    base, sep, table = uri.rpartition("#")
    if not sep or not table or "/" in table:
        raise InputFileError(f"{redact(uri)}: name a table (--input-table / --output-table)")
    return base, table


def with_table(uri: str, table: str | None) -> str:
    return f"{uri}#{table}" if table else uri


# -- secrets -------------------------------------------------------------------------------------
MASK = "***"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# What an authority without credentials looks like: host[:port], several of them separated by
# commas (MongoDB), or an [IPv6] literal.
_HOST = r"(?:\[[^\]]*\]|[^:,\[\]@]*)(?::\d*)?"
_HOSTS = re.compile(rf"{_HOST}(?:,{_HOST})*")
# A URI inside a longer text ends at white space or a quote; punctuation after it ("URI: why",
# "(URI)") is not part of it.
_URI_IN_TEXT = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+?(?=[.,;:!?)\]}]*(?:[\s'\"<>`]|$))"
)
# RFC 3986 sub-delimiters: they may stay raw in a user name or password, so encoding leaves them.
_USERINFO_SAFE = "!$&'()*+,;="
# Query parameters that hold secrets, by name (case, '-' and '_' ignored): those containing one
# of the words, those named exactly so, and those ending in "key" (access_key, api-key, ...).
_SECRET_WORDS = ("password", "passwd", "secret", "token", "signature", "credential")
_SECRET_NAMES = frozenset({"pwd", "pass", "sig", "auth"})
# Shorter known secrets are not masked in free text: they would mask ordinary words.
_MIN_MASKED = 4
# Replaced whole, never changed in place: a thread masking a text iterates a stable set.
_remembered: dict[str, frozenset[str]] = {"secrets": frozenset()}


@dataclass(frozen=True)
class _Credentials:
    scheme: str
    user: str  # as written
    password: str | None  # as written; None when the URI names no password
    rest: str  # everything after the '@' that ends the credentials


def _credentials(uri: str) -> _Credentials | None:
    """The credentials of ``uri``, or None when it has none.

    The last '@' of the authority ends them, not the first: a password may hold a raw '@'. A
    password holding a raw '/' ends the authority early (``s3://KEY:ab/cd@bucket/x``); when what
    precedes the first '/' is not host[:port], the credentials run to the last '@' before the
    query. A password must not hold a raw '?' or '#' (no parser could tell where it ends).
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme) or rest.startswith("/"):
        return None  # not a URL, or one without an authority (sqlite:///x.db, file:///x)
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    at = authority.rfind("@")
    if at < 0:
        if _HOSTS.fullmatch(authority):
            return None
        at = rest.partition("?")[0].rfind("@")
        if at < 0:
            return None
    user, colon, password = rest[:at].partition(":")
    return _Credentials(scheme, user, password if colon else None, rest[at + 1 :])


def _is_secret_param(name: str) -> bool:
    plain = re.sub(r"[^a-z0-9]", "", unquote(name).lower())
    return plain in _SECRET_NAMES or plain.endswith("key") or any(w in plain for w in _SECRET_WORDS)


def _query_pairs(uri: str) -> tuple[str, list[str], str]:
    """(what precedes the query, its name=value pairs, the fragment with its '#')."""
    head, _, tail = uri.partition("?")
    query, sep, fragment = tail.partition("#")
    return head, query.split("&"), sep + fragment


def _redact_query(uri: str) -> str:
    if "://" not in uri or "?" not in uri:
        return uri
    head, pairs, fragment = _query_pairs(uri)
    shown = []
    for pair in pairs:
        name, eq, value = pair.partition("=")
        shown.append(f"{name}={MASK}" if eq and value and _is_secret_param(name) else pair)
    return f"{head}?{'&'.join(shown)}{fragment}"


def _sqlalchemy_redacted(uri: str) -> str | None:
    """A SQL URL as SQLAlchemy renders it without its password, or None if it cannot parse it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    base, sep, table = uri.rpartition("#")  # URI#TABLE: the table is not part of the URL
    if not sep or not table or any(c in table for c in "/@?="):
        base, sep, table = uri, "", ""
    try:
        shown = make_url(encoded_credentials(base)).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return None
    return _redact_query(shown) + sep + table


def redact(uri: str) -> str:
    """The URI without its secrets, for messages, logs, reports and manifests: the password
    of its credentials (``postgresql://app:***@db/sales``) and the values of query parameters
    such as ``password``, ``secret``, ``token`` or ``access_key``. Anything else is unchanged.

    Database URLs are rendered by SQLAlchemy (``make_url(...).render_as_string(hide_password=
    True)``) once their credentials are split at the last '@'; MongoDB URLs (several hosts) and
    other URLs (s3://KEY:SECRET@..., https://user:pass@...) the same way by hand.
    """
    text = str(uri)
    found = _credentials(text)
    if found is None or found.password in (None, "", MASK):  # nothing to hide, or hidden already
        return _redact_query(text)
    if is_sql(text):
        shown = _sqlalchemy_redacted(text)
        if shown is not None:
            return shown
    return _redact_query(f"{found.scheme}://{found.user}:{MASK}@{found.rest}")


def _encode(part: str) -> str:
    return quote(unquote(part), safe=_USERINFO_SAFE)


def encoded_credentials(uri: str) -> str:
    """``uri`` with its user name and password percent-encoded, for the drivers: SQLAlchemy
    and pymongo split credentials at the first '@' and ':', so a raw '@' in a password would
    send part of it to the host or port (and into their error messages). A URI whose
    credentials are encoded already, or that has none, comes back unchanged."""
    found = _credentials(uri)
    if found is None:
        return uri
    userinfo = _encode(found.user)
    if found.password is not None:
        userinfo += ":" + _encode(found.password)
    return f"{found.scheme}://{userinfo}@{found.rest}"


def _secrets_of(texts: tuple[str | None, ...]) -> set[str]:
    """Every form in which the secrets of the URIs in ``texts`` could be printed: as written,
    decoded, encoded, and each piece between '@', ':' and '/' (a parser that split it wrongly
    prints pieces)."""
    values: list[str] = []
    for text in texts:
        for uri in _URI_IN_TEXT.findall(text or ""):
            found = _credentials(uri)
            if found is not None and found.password:
                values.append(found.password)
            if "?" in uri:
                for pair in _query_pairs(uri)[1]:
                    name, eq, value = pair.partition("=")
                    if eq and value and _is_secret_param(name):
                        values.append(value)
    forms: set[str] = set()
    for value in values:
        plain = unquote(value)
        forms |= {value, plain, quote(plain, safe=""), quote(plain), quote_plus(plain)}
        forms |= {_encode(plain), *re.split(r"[@:/]", plain), *re.split(r"[@:/]", value)}
    return {form for form in forms if len(form) >= _MIN_MASKED}


def remember_secrets(*texts: str | None) -> None:
    """Remember the secrets of the URIs in ``texts`` (command-line arguments, settings), so that
    :func:`redact_text` masks them wherever they appear, even without their URI."""
    _remembered["secrets"] = _remembered["secrets"] | _secrets_of(texts)


def redact_text(text: str, *uris: str | None) -> str:
    """``text`` (a message, a library's error, a traceback) with every URI in it redacted, and
    every known secret masked: those of ``uris`` and those remembered by :func:`remember_secrets`
    (a library may print a password without its URI, as a bucket name or a port)."""
    cleaned = _URI_IN_TEXT.sub(lambda match: redact(match.group()), text)
    known = _remembered["secrets"]
    secrets = known | _secrets_of(uris) if uris else known
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in cleaned:
            cleaned = cleaned.replace(secret, MASK)
    return cleaned


def redact_fields(value: Any) -> Any:
    """``value`` (a JSON-like record: dicts, lists, strings) with :func:`redact_text` applied to
    every string in it, for manifests, reports and log fields."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {key: redact_fields(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(redact_fields(item) for item in value)
    return value
