"""Structured logs: one JSON object a line, carrying request id, batch id and model version.

The web app always logs JSON; the command line does when ``BACKORDER_LOG_FORMAT=json`` (or
``--log-format json``), as in containers, where Promtail ships stderr to Loki. Fields that
hold for a stretch of work (the batch being scored, the model version answering) are bound
once with :func:`log_context` and then appear on every line logged inside it, including
lines from library code that knows nothing of batches.

The handlers the command line and the server install carry :class:`RedactSecrets`: whatever
reaches a log line (a library's error naming a database URL, a field holding a landing root)
shows no password.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import logging.config
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, ParamSpec, TypeVar

from backorder.uris import redact_fields, redact_text

LogFormat = Literal["text", "json"]

# A ContextVar, not a global: each request (asyncio task) and each thread sees its own fields.
_fields: ContextVar[Mapping[str, Any]] = ContextVar(
    "backorder_log_fields", default=MappingProxyType({})
)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (None values skipped) to every log line written inside the block."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


def bind(**fields: Any) -> None:
    """Add fields for the rest of the current context (a CLI command, a task)."""
    _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})


P = ParamSpec("P")
R = TypeVar("R")


def batch_logged(step: Callable[P, R]) -> Callable[P, R]:
    """Run a pipeline step with its ``batch_id`` argument bound to every line it logs."""
    signature = inspect.signature(step)

    @functools.wraps(step)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        batch_id = signature.bind_partial(*args, **kwargs).arguments.get("batch_id")
        with log_context(batch_id=batch_id):
            return step(*args, **kwargs)

    return run


_make_record = logging.getLogRecordFactory()


def _record_with_context(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Snapshot the bound fields when a line is logged, not when it is formatted (later,
    perhaps on another thread, or by pytest's caplog)."""
    record = _make_record(*args, **kwargs)
    record.log_context = _fields.get()
    return record


logging.setLogRecordFactory(_record_with_context)


# The attributes every record has; the others are ``extra`` fields.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "log_context"}
_TRACEBACKS = logging.Formatter()


class RedactSecrets(logging.Filter):
    """A handler's filter that hides the secrets of URIs in a record before it is formatted: in
    its message (arguments included), its extra and bound context fields, and its traceback.

    The net under the redaction done where URIs are printed: it catches what a library, or a
    message that forgot to redact, puts in a log line. Records are changed in place, so every
    handler after this one sees them clean too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record: the handler reports it as it always does
            return True
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        for name, value in list(vars(record).items()):
            if name not in _RECORD_FIELDS:
                setattr(record, name, redact_fields(value))
        context = getattr(record, "log_context", None)
        if context:
            record.log_context = MappingProxyType(redact_fields(dict(context)))
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, the bound context fields and any ``extra`` fields."""

    # uvicorn adds "color_message", the same text with terminal colour codes: not for a log file.
    RESERVED = set(vars(logging.makeLogRecord({}))) | {
        "message",
        "asctime",
        "color_message",
        "log_context",
    }

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(getattr(record, "log_context", {}))
        doc.update({k: v for k, v in vars(record).items() if k not in self.RESERVED})
        if record.exc_info or record.exc_text:
            # exc_text: the traceback as RedactSecrets left it, passwords masked.
            doc["exception"] = record.exc_text or "".join(
                traceback.format_exception(*record.exc_info)  # type: ignore[misc]
            )
        return json.dumps(doc, default=str)


_fields_in_messages = {"on": False}


def fields_into_messages() -> None:
    """For hosts that render only a record's message (Airflow's task logs, through structlog,
    drop ``extra`` fields): from now on, :func:`step_logger` lines end with ``key=value`` pairs
    of their bound and extra fields."""
    _fields_in_messages["on"] = True


class StepLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose ``extra`` fields survive hosts that keep only the message."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        # Hosts such as Airflow format these lines with handlers of their own, without
        # RedactSecrets: the secrets go here.
        msg = redact_text(str(msg))
        if kwargs.get("extra"):
            kwargs["extra"] = redact_fields(kwargs["extra"])
        if _fields_in_messages["on"]:
            fields = {**_fields.get(), **(kwargs.get("extra") or {})}
            if fields:
                pairs = " ".join(f"{k}={v}" for k, v in fields.items())
                msg = f"{msg} {redact_text(pairs)}"
        return msg, kwargs


def step_logger(name: str) -> StepLogger:
    return StepLogger(logging.getLogger(name), {})


def json_log_config(level: str = "INFO") -> dict[str, Any]:
    """logging.dictConfig for our loggers and uvicorn's: JSON lines on stderr."""
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "json",
        "stream": "ext://sys.stderr",
        "filters": ["secrets"],
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "filters": {"secrets": {"()": RedactSecrets}},
        "handlers": {"stderr": handler},
        "loggers": {
            "backorder": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"handlers": ["stderr"], "level": level, "propagate": False},
        },
    }


def configure_json(level: str = "INFO") -> None:
    logging.config.dictConfig(json_log_config(level))
