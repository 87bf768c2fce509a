"""Where data lives, from its URI alone: local path, fsspec URL or database table.

Files and objects are tables by their suffix (``TABLE_SUFFIXES``); a database table is named
``URI#TABLE`` with a SQLAlchemy or MongoDB URI. Nothing here opens anything: ``backorder.io``
does, and re-exports what its callers need from this module.
"""

from __future__ import annotations

from pathlib import Path

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
        raise InputFileError(f"{uri}: output must end with .parquet, .csv or .csv.gz")
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


def redact(uri: str) -> str:
    """The URI without a password, for messages and manifests."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest.split("/")[0]:
        return uri
    credentials, _, host = rest.partition("@")
    user = credentials.split(":")[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else uri
